"""Widget conventions: static figures headless, live FigureWidget + controls in a Jupyter kernel."""

import ipywidgets as W
import plotly.graph_objects as go
import pytest

from workbench.widgets import controls_and_figure, figures, layout, show


def _draw(n: int, color: str = "red") -> go.Figure:
    return go.Figure(go.Scatter(y=list(range(n)), marker_color=color))


def test_headless_gives_plain_figure(monkeypatch):
    monkeypatch.setenv(figures.STATIC_ENV, "1")
    fig = _draw(3)
    assert figures.is_static() and show(fig) is fig
    out = controls_and_figure({"n": W.IntSlider(value=4, min=1, max=9)}, _draw)
    assert isinstance(out, go.Figure) and len(out.data[0].y) == 4


@pytest.fixture
def live(monkeypatch):
    monkeypatch.setattr(layout, "is_static", lambda: False)
    monkeypatch.setattr(figures, "is_static", lambda: False)


def test_live_figure_redraws_on_control_change(live):
    n = W.IntSlider(value=2, min=1, max=9)
    color = W.Dropdown(options=["red", "blue"], value="red")
    box = controls_and_figure({"n": n, "color": color}, _draw)
    assert isinstance(box, W.VBox) and isinstance(box.figure, go.FigureWidget)
    assert len(box.figure.data[0].y) == 2
    n.value, color.value = 7, "blue"
    assert len(box.figure.data[0].y) == 7 and box.figure.data[0].marker.color == "blue"
    assert isinstance(show(_draw(1)), go.FigureWidget)
