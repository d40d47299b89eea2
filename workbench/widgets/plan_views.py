"""Views of LLMCompiler runs: the plan as a DAG, the execution as a Gantt timeline.

    show(dag_figure(run))                      # nodes coloured by tool, outlined by state
    show(timeline_figure(run))                 # planner / tasks / joiner bars on one clock
    show(compare_figure(compiler_run, react_run))   # both timelines side by side, same scale
    run_explorer({"LLMCompiler": run1, "ReAct": run2})   # dropdowns above the figure

`run` is a workbench.compiler RunResult (or anything with `.rounds[-1].records` and
`.timeline`). Figures follow the workbench defaults (`figures.base_layout`).
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.widgets.figures import base_layout

PALETTE = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#9D755D", "#72B7B2", "#EECA3B",
           "#FF9DA6", "#79706E", "#E45756"]
STATE_STYLE = {  # status -> (marker symbol, outline colour)
    "done": ("circle", "#2E7D32"), "error": ("x", "#C62828"), "skipped": ("circle-open", "#9E9E9E"),
    "cancelled": ("circle-open", "#9E9E9E"), "waiting": ("circle-open", "#616161"),
    "running": ("circle-dot", "#1565C0")}
KIND_COLOR = {"llm": "#7E57C2", "tool": "#26A69A"}


def _records(run):
    return run.rounds[-1].records if getattr(run, "rounds", None) else getattr(run, "records", {})


def _levels(records) -> dict[int, int]:
    level: dict[int, int] = {}
    for idx in sorted(records):
        deps = records[idx].task.deps
        level[idx] = 1 + max((level.get(d, 0) for d in deps), default=0)
    return level


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def dag_figure(run, title: str | None = None, height: int = 380) -> go.Figure:
    """The last round's plan as a DAG: x = dependency level, edges from $N references."""
    records = _records(run)
    level = _levels(records)
    rows: dict[int, int] = {}
    pos = {}
    for idx in sorted(records):
        lv = level[idx]
        pos[idx] = (lv, -rows.get(lv, 0))
        rows[lv] = rows.get(lv, 0) + 1
    fig = go.Figure()
    ex, ey = [], []
    for idx, rec in records.items():
        for d in rec.task.deps:
            if d in pos:
                ex += [pos[d][0], pos[idx][0], None]
                ey += [pos[d][1], pos[idx][1], None]
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color="#BDBDBD", width=1.5),
                             hoverinfo="skip", showlegend=False))
    tools = sorted({r.task.tool for r in records.values()})
    for i, tool in enumerate(tools):
        ids = [k for k in sorted(records) if records[k].task.tool == tool]
        symbols = [STATE_STYLE.get(records[k].status, ("circle", "#000"))[0] for k in ids]
        lines = [STATE_STYLE.get(records[k].status, ("circle", "#000"))[1] for k in ids]
        hover = [f"<b>{records[k].task}</b><br>status: {records[k].status}<br>"
                 f"{_short(records[k].observation_text(120), 120)}" for k in ids]
        fig.add_trace(go.Scatter(
            x=[pos[k][0] for k in ids], y=[pos[k][1] for k in ids], mode="markers+text",
            name=tool, text=[f"{k}" for k in ids], textposition="middle center",
            textfont=dict(color="white", size=11), hovertext=hover, hoverinfo="text",
            marker=dict(size=28, color=PALETTE[i % len(PALETTE)], symbol=symbols,
                        line=dict(color=lines, width=3))))
    base_layout(fig, title or "Plan DAG (x: dependency level; colour: tool; outline: state)",
                height)
    fig.update_xaxes(title="level", dtick=1, showgrid=False, zeroline=False)
    fig.update_yaxes(visible=False)
    return fig


