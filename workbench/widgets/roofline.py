"""Roofline views: the roofline with every operation as a point, memory bars, KV-bits and trends.

    show(roofline_figure([analyze("llama-2-7b", "h200", phase="decode"),
                          analyze("llama-2-7b", "h200", phase="prefill")]))
    roofline_explorer()           # controls: chip(s), model, phase, batch, context, bits, flash
    show(kv_bits_figure(kv_bits_gain("llama-3-8b", "h200", context=32768)))

Axes: arithmetic intensity (FLOP/byte) against FLOP/s, both logarithmic. A chip's roof is
min(peak FLOP/s, intensity x bandwidth); measured roofs are dashed. An op's point sits at its
intensity and the FLOP/s it attains in the predicted time (so ops under the per-op latency sit
below the roof); its size grows with its share of the pass's time. Hover shows FLOPs, bytes,
intensity and time. Measured points (stars) use the same coordinates from measured times.
"""

from __future__ import annotations

import math

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.roofline.analysis import Analysis, analyze
from workbench.roofline.hardware import Chip, chip_names, get_chip
from workbench.roofline.shapes import known_models
from workbench.roofline.trends import Growth
from workbench.roofline.units import seconds, si
from workbench.widgets.figures import base_layout
from workbench.widgets.layout import controls_and_figure

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#17becf", "#7f7f7f", "#bcbd22")
X_RANGE = (0.05, 2e4)  # FLOP/byte


def _roof_trace(chip: Chip, bits: float, color: str, row=None) -> go.Scatter:
    peak, bw = chip.flops_for(bits), chip.bandwidth
    ridge = peak / bw
    xs = [X_RANGE[0], ridge, X_RANGE[1]]
    return go.Scatter(x=xs, y=[min(peak, x * bw) for x in xs], mode="lines",
                      name=f"{chip.name} (ridge {ridge:.0f})",
                      line=dict(color=color, dash="dash" if chip.measured else "solid"),
                      hovertemplate=f"{chip.name}<br>peak {si(peak, 'FLOP/s')}<br>"
                                    f"bandwidth {si(bw, 'B/s')}<br>ridge {ridge:.0f} FLOP/B"
                                    "<extra></extra>")


def _label(a: Analysis) -> str:
    wl, b = a.workload, a.bits
    return (f"{a.shape.name} {wl.phase} b{wl.batch} ctx{wl.context} "
            f"W{b.w:g}A{b.a:g}KV{b.kv:g}{'' if a.flash else ' unfused'} on {a.chip.key}")


def _op_trace(a: Analysis, color: str, symbol: str = "circle") -> go.Scatter:
    by_name: dict[str, list] = {}
    for c in a.costs:
        r = by_name.setdefault(c.op.name, [0.0, 0.0, 0.0, c.bound, c.op.group])
        r[0] += c.op.flops * c.op.count
        r[1] += c.op.bytes * c.op.count
        r[2] += c.total_time
    total = a.time
    xs, ys, sizes, texts = [], [], [], []
    for name, (flops, nbytes, t, bound, group) in by_name.items():
        if flops <= 0 or nbytes <= 0:
            continue  # pure data movement (lookups, cache writes) has no point on a roofline
        xs.append(flops / nbytes)
        ys.append(flops / t)
        sizes.append(6 + 30 * math.sqrt(t / total))
        texts.append(f"<b>{name}</b> ({group})<br>{si(flops, 'FLOP')}, {si(nbytes, 'B')}<br>"
                     f"{flops / nbytes:.3g} FLOP/B, {seconds(t)} ({100 * t / total:.1f}%), "
                     f"{bound}-bound")
    return go.Scatter(x=xs, y=ys, mode="markers", name=_label(a),
                      marker=dict(size=sizes, color=color, symbol=symbol, opacity=0.75,
                                  line=dict(width=1, color="white")),
                      hovertext=texts, hoverinfo="text")


def _pass_trace(a: Analysis, color: str) -> go.Scatter:
    return go.Scatter(x=[a.intensity], y=[a.flops / a.time], mode="markers", showlegend=False,
                      marker=dict(size=16, color=color, symbol="diamond-open",
                                  line=dict(width=3)),
                      hovertext=[f"<b>whole pass</b>: {_label(a)}<br>{si(a.flops, 'FLOP')}, "
                                 f"{si(a.bytes, 'B')}, {a.intensity:.3g} FLOP/B<br>"
                                 f"{seconds(a.time)}, {a.tokens_per_s:,.0f} tok/s, {a.bound}-bound"],
                      hoverinfo="text")


def _measured_trace(points: list[dict]) -> go.Scatter:
    """points: {label, flops, bytes, seconds} -> stars at measured FLOP/s."""
    return go.Scatter(
        x=[p["flops"] / p["bytes"] for p in points],
        y=[p["flops"] / p["seconds"] for p in points], mode="markers", name="measured",
        marker=dict(size=13, symbol="star", color="black"),
        hovertext=[f"<b>measured</b> {p['label']}<br>{seconds(p['seconds'])}, "
                   f"{si(p['flops'] / p['seconds'], 'FLOP/s')}" for p in points],
        hoverinfo="text")


