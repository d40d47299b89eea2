"""KV distribution explorer and KV memory calculator (notebook 02, KVQuant).

    kv = capture_kv(model, ids)
    kv_explorer(kv, calibration)          # layer / head / bits controls above the figure
    memory_calculator()                   # model / GPU controls: longest context per bit width

The explorer shows, for one layer and KV head of a real text window: |keys| per channel before
and after RoPE and |values| (tokens x channels heatmaps: RoPE smears the fixed outlier channels
of the pre-RoPE keys); the histogram of the normalized pre-RoPE keys against the learned
(Fisher-weighted k-means) levels of that head and the uniform levels; the keys outside the calibrated
per-channel range (the 1% sparse outliers); and the reconstruction error of each method.
"""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.kvquant.explore import CapturedKV, max_context, reconstruction_errors
from workbench.kvquant.levels import uniform_levels
from workbench.kvquant.methods import method
from workbench.widgets.figures import base_layout
from workbench.widgets.layout import controls_and_figure


def explorer_figure(kv: CapturedKV, calibration, layer: int = 10, head: int = 0,
                    bits: int = 3) -> go.Figure:
    """The explorer's figure for one layer, KV head and bit width."""
    k_pre, k_post = kv.keys_pre[layer, head], kv.keys_post[layer, head]     # (T, D)
    v = kv.values[layer, head]
    spec = method(f"nuq{bits}-1%")
    tables = calibration.tables(layer, spec)
    lo, hi = tables.key_lo[head], tables.key_hi[head]                       # (D,)
    u = (k_pre[1:] - (hi + lo) / 2) / ((hi - lo) / 2)                       # normalized, no sink
    outlier = (u.abs() > 1)
    share = 100 * float(outlier.float().mean())
    fig = make_subplots(rows=2, cols=3, vertical_spacing=0.16, horizontal_spacing=0.07,
                        subplot_titles=("|keys| before RoPE", "|keys| after RoPE", "|values|",
                                        "normalized pre-RoPE keys vs levels",
                                        f"keys outside the calibrated range ({share:.1f}%)",
                                        f"reconstruction error, {bits} bits"))
    for col, x in ((1, k_pre), (2, k_post), (3, v)):
        fig.add_trace(go.Heatmap(z=x.abs().T.numpy(), colorscale="Viridis", showscale=False,
                                 hovertemplate="token %{x}, channel %{y}: %{z:.2f}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="token", row=1, col=col)
        fig.update_yaxes(title_text="channel", row=1, col=col)
    inl = u[~outlier].clamp(-1, 1)
    fig.add_trace(go.Histogram(x=inl.numpy(), nbinsx=120, histnorm="probability density",
                               marker_color="#9aa", name="keys (inliers)"), row=2, col=1)
    learned = tables.key_levels if tables.key_levels.dim() == 1 else tables.key_levels[head]
    for levels, color, name, y in ((learned, "#d62728", "learned levels", 0.0),
                                   (uniform_levels(bits), "#1f77b4", "uniform levels", -0.15)):
        fig.add_trace(go.Scatter(x=levels.numpy(), y=[y] * len(levels), mode="markers",
                                 marker=dict(symbol="line-ns-open", size=14, color=color,
                                             line=dict(width=2)), name=name), row=2, col=1)
    fig.update_xaxes(title_text="normalized value", row=2, col=1)
    tok, ch = outlier.nonzero(as_tuple=True)
    fig.add_trace(go.Scatter(x=(tok + 1).numpy(), y=ch.numpy(), mode="markers",
                             marker=dict(size=3, color="#d62728"), name="sparse outliers"),
                  row=2, col=2)
    fig.update_xaxes(title_text="token", row=2, col=2)
    fig.update_yaxes(title_text="channel", range=[-1, k_pre.shape[1]], row=2, col=2)
    errs = reconstruction_errors(kv, layer, calibration, bits)
    names = [r["method"] for r in errs]
    fig.add_trace(go.Bar(x=names, y=[r["keys"] for r in errs], name="keys",
                         marker_color="#ff7f0e"), row=2, col=3)
    fig.add_trace(go.Bar(x=names, y=[r["values"] for r in errs], name="values",
                         marker_color="#2ca02c"), row=2, col=3)
    fig.update_yaxes(title_text="relative error", row=2, col=3)
    base_layout(fig, f"layer {layer}, KV head {head}", height=720)
    return fig


def kv_explorer(kv: CapturedKV, calibration, layer: int = 10, head: int = 0, bits: int = 3):
    """Layer / head / bits controls above `explorer_figure`."""
    layers, heads = kv.keys_pre.shape[:2]
    controls = {
        "layer": W.IntSlider(value=layer, min=0, max=layers - 1, description="layer"),
        "head": W.IntSlider(value=head, min=0, max=heads - 1, description="KV head"),
        "bits": W.Dropdown(options=[2, 3, 4], value=bits, description="bits"),
    }
    return controls_and_figure(controls, lambda layer, head, bits: explorer_figure(
        kv, calibration, layer, head, bits))


def memory_figure(model: str = "llama-2-7b", chip: str = "a100", batch: int = 1) -> go.Figure:
    """Bars: the longest context whose KV cache fits next to fp16 weights, per method."""
    rows = max_context(model, chip, batch)
    fig = go.Figure(go.Bar(x=[r["method"] for r in rows], y=[r["max_context"] for r in rows],
                           text=[f"{r['max_context'] / 1000:,.0f}K tokens<br>"
                                 f"{r['bits_per_element']:.2f} bits/elem" for r in rows],
                           textposition="outside", marker_color="#1f77b4"))
    fig.update_yaxes(title_text="max context (tokens)")
    return base_layout(fig, f"{model} on {chip}, batch {batch}: longest context that fits",
                       height=420)


def memory_calculator(model: str = "llama-2-7b", chip: str = "a100", batch: int = 1):
    """Model / GPU / batch controls above `memory_figure` (shapes and chips from the roofline
    module)."""
    from workbench.roofline import chip_names, known_models

    controls = {
        "model": W.Dropdown(options=known_models(), value=model, description="model"),
        "chip": W.Dropdown(options=chip_names(), value=chip, description="GPU"),
        "batch": W.IntSlider(value=batch, min=1, max=64, description="batch"),
    }
    return controls_and_figure(controls, memory_figure)
