"""Tools (validation, coercion, timeouts, errors as observations) and the Task Fetching Unit."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from workbench.compiler.executor import TaskFetchingUnit, execute_stream
from workbench.compiler.parser import PlanParser, parse_plan
from workbench.compiler.timeline import Timeline
from workbench.compiler.tools import Tool, Toolbox, tool
from workbench.errors import WorkbenchError

DELAY = 0.2


@tool(timeout=1.0)
async def fetch(key: str, wait: float = DELAY) -> str:
    """Fetch a value after a delay.

    Args:
        key: What to fetch.
        wait: Seconds to wait.
    """
    await asyncio.sleep(wait)
    return key.upper()


@tool
def concat(a: str, b: str = "", parts: list[str] | None = None) -> str:
    """Join strings (a sync tool: runs in a thread)."""
    time.sleep(DELAY)
    return a + b + "".join(parts or [])


@tool
def boom(x: int) -> int:
    """Always fails."""
    raise RuntimeError("kaput")


BOX = Toolbox([fetch, concat, boom])


def test_tool_description_from_signature_and_docstring():
    assert fetch.signature() == "fetch(key: str, wait: float = 0.2)"
    assert "- key: What to fetch." in fetch.describe()
    assert concat.signature() == "concat(a: str, b: str = '', parts: list[str] = None)"


def test_coercion_and_validation_errors_become_observations():
    assert boom(x="3").error == "boom failed: RuntimeError: kaput"
    assert fetch(key="a", wait="0").value == "A"              # "0" -> 0.0
    assert concat(a=1, b="x").value == "1x"                    # int -> str
    obs = concat(a="x", c=1)
    assert not obs.ok and "no argument 'c'" in obs.error
    assert "missing required argument(s) ['key']" in fetch().error
    assert "must be float" in fetch(key="a", wait="soon").error
    assert "did not finish within 1.0 s" in fetch(key="a", wait=3).error


def test_schema_tools_and_bad_names():
    schema = {"name": "spotify.play", "description": "Play.", "parameters": {
        "type": "dict", "required": ["artist"], "properties": {
            "artist": {"type": "string"}, "duration": {"type": "integer"},
            "mode": {"type": "string", "enum": ["a", "b"]}}}}
    t = Tool.from_schema(schema, lambda **k: k)
    assert t.signature() == "spotify.play(artist: str, duration: int = None, mode: str = None)"
    assert t(artist="x", duration="20").value == {"artist": "x", "duration": 20}
    assert "one of ['a', 'b']" in t(artist="x", mode="c").error
    with pytest.raises(WorkbenchError, match="reserved"):
        tool(lambda: 0, name="join")


def run_plan(text, max_concurrency=8):
    async def go():
        tl = Timeline()
        tfu = TaskFetchingUnit(BOX, max_concurrency, tl)
        plan = await execute_stream([text], PlanParser(BOX), tfu)
        return plan, tfu.records, tl
    return asyncio.run(go())


def test_independent_tasks_run_in_parallel_and_dependencies_wait():
    text = ('1. fetch(key="a")\n2. fetch(key="b")\n3. fetch(key="c")\n'
            '4. concat(a="${1}+${2}", b=$3, parts=[$1, "!"])\n5. join()\n<END_OF_PLAN>')
    t0 = time.perf_counter()
    plan, records, tl = run_plan(text)
    elapsed = time.perf_counter() - t0
    assert plan.ok and records[4].result == "A+BCA!"
    assert elapsed < 3.5 * DELAY                 # 3 parallel + 1 dependent, not 4 in a row
    assert records[4].start >= max(records[i].end for i in (1, 2, 3))
    assert len([s for s in tl.spans if s.kind == "tool"]) == 4


def test_bounded_concurrency():
    text = "".join(f'{i}. fetch(key="{i}")\n' for i in range(1, 5)) + "5. join()\n"
    _, records, _ = run_plan(text, max_concurrency=2)
    starts = sorted(r.start for r in records.values() if r.start is not None)
    assert starts[2] - starts[0] > 0.8 * DELAY       # the third waited for a free slot


def test_failed_dependency_skips_dependents_never_wrong_inputs():
    text = ('1. boom(x=1)\n2. fetch(key="$1")\n3. fetch(key="ok")\n4. concat(a=$3)\n'
            '5. join()\n')
    _, records, _ = run_plan(text)
    assert records[1].status == "error" and records[2].status == "skipped"
    assert "input task 1 did not succeed" in records[2].observation.error
    assert records[2].start is None and records[4].result == "OK"


def test_type_errors_after_substitution_are_observations():
    _, records, _ = run_plan('1. fetch(key="x")\n2. boom(x=$1)\n3. join()\n')
    assert records[2].status == "error" and "must be int" in records[2].observation.error


def test_tasks_start_while_the_plan_still_streams():
    async def go():
        tl = Timeline()
        tfu = TaskFetchingUnit(BOX, 8, tl)

        async def slow_stream():
            for line in ['1. fetch(key="a")\n', '2. fetch(key="b")\n', "3. join()\n"]:
                yield line
                await asyncio.sleep(2 * DELAY)
        plan = await execute_stream(slow_stream(), PlanParser(BOX), tfu)
        return plan, tfu.records, tl
    plan, records, tl = asyncio.run(go())
    assert plan.ok and records[1].end < records[2].planned   # task 1 done before line 2 came


def test_rejected_strict_plan_runs_nothing_after_the_error():
    async def go():
        tfu = TaskFetchingUnit(BOX)
        plan = await execute_stream(['1. fetch(key="a")\n2. nope()\n3. fetch(key="b")\n'],
                                    PlanParser(BOX, "strict"), tfu)
        return plan, tfu.records
    plan, records = asyncio.run(go())
    assert plan.rejected and list(records) == [1]


def test_parse_plan_counts_plan_examples():
    assert parse_plan('1. fetch(key="a")\n2. join()\n', BOX).ok


def test_timeline_round_trips_through_its_table_and_the_h200_latency_rows_redraw():
    tl = Timeline(t0=0.0)
    tl.add("planner", "planner (round 1)", 0.0, 0.5, "llm", tokens=106)
    tl.add("tasks", "1. f(x=1)", 0.2, 2.2, "tool", idx=1, deps=[])
    again = Timeline.from_table(tl.table())
    assert again.table() == tl.table() and again.busy("tool") == tl.busy("tool")

    from workbench.compiler.benchmark import RESULTS, recorded_runs
    from workbench.widgets.plan_views import compare_figure

    lat = json.loads((RESULTS / "compiler_latency_h200.json").read_text())
    runs = recorded_runs(lat["rows"][0])
    assert runs["llmcompiler"].timeline.table() == lat["rows"][0]["llmcompiler"]["spans"]
    fig = compare_figure(runs["llmcompiler"], runs["react"])
    bars = [t for t in fig.data if t.type == "bar"]
    assert sum(len(t.x) for t in bars) == (len(lat["rows"][0]["llmcompiler"]["spans"])
                                           + len(lat["rows"][0]["react"]["spans"]))
