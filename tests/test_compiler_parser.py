"""Plan parser: grammar, references, problems reported, and property tests on arbitrary text."""

from __future__ import annotations

import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.compiler.parser import (
    END_MARKER,
    PlanParser,
    Ref,
    Task,
    check_dag,
    parse_arguments,
    parse_plan,
    substitute,
)
from workbench.compiler.tools import Toolbox, tool


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@tool
def search(query: str, limit: int = 3) -> str:
    """Search the web."""
    return query


BOX = Toolbox([add, search])


def test_good_plan_with_thoughts_refs_and_join():
    text = ('Thought: two searches first\n1. search(query="cheetah speed")\n'
            '2. search("pronghorn speed", limit=2)\n3. add(a=$1, b=${2})\n'
            '4. search(query="${1}+${2} and $3")\nThought: done\n5. join()\n' + END_MARKER)
    plan = parse_plan(text, BOX)
    assert plan.ok and plan.ended and not plan.issues
    assert [t.idx for t in plan.calls] == [1, 2, 3, 4]
    assert plan.tasks[1].thought == "two searches first"
    assert plan.tasks[2].args == ["pronghorn speed"] and plan.tasks[2].kwargs == {"limit": 2}
    assert plan.tasks[3].kwargs == {"a": Ref(1), "b": Ref(2)} and plan.tasks[3].deps == (1, 2)
    assert plan.tasks[4].deps == (1, 2, 3)
    assert plan.tasks[5].is_join and plan.tasks[5].deps == (1, 2, 3, 4)


def test_multi_reference_substitution_longest_index_first():
    results = {1: 3, 2: "x", 10: 7.5}
    assert substitute("${1}+${2}", results) == "3+x"
    assert substitute("$10 vs $1", results) == "7.5 vs 3"
    assert substitute({"k": [Ref(10), "$2$1"]}, results) == {"k": [7.5, "x3"]}


def test_streaming_emits_each_task_as_its_line_completes():
    parser = PlanParser(BOX)
    assert parser.feed('1. search(query="a")') == []          # line not complete yet
    events = parser.feed('\n2. search(que')
    assert [e.idx for e in events if isinstance(e, Task)] == [1]
    events = parser.feed('ry="b")\n3. join()\n<END_OF')
    assert [e.idx for e in events if isinstance(e, Task)] == [2, 3]
    parser.feed("_PLAN>\n4. add(a=1, b=2)\n")
    assert parser.plan.ended and len(parser.plan.calls) == 2


def kinds(text, mode="repair"):
    return [i.kind for i in parse_plan(text, BOX, mode).issues]


def test_problems_are_reported_and_dependents_dropped():
    text = ("1. add(a=1, b=2)\n2. nope(x=1)\n3. add(a=$2, b=1)\n4. add(a=$9, b=1)\n"
            "4. add(a=2, b=2)\n5. add(a=1, b=2)\n6. add(a=__import__('os'), b=1)\n"
            "7. add(a=1)\n8. add(a='x', b=1)\n9. add(a=1, b=2, c=3)\n10. add(a=$5, b=$1)\n"
            "11. join()\n")
    plan = parse_plan(text, BOX)
    assert [i.kind for i in plan.issues] == [
        "unknown_tool", "dependency_dropped", "forward_ref", "duplicate_id", "duplicate_task",
        "malformed", "arguments", "arguments", "arguments"]
    assert [t.idx for t in plan.calls] == [1, 10]
    assert plan.tasks[10].kwargs == {"a": Ref(1), "b": Ref(1)}   # $5 repeated $1: aliased
    assert not plan.ok and plan.joined
    msg = str(plan.issues[0])
    assert "line 2" in msg and "unknown tool 'nope'" in msg


def test_strict_mode_rejects_at_first_error():
    parser = PlanParser(BOX, mode="strict")
    events = parser.feed("1. add(a=1, b=2)\n2. add(a=$3, b=1)\n3. add(a=1, b=5)\n4. join()\n")
    assert [e.idx for e in events if isinstance(e, Task)] == [1]
    assert parser.plan.rejected and not parser.plan.ok


