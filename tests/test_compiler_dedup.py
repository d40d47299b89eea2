"""Near-duplicate calls: recognized by dedup, refused by the grammar, aliased by the parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_compiler_grammar import BOX, generate

from workbench.compiler.dedup import near_duplicate
from workbench.compiler.grammar import PlanGrammar
from workbench.compiler.parser import END_MARKER, parse_plan
from workbench.compiler.tools import Tool, Toolbox


def _schema(name, props, required):
    return {"name": name, "description": name, "parameters": {
        "type": "dict", "properties": props, "required": required}}


UNIT = Toolbox([Tool.from_schema(_schema("weigh", {
    "particle": {"type": "string"}, "unit": {"type": "string", "default": "g"},
    "exact": {"type": "boolean", "default": False}}, ["particle"]), lambda **k: k)])


def test_what_counts_as_a_near_duplicate():
    f = "f"
    assert near_duplicate((f, {"u": "g, "}), (f, {"u": "g,"})) == "same call"
    assert near_duplicate((f, {"a": 1, "b": "x"}), (f, {"b": "x", "a": 1.0})) == "same call"
    assert "extended" in near_duplicate((f, {"x": "2x+5.00"}), (f, {"x": "2x+5"}))
    assert "default" in near_duplicate((f, {"x": 1, "u": "km"}), (f, {"x": 1}), {"u": "km"})
    # real requests: other numbers, other case, a non-default extra argument, other tools
    assert near_duplicate((f, {"rate": 0.025}), (f, {"rate": 0.02})) is None
    assert near_duplicate((f, {"n": 50}), (f, {"n": 5})) is None
    assert near_duplicate((f, {"g": "Aa"}), (f, {"g": "AA"})) is None
    assert near_duplicate((f, {"x": 1, "u": "mi"}), (f, {"x": 1}), {"u": "km"}) is None
    assert near_duplicate(("g", {"x": 1}), (f, {"x": 1})) is None


def test_grammar_refuses_near_duplicate_lines():
    g = PlanGrammar(UNIT)
    first = '1. weigh(particle="proton", unit="g,")\n'
    for bad in ['2. weigh(particle="proton", unit="g, ")', '2. weigh(unit="g,", particle="proton")',
                '2. weigh(particle="proton", unit="g,", exact=False)',
                '2. weigh(particle="protons", unit="g,")', '2. weigh(particle="proton")']:
        assert g.advance(g.initial(), first + bad) is None, bad
    for ok in ['2. weigh(particle="electron", unit="g,")', '2. weigh(particle="proton", unit="kg")',
               '2. weigh(particle="proton", unit="g,", exact=True)']:
        assert g.advance(g.initial(), first + ok) is not None, ok


def test_dead_string_is_refused_before_it_is_written():
    """weigh(particle=..., unit=..., exact=...) with every argument used: once the last string
    has reached an earlier line's value, no continuation escapes; the grammar stops it there."""
    g = PlanGrammar(UNIT)
    head = '1. weigh(particle="proton", exact=True, unit="kg")\n2. weigh(particle="proton", exact=True, unit="'
    assert g.advance(g.initial(), head + "k") is not None          # may still become "km"
    assert g.advance(g.initial(), head + "kg") is None             # "kg...": always a repeat


def test_parser_aliases_near_duplicates():
    plan = parse_plan('1. weigh(particle="proton", unit="g,")\n2. weigh(particle="proton", '
                      'unit="g, ")\n3. weigh(particle="neutron")\n4. join()\n' + END_MARKER, UNIT)
    assert [t.idx for t in plan.calls] == [1, 3] and plan.ok
    assert [i.kind for i in plan.issues] == ["near_duplicate"]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_property_constrained_plans_have_no_near_duplicates(seed):
    grammar = PlanGrammar(BOX, max_tasks=6, max_string=6, max_items=2)
    text, proc = generate(grammar, seed, 400)
    plan = parse_plan(text, BOX)
    assert plan.ok and not plan.issues, (text, plan.issues, proc.stats)
    calls = plan.calls
    for i, a in enumerate(calls):
        for b in calls[:i]:
            assert near_duplicate((a.tool, a.kwargs), (b.tool, b.kwargs)) is None, text


def test_list_that_can_only_extend_an_earlier_one_is_refused():
    box = Toolbox([Tool.from_schema(_schema("pick", {
        "team": {"type": "string"}, "seasons": {"type": "array", "items": {"type": "string"}}},
        ["team", "seasons"]), lambda **k: k)])
    g = PlanGrammar(box)
    first = '1. pick(team="Lakers", seasons=["2018", "2019"])\n2. pick(team="Lakers", seasons=['
    assert g.advance(g.initial(), first + '"2018"') is not None       # may become ["2018", "2020"]
    assert g.advance(g.initial(), first + '"2018", "2019"') is None   # only a repeat is left
    assert g.advance(g.initial(), first + '"2018"])') is None         # a shorter list: near-duplicate
    assert g.advance(g.initial(), first + '"2020"])') is not None
    assert near_duplicate(("f", {"x": ["a", "b"]}), ("f", {"x": ["a"]})) is not None
