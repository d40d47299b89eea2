"""What ran when: spans of LLM calls and tool calls on one clock, for the Gantt view.

    tl = Timeline()
    with tl.span("planner", "plan", kind="llm"):
        ...
    tl.add("task", "1. search(...)", start, end, kind="tool")   # times from tl.now()
    tl.total, tl.busy("llm"), tl.table()

Times are seconds since the timeline was created (time.perf_counter based).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Span:
    """One bar: `lane` (row in the Gantt chart), `label`, `kind` ("llm" | "tool" | ...)."""

    lane: str
    label: str
    start: float
    end: float
    kind: str = "tool"
    meta: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Timeline:
    """Spans on a common clock that starts at creation (or at `t0` if given)."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.perf_counter() if t0 is None else t0
        self.spans: list[Span] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, lane: str, label: str, start: float, end: float, kind: str = "tool",
            **meta) -> Span:
        span = Span(lane, label, start, end, kind, meta)
        self.spans.append(span)
        return span

    @contextmanager
    def span(self, lane: str, label: str, kind: str = "llm", **meta):
        """Time a block; the Span is yielded so that its meta can be filled in inside."""
        span = Span(lane, label, self.now(), self.now(), kind, dict(meta))
        try:
            yield span
        finally:
            span.end = self.now()
            self.spans.append(span)

    @property
    def total(self) -> float:
        """Seconds from the clock's start to the end of the last span."""
        return max((s.end for s in self.spans), default=0.0)

    def busy(self, kind: str) -> float:
        """Sum of the durations of spans of one kind (overlaps counted twice)."""
        return sum(s.seconds for s in self.spans if s.kind == kind)

    @classmethod
    def from_table(cls, rows: list[dict]) -> Timeline:
        """The inverse of `table()`: a timeline from saved rows (e.g. a benchmark's JSON)."""
        tl = cls(t0=0.0)
        for r in rows:
            meta = {k[5:]: v for k, v in r.items() if k.startswith("meta_")}
            tl.add(r["lane"], r["label"], r["start"], r["end"], r["kind"], **meta)
        return tl

    def table(self) -> list[dict]:
        """Rows: lane, label, kind, start and end (s), and meta_* fields."""
        rows = []
        for s in sorted(self.spans, key=lambda s: s.start):
            row = {"lane": s.lane, "label": s.label, "kind": s.kind,
                   "start": round(s.start, 3), "end": round(s.end, 3)}
            row.update({f"meta_{k}": (round(v, 3) if isinstance(v, float) else v)
                        for k, v in s.meta.items()})
            rows.append(row)
        return rows