def test_missing_join_and_prose_lines():
    assert kinds("Here is the plan:\n1. add(a=1, b=2)\n") == ["ignored", "no_join"]
    assert parse_plan("```\n1. add(a=1, b=2)\n2. join()\n```", BOX).ok


def test_cycles_and_missing_tasks_in_external_dags():
    assert check_dag({1: (), 2: (1,), 3: (2,)}) == []
    assert check_dag({1: (3,), 2: (1,), 3: (2,)}) == ["cycle: 1 -> 3 -> 2 -> 1"]
    assert check_dag({1: (7,)}) == ["task 1 depends on missing task 7"]


def test_arguments_are_literals_only():
    assert parse_arguments('1, "a", x=[1, {"k": (2, 3)}], y=-2.5, z=true') == (
        [1, "a"], {"x": [1, {"k": [2, 3]}], "y": -2.5, "z": True})
    for bad in ("x=open('f')", "x=1+1", "x=a.b", "**d", "*l", "x=lambda: 1", "x=[i for i in y]",
                'x=f"{1}"', "x=(yield)", "x=$", "x=$1abc"):
        try:
            parse_arguments(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_deeply_nested_input_does_not_crash():
    plan = parse_plan("1. add(a=" + "[" * 5000 + "]" * 5000 + ", b=1)\n2. join()\n", BOX)
    assert plan.issues and plan.issues[0].kind == "malformed"


# --------------------------------------------------------------------------------------------
# Properties: never crash, never execute anything, on any text

SENTINEL = "/tmp/workbench_parser_pwned"
ALPHABET = string.printable + "$¥é字\u2028"
PIECES = ["1. ", "2. ", "add(", "search(", "a=", "b=", "query=", "$1", "${2}", '"', "'", ")",
          "(", "[", "]", "{", "}", ",", "\n", "join()", END_MARKER, "Thought: ", "__import__",
          f"open('{SENTINEL}', 'w')", "os.system('touch " + SENTINEL + "')", "=", "\\", "3.5",
          "True", "lambda: 0", "**", "*"]


def _check(plan):
    def literal(v):
        if isinstance(v, (list, tuple)):
            return all(literal(x) for x in v)
        if isinstance(v, dict):
            return all(literal(k) and literal(x) for k, x in v.items())
        return isinstance(v, (str, bytes, int, float, complex, bool, type(None), Ref))

    for t in plan.tasks.values():
        assert literal(t.args) and literal(t.kwargs)
        assert all(d in plan.tasks and d < t.idx for d in t.deps if not t.is_join)
    assert not os.path.exists(SENTINEL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=ALPHABET, max_size=400))
def test_property_arbitrary_text(text):
    _check(parse_plan(text, BOX))
    _check(parse_plan(text, None, mode="strict"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=60), st.integers(1, 7))
def test_property_plan_like_text_streamed_in_chunks(pieces, chunk):
    text = "".join(pieces)
    parser = PlanParser(BOX)
    for i in range(0, len(text), chunk):
        parser.feed(text[i:i + chunk])
    parser.close()
    _check(parser.plan)
    whole = parse_plan(text, BOX)
    assert [str(t) for t in whole.calls] == [str(t) for t in parser.plan.calls]


VALUES = st.recursive(
    st.one_of(st.integers(-10**6, 10**6), st.text(ALPHABET.replace("$", ""), max_size=12),
              st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(VALUES, VALUES, st.lists(st.integers(1, 8), max_size=2)),
                min_size=1, max_size=6))
def test_property_rendered_plans_parse_back(rows):
    """A plan built from random literal values and back references renders and parses back."""
    from workbench.compiler.parser import _show

    lines = []
    for i, (x, y, refs) in enumerate(rows, 1):
        refs = [r for r in refs if r < i]
        y = Ref(refs[0]) if refs else y
        lines.append(f"{i}. f(x={_show(x)}, y={_show(y)})")
    text = "\n".join(lines) + f"\n{len(rows) + 1}. join()\n{END_MARKER}"
    plan = parse_plan(text)
    assert not plan.errors, plan.issues
    aliased = sum(i.kind in ("duplicate_task", "near_duplicate") for i in plan.issues)
    assert len(plan.tasks) + aliased == len(rows) + 1