def add_roofline(fig: go.Figure, analyses: list[Analysis], chips=None, measured=None,
                 row=None, col=None) -> go.Figure:
    """Draw roofs, op points, whole-pass diamonds and measured stars into `fig`."""
    chips = [get_chip(c) for c in chips] if chips else list({a.chip.key: a.chip
                                                           for a in analyses}.values())
    bits = analyses[0].bits.a if analyses else 16
    kw = {} if row is None else {"row": row, "col": col}
    for i, chip in enumerate(chips):
        fig.add_trace(_roof_trace(chip, bits, "#555" if i == 0 else COLORS[-1 - i % 4]), **kw)
    for i, a in enumerate(analyses):
        color = COLORS[i % len(COLORS)]
        fig.add_trace(_op_trace(a, color), **kw)
        fig.add_trace(_pass_trace(a, color), **kw)
    if measured:
        fig.add_trace(_measured_trace(measured), **kw)
    fig.update_xaxes(type="log", title_text="arithmetic intensity (FLOP/byte)",
                     range=[math.log10(X_RANGE[0]), math.log10(X_RANGE[1])], **kw)
    fig.update_yaxes(type="log", title_text="attainable FLOP/s", **kw)
    return fig


def roofline_figure(analyses, chips=None, measured=None, title: str | None = None,
                    height: int = 480) -> go.Figure:
    """Roofline of one or more analyses; `chips` adds roofs; `measured` adds star points."""
    analyses = [analyses] if isinstance(analyses, Analysis) else list(analyses)
    fig = add_roofline(go.Figure(), analyses, chips, measured)
    return base_layout(fig, title or "Roofline: every operation of the pass", height)


def add_memory_bars(fig: go.Figure, analyses: list[Analysis], row=None, col=None,
                    legend: bool = True) -> go.Figure:
    """Stacked bars (GB) of weights, KV cache and activations, with each chip's usable memory."""
    kw = {} if row is None else {"row": row, "col": col}
    names = [f"{a.shape.name} {a.workload.phase} b{a.workload.batch} ctx{a.workload.context} "
             f"W{a.bits.w:g} KV{a.bits.kv:g} on {a.chip.key}" for a in analyses]
    for part, color in (("weights", "#1f77b4"), ("kv_cache", "#d62728"),
                        ("activations", "#2ca02c")):
        fig.add_trace(go.Bar(y=names, x=[getattr(a.memory, part) / 1e9 for a in analyses],
                             orientation="h", name=part.replace("_", " "), marker_color=color,
                             showlegend=legend, hovertemplate="%{x:.3g} GB<extra>" + part +
                             "</extra>"), **kw)
    for cap in sorted({a.memory.capacity for a in analyses}):
        fig.add_vline(x=cap / 1e9, line_dash="dot", line_color="black", **kw)
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="GB (dotted: usable memory)", **kw)
    return fig


def memory_figure(analyses, title: str | None = None) -> go.Figure:
    """Memory breakdown of one or more analyses against usable memory."""
    analyses = [analyses] if isinstance(analyses, Analysis) else list(analyses)
    fig = add_memory_bars(go.Figure(), analyses)
    return base_layout(fig, title or "Memory: weights + KV cache + activations",
                       140 + 40 * len(analyses))


