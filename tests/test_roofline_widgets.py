"""Roofline views: figures build headless; the explorer redraws live when a control changes."""

import ipywidgets as W
import plotly.graph_objects as go
import pytest

from workbench.roofline import analyze, kv_bits_gain, sweep, sweep_table
from workbench.roofline.measure import gpu_comparison
from workbench.roofline.trends import hardware_growth, model_growth
from workbench.widgets import figures, layout
from workbench.widgets.roofline import (
    comparison_figure,
    explorer_figure,
    kv_bits_figure,
    memory_figure,
    roofline_explorer,
    roofline_figure,
    trends_figure,
)


def test_roofline_has_roofs_ops_and_measured_points():
    runs = [analyze("llama-2-7b", "h200", phase=p, context=2048) for p in ("decode", "prefill")]
    fig = roofline_figure(runs, chips=["h200", "h200-measured"],
                          measured=[{"label": "m", "flops": 1e9, "bytes": 1e9, "seconds": 1e-3}])
    names = [t.name for t in fig.data]
    assert sum("ridge" in (n or "") for n in names) == 2 and "measured" in names
    ops = [t for t in fig.data if t.name and "decode" in t.name]
    assert ops and all(0.1 < x < 3 for x in ops[0].x)          # decode ops sit near 1 FLOP/B
    assert fig.layout.xaxis.type == "log"


def test_other_figures_build():
    a = analyze("llama-3-8b", "h200", context=32768)
    assert len(memory_figure(a).data) == 3
    rows = kv_bits_gain("llama-3-8b", "h200", context=32768, bits=(16, 3))
    assert rows[1]["max context"] > 4 * rows[0]["max context"] and rows[1]["speedup"] > 1
    assert len(kv_bits_figure(rows).data) == 2
    assert len(trends_figure({**hardware_growth(), "models": model_growth()}).data) == 10
    assert len(comparison_figure(gpu_comparison()).data) == 5
    assert explorer_figure("bert-base", ["a100"]).layout.title.text.startswith("bert-base, encode")
    table = sweep_table(sweep("gpt2", "t4", "batch", [1, 8]), "batch")
    assert [r["batch"] for r in table] == [1, 8]


def test_explorer_headless_and_live(monkeypatch):
    monkeypatch.setenv(figures.STATIC_ENV, "1")
    assert isinstance(roofline_explorer(), go.Figure)
    monkeypatch.setattr(layout, "is_static", lambda: False)
    box = roofline_explorer(models=["gpt2", "llama-2-7b"], default_model="gpt2",
                            default_chips=("t4",))
    assert isinstance(box, W.VBox)
    before = box.figure.layout.title.text
    controls = {c.description: c for row in box.children[:-1] for c in row.children}
    controls["batch"].value = 64
    assert box.figure.layout.title.text != before and "gpt2" in box.figure.layout.title.text


@pytest.mark.parametrize("bad", [{"batch": 0}, {"kv_bits": 99}])
def test_bad_settings_raise_clear_errors(bad):
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError):
        explorer_figure("gpt2", ["h200"], **{"batch": 1, **bad})
