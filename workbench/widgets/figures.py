"""Show a plotly figure live in JupyterLab, or as a static figure when executed headless."""

from __future__ import annotations

import os

import plotly.graph_objects as go

STATIC_ENV = "WORKBENCH_STATIC_FIGURES"


def is_static() -> bool:
    """True when figures should be static: `$WORKBENCH_STATIC_FIGURES=1` (set by `make test` and
    `make notebooks`), or when not running inside a Jupyter kernel at all."""
    if os.environ.get(STATIC_ENV, "") not in ("", "0"):
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return True
    shell = get_ipython()
    return shell is None or type(shell).__name__ != "ZMQInteractiveShell"


def show(fig: go.Figure):
    """Return what the notebook should display for `fig`.

    In a live JupyterLab kernel: a `go.FigureWidget` (can be updated in place by controls).
    Headless: the plain `go.Figure`, which renders as static plotly JSON.
    """
    if is_static():
        return fig
    return go.FigureWidget(fig)


def base_layout(fig: go.Figure, title: str | None = None, height: int = 420) -> go.Figure:
    """The workbench's figure defaults: white template, compact margins, legend on top."""
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=60, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    if title:
        fig.update_layout(title=title)
    return fig