def kv_bits_figure(rows: list[dict], title: str | None = None) -> go.Figure:
    """Bars of decode tokens/s and of the longest context that fits, per KV-cache width
    (rows from `workbench.roofline.kv_bits_gain`)."""
    labels = [f"{r['kv_bits']:g}-bit" for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode tokens/s", "longest context "
                                                        "that fits"))
    fig.add_trace(go.Bar(x=labels, y=[r["tok/s"] for r in rows], marker_color="#1f77b4",
                         text=[f"{r['speedup']:.2f}x" for r in rows], textposition="outside",
                         showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=[r["max context"] for r in rows], marker_color="#d62728",
                         text=[f"{r['max context']:,}" for r in rows], textposition="outside",
                         showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="KV cache bits per element")
    return base_layout(fig, title or "What a lower-bit KV cache buys", 380)


def trends_figure(growths: dict[str, Growth], title: str | None = None) -> go.Figure:
    """Each series normalized to its fitted value at its first year, with the fitted line;
    the legend gives the fitted growth per two years."""
    fig = go.Figure()
    for i, (name, g) in enumerate(growths.items()):
        color = COLORS[i % len(COLORS)]
        base = g.at(g.first_year)
        fig.add_trace(go.Scatter(x=[p.year for p in g.points], y=[p.value / base for p in g.points],
                                 mode="markers", marker=dict(color=color, size=8),
                                 name=f"{name}: {g.per_2_years:.2g}x / 2 yrs",
                                 hovertext=[f"{p.label} ({p.year:.1f}): {p.value:.3g}"
                                            for p in g.points], hoverinfo="text"))
        xs = [g.first_year, g.last_year]
        fig.add_trace(go.Scatter(x=xs, y=[g.at(x) / base for x in xs], mode="lines",
                                 line=dict(color=color), showlegend=False, hoverinfo="skip"))
    fig.update_yaxes(type="log", title_text="growth (fitted value at first year = 1)")
    fig.update_xaxes(title_text="year")
    return base_layout(fig, title or "Scaling trends, fitted from dated tables", 460)


def comparison_figure(rows: list[dict], title: str | None = None) -> go.Figure:
    """Predicted against measured time (log-log), with the y = x line and a +-20% band.
    rows: dicts with 'measured ms', 'predicted ms' and a label from phase/batch/context."""
    fig = go.Figure()
    lo = min(min(r["measured ms"], r["predicted ms"]) for r in rows) / 1.5
    hi = max(max(r["measured ms"], r["predicted ms"]) for r in rows) * 1.5
    for f, dash in ((1.0, "solid"), (1.2, "dot"), (1 / 1.2, "dot")):
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo * f, hi * f], mode="lines", showlegend=False,
                                 line=dict(color="#999", dash=dash), hoverinfo="skip"))
    for i, phase in enumerate(sorted({r["phase"] for r in rows})):
        sub = [r for r in rows if r["phase"] == phase]
        fig.add_trace(go.Scatter(
            x=[r["measured ms"] for r in sub], y=[r["predicted ms"] for r in sub],
            mode="markers", name=phase, marker=dict(size=10, color=COLORS[i]),
            hovertext=[f"{r.get('model', '')} {phase} b{r['batch']} ctx{r['context']}: "
                       f"ratio {r['ratio']}" for r in sub], hoverinfo="text"))
    fig.update_xaxes(type="log", title_text="measured ms")
    fig.update_yaxes(type="log", title_text="predicted ms")
    return base_layout(fig, title or "Predicted vs measured (dotted: +-20%)", 420)


def roofline_explorer(models=None, chips=None, default_model: str = "llama-2-7b",
                      default_chips=("h200", "a100")):
    """Interactive roofline + memory breakdown: choose chip(s), model, phase, batch, context,
    weight/activation/KV bits and FlashAttention tiling."""
    models = list(models or known_models())
    chips = list(chips or chip_names())
    powers = [2 ** i for i in range(0, 18)]
    controls = {
        "model": W.Dropdown(options=models, value=default_model, description="model"),
        "chips": W.SelectMultiple(options=chips, value=tuple(default_chips), rows=4,
                                  description="chips"),
        "phase": W.ToggleButtons(options=["decode", "prefill"], value="decode",
                                 description="phase"),
        "batch": W.SelectionSlider(options=powers[:11], value=1, description="batch"),
        "context": W.SelectionSlider(options=powers[4:], value=4096, description="context"),
        "w_bits": W.Dropdown(options=[16, 8, 4, 3], value=16, description="W bits"),
        "a_bits": W.Dropdown(options=[16, 8], value=16, description="A bits"),
        "kv_bits": W.Dropdown(options=[16, 8, 4, 3, 2], value=16, description="KV bits"),
        "flash": W.Checkbox(value=True, description="FlashAttention tiling"),
    }

    def draw(model, chips, phase, batch, context, w_bits, a_bits, kv_bits, flash):
        return explorer_figure(model, chips, phase, batch, context, w_bits, a_bits, kv_bits, flash)

    return controls_and_figure(controls, draw)


def explorer_figure(model="llama-2-7b", chips=("h200",), phase="decode", batch=1, context=4096,
                    w_bits=16, a_bits=16, kv_bits=16, flash=True) -> go.Figure:
    """The explorer's figure for one setting: roofline (left), memory per chip (right)."""
    from workbench.roofline.shapes import model_shape

    shape = model_shape(model)
    chips = list(chips) or ["h200"]
    if not shape.is_decoder:
        phase = "encode"
    analyses = [analyze(shape, c, phase=phase, batch=batch, context=context, w_bits=w_bits,
                        a_bits=a_bits, kv_bits=kv_bits, flash=flash) for c in chips]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32],
                        subplot_titles=("roofline (hover the points)", "memory (GB)"))
    add_roofline(fig, analyses[:1], chips, row=1, col=1)
    add_memory_bars(fig, analyses, row=1, col=2)
    a = analyses[0]
    title = (f"{shape.name}, {phase}: {a.intensity:.3g} FLOP/B vs ridge {a.ridge:.0f} on "
             f"{a.chip.key}; {seconds(a.time)} per pass, {a.tokens_per_s:,.0f} tok/s; "
             f"max batch {a.max_batch:,}")
    return base_layout(fig, title, 520)