def _timeline_traces(run, prefix: str = ""):
    """One horizontal bar per span; rows: LLM calls and each task in start order."""
    spans = sorted(run.timeline.spans, key=lambda s: s.start)
    traces = []
    for kind in ("llm", "tool"):
        sel = [s for s in spans if s.kind == kind]
        if not sel:
            continue
        traces.append(go.Bar(
            y=[f"{prefix}{_short(s.label, 34)}" for s in sel], x=[s.seconds for s in sel],
            base=[s.start for s in sel], orientation="h",
            marker=dict(color=KIND_COLOR.get(kind, "#888")), name="LLM call" if kind == "llm"
            else "tool call", hovertext=[f"{s.label}<br>{s.start:.2f}-{s.end:.2f} s" for s in sel],
            hoverinfo="text", legendgroup=kind))
    planned = [s for s in spans if "planned" in s.meta]
    if planned:
        traces.append(go.Scatter(
            x=[s.meta["planned"] for s in planned], y=[f"{prefix}{_short(s.label, 34)}"
                                                      for s in planned],
            mode="markers", marker=dict(symbol="line-ns-open", size=14, color="#424242"),
            name="line parsed", legendgroup="planned"))
    order = [f"{prefix}{_short(s.label, 34)}" for s in spans]
    return traces, list(dict.fromkeys(order))


def timeline_figure(run, title: str | None = None, height: int | None = None) -> go.Figure:
    """Gantt chart of one run: every LLM call and tool call on the run's clock (seconds)."""
    traces, order = _timeline_traces(run)
    fig = go.Figure(traces)
    base_layout(fig, title or f"{run.agent}: {run.seconds:.1f} s end to end",
                height or 140 + 28 * len(order))
    fig.update_layout(barmode="overlay")
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    fig.update_xaxes(title="seconds")
    return fig


def compare_figure(*runs, title: str | None = None) -> go.Figure:
    """Timelines of several runs side by side on the same time scale (e.g. LLMCompiler, ReAct)."""
    fig = make_subplots(rows=1, cols=len(runs), shared_xaxes=True, horizontal_spacing=0.18,
                        subplot_titles=[f"{r.agent}: {r.seconds:.1f} s" for r in runs])
    rows = 0
    for i, run in enumerate(runs, 1):
        traces, order = _timeline_traces(run)
        rows = max(rows, len(order))
        for t in traces:
            t.showlegend = i == 1
            fig.add_trace(t, row=1, col=i)
        fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], row=1, col=i)
    end = max(r.seconds for r in runs) * 1.02
    fig.update_xaxes(range=[0, end], title="seconds")
    base_layout(fig, title or "Same question, same model and tools", 160 + 26 * rows)
    fig.update_layout(barmode="overlay")
    return fig


def dag_and_timeline(run, title: str | None = None) -> go.Figure:
    """The plan's DAG and the run's timeline side by side."""
    dag, (traces, order) = dag_figure(run), _timeline_traces(run)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65], horizontal_spacing=0.2,
                        subplot_titles=["plan DAG", f"timeline ({run.seconds:.1f} s)"])
    for t in dag.data:
        fig.add_trace(t, row=1, col=1)
    for t in traces:
        fig.add_trace(t, row=1, col=2)
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_xaxes(dtick=1, title="level", row=1, col=1)
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1], row=1, col=2)
    fig.update_xaxes(title="seconds", row=1, col=2)
    base_layout(fig, title or f"{run.agent}: {run.question[:70]}", 160 + 28 * len(order))
    fig.update_layout(barmode="overlay")
    return fig


def run_explorer(runs: dict):
    """Pick a run and a view (DAG + timeline, or all timelines side by side) from dropdowns."""
    import ipywidgets as W

    from workbench.widgets.layout import controls_and_figure

    controls = {"run": W.Dropdown(options=list(runs), description="run"),
                "view": W.Dropdown(options=["DAG + timeline", "compare timelines"],
                                   description="view")}

    def draw(run, view):
        if view == "compare timelines":
            return compare_figure(*runs.values())
        return dag_and_timeline(runs[run])

    return controls_and_figure(controls, draw)
