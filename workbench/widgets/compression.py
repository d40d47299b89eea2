"""Views for prompt compression: the quality / latency / tokens-saved trade-off, and what each
method keeps from the same passage.

    tradeoff_view(result["table"])             # controls (metric, task) above a method x ratio plot
    kept_view(document, {name: CompressionResult})   # HTML: kept text highlighted per method
"""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from workbench.widgets.figures import base_layout
from workbench.widgets.layout import controls_and_figure

METRICS = {
    "retention": "answer/evidence kept in the prompt (fraction)",
    "local_score": "reader score (accuracy; ROUGE-L F1 for summary)",
    "compressor_s": "compressor time per call (s)",
    "tokens_saved": "tokens saved (fraction of the prompt)",
}
FAMILY_DASH = {"extractive": "solid", "token": "dash", "abstractive": "dot", "baseline": "dashdot",
               "none": "solid"}


def _value(row: dict, metric: str):
    if metric == "tokens_saved":
        return 1 - 1 / row["achieved_ratio"]
    return row.get(metric)


def tradeoff_figure(table: list[dict], metric: str = "retention", task: str = "all") -> go.Figure:
    """One line per method: `metric` (mean over the chosen task's items, or over all tasks)
    against the requested ratio; the uncompressed reference as a horizontal line."""
    rows = [r for r in table if task == "all" or r["task"] == task]
    fig = go.Figure()
    methods = sorted({r["method"] for r in rows if r["method"] != "none"})
    for m in methods:
        pts: dict[float, list] = {}
        fam = "extractive"
        for r in rows:
            v = _value(r, metric)
            if r["method"] == m and v is not None:
                pts.setdefault(r["ratio"], []).append(v)
                fam = r["family"]
        if pts:
            xs = sorted(pts)
            fig.add_trace(go.Scatter(x=xs, y=[sum(pts[x]) / len(pts[x]) for x in xs],
                                     mode="lines+markers", name=m,
                                     line=dict(dash=FAMILY_DASH.get(fam, "solid"))))
    ref = [_value(r, metric) for r in rows if r["method"] == "none"]
    ref = [v for v in ref if v is not None]
    if ref and metric not in ("compressor_s", "tokens_saved"):
        fig.add_hline(y=sum(ref) / len(ref), line=dict(color="gray", dash="dot"),
                      annotation_text="no compression")
    base_layout(fig, f"{METRICS.get(metric, metric)} vs ratio ({task})", height=440)
    fig.update_xaxes(title="requested compression ratio (x)", type="log")
    fig.update_yaxes(title=metric, type="log" if metric == "compressor_s" else "linear")
    return fig


def tradeoff_view(table: list[dict]):
    """Controls (metric, task) above the trade-off figure (static figure when headless)."""
    tasks = ["all", *sorted({r["task"] for r in table})]
    controls = {"metric": W.Dropdown(options=list(METRICS), value="retention",
                                     description="metric"),
                "task": W.Dropdown(options=tasks, value="all", description="task")}
    return controls_and_figure(controls, lambda metric, task: tradeoff_figure(table, metric, task))


def highlight(document: str, spans: list[tuple[int, int]],
              drop_attr: str = 'style="color:#aaa"',
              mark_attr: str = 'style="background:#ffe58a"') -> str:
    """HTML of the document with kept `spans` (character ranges) in <mark> and dropped text
    greyed. The attributes style both; the app passes CSS classes instead of inline styles."""
    mark_open = f"<mark {mark_attr}>" if mark_attr else "<mark>"
    out, at = [], 0
    for a, b in spans:
        out.append(f"<span {drop_attr}>{html.escape(document[at:a])}</span>")
        out.append(f"{mark_open}{html.escape(document[a:b])}</mark>")
        at = b
    out.append(f"<span {drop_attr}>{html.escape(document[at:])}</span>")
    return "".join(out)


def kept_view(document: str, results: dict, max_chars: int = 2500):
    """Side-by-side columns: for each method, its counts and the document with kept text marked
    (abstractive summaries, which keep nothing verbatim, show their text)."""
    from IPython.display import HTML

    cols = []
    for name, r in results.items():
        body = (highlight(document[:max_chars], [(a, min(b, max_chars)) for a, b in r.kept_spans
                                                 if a < max_chars])
                if r.kept_spans else f"<i>summary:</i> {html.escape(r.text)}")
        cols.append(f'<div style="flex:1 0 260px;border:1px solid #ddd;padding:6px">'
                    f"<b>{html.escape(name)}</b><br><small>{r.compressed_tokens}/"
                    f"{r.original_tokens} tokens, {r.achieved_ratio:.2f}x</small>"
                    f'<pre style="white-space:pre-wrap;font-size:11px">{body}</pre></div>')
    return HTML(f'<div style="display:flex;gap:8px;overflow-x:auto">{"".join(cols)}</div>')
