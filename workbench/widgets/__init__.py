"""Shared conventions for the notebooks' plotly figures and ipywidgets controls.

- `show(fig)`: a live `go.FigureWidget` in JupyterLab; a static figure when the notebook runs
  headless (nbval, nbconvert), so executed outputs are stable and readable.
- `controls_and_figure(controls, draw)`: the one layout later widgets use: a row of controls
  above a figure that `draw(**values)` rebuilds whenever a control changes.
"""

from workbench.widgets.figures import is_static, show
from workbench.widgets.layout import controls_and_figure

__all__ = ["controls_and_figure", "is_static", "show"]
