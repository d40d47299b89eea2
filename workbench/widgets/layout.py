"""Controls above a figure: the layout every interactive view in the workbench uses."""

from __future__ import annotations

from collections.abc import Callable

import ipywidgets as W
import plotly.graph_objects as go

from workbench.widgets.figures import is_static


def _value(control: W.Widget):
    return control.value


def controls_and_figure(controls: dict[str, W.ValueWidget], draw: Callable[..., go.Figure],
                        columns: int = 3):
    """Lay `controls` out above the figure returned by `draw(**{name: control.value})`.

    Live: returns a `VBox` of control rows above a FigureWidget (also at `.figure`) that is
    redrawn in place whenever a control changes (`.redraw()` forces it).
    Headless (see `is_static`): returns the figure for the controls' current values, so an
    executed notebook shows the default view.
    """
    values = {name: _value(c) for name, c in controls.items()}
    first = draw(**values)
    if is_static():
        return first
    figure = go.FigureWidget(first)

    def redraw(_change=None):
        new = draw(**{name: _value(c) for name, c in controls.items()})
        with figure.batch_update():
            figure.data = ()
            figure.add_traces(list(new.data))
            figure.layout = new.layout

    for control in controls.values():
        control.observe(redraw, names="value")
    rows = [W.HBox(list(controls.values())[i:i + columns])
            for i in range(0, len(controls), columns)]
    box = W.VBox([*rows, figure])
    box.figure = figure
    box.redraw = redraw
    return box
