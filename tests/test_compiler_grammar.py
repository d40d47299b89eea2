"""Grammar-constrained decoding: whatever the model prefers, the text is a valid plan."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.compiler.grammar import PlanGrammar
from workbench.compiler.parser import END_MARKER, parse_plan
from workbench.compiler.tools import Tool, Toolbox


def _schema(name, props, required):
    return {"name": name, "description": name, "parameters": {
        "type": "dict", "properties": props, "required": required}}


BOX = Toolbox([
    Tool.from_schema(_schema("spotify.play", {"artist": {"type": "string"},
                                              "duration": {"type": "integer"}},
                             ["artist", "duration"]), lambda **k: k),
    Tool.from_schema(_schema("calc", {"x": {"type": "float"}, "flag": {"type": "boolean"},
                                      "mode": {"type": "string", "enum": ["fast", "exact"]},
                                      "xs": {"type": "array", "items": {"type": "integer"}},
                                      "opts": {"type": "dict"}}, ["x"]), lambda **k: k),
])


class FakeTokenizer:
    """Single characters plus multi-character tokens that cross grammar boundaries."""

    def __init__(self):
        multi = ["1. ", "2. ", ")\n", '", ', '="', "join()", "join", "spotify", ".play(",
                 "artist", "duration=", "Taylor Swift", 'Swift"', "$1", "${", '}"', "}", "  ",
                 " x", "True", "False", "None", '"fast"', "calc(", "x=", "xs=[", "], ", "12",
                 "3.5", "-", "\n2", ")\n2. join()\n", END_MARKER, "\n<END", "_OF_PLAN>", "\"\"",
                 "opts={", '": ', "foo(", "\\", "é", " ", "1", ", "]
        self.tokens = ["<eos>"] + list(dict.fromkeys(list(string.printable) + multi))
        self.eos_token_id = 0
        self.all_special_ids = [0]

    def __len__(self):
        return len(self.tokens)

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(self.tokens[i] for i in ids)


TOK = FakeTokenizer()


def generate(grammar, scores_seed, budget=None, max_steps=300):
    proc = grammar.processor(TOK, budget=budget)
    gen = torch.Generator().manual_seed(scores_seed)
    ids = torch.zeros(1, 5, dtype=torch.long)  # a 5-token "prompt"
    text = ""
    for _ in range(budget or max_steps):
        scores = torch.randn(1, len(TOK), generator=gen)
        token = int(proc(ids, scores).argmax())
        if token == 0:
            break
        text += TOK.tokens[token]
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if END_MARKER in text:
            break
    return text, proc


def test_machine_accepts_plans_and_rejects_mistakes():
    g = PlanGrammar(BOX)
    ok = ('1. spotify.play(artist="Taylor Swift", duration=20)\n'
          '2. calc(x=$1, xs=[1, 2], mode="fast", opts={"a": [1, None]}, flag=True)\n'
          '3. spotify.play(artist="${1} and ${2}", duration=$2)\n4. join()\n' + END_MARKER)
    assert g.finished(g.advance(g.initial(), ok))
    for bad in ['2. ', '1. nope(', '1. calc(y=', '1. calc(x="a"', '1. calc(mode="slow"',
                '1. calc(x=$1', '1. calc(x=1, x=', '1. spotify.play(artist="a")',
                '1. calc(x=1)\n2. calc(x=1)', '1. calc(x=1)\n2. calc(x=$3', '1. join()',
                '1. calc(x=1)\n2. calc(x=2, xs=[01', '1. calc(x=1)\n2. calc(x=2, opts={1']:
        assert g.advance(g.initial(), bad) is None, bad


def test_allowed_tokens_match_the_machine():
    g = PlanGrammar(BOX)
    proc = g.processor(TOK)
    for prefix in ["", "1. ", "1. spotify.play(artist=", '1. spotify.play(artist="Tay',
                   "1. calc(x=3", "1. calc(x=3)\n", "1. calc(x=3)\n2. calc(x=$"]:
        state = g.advance(g.initial(), prefix)
        mask = proc.mask(state)
        for i, tok in enumerate(TOK.tokens[1:], 1):
            assert bool(mask[i]) == (g.advance(state, tok) is not None), (prefix, tok)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([300, 600]))
def test_property_any_preferences_give_a_valid_plan(seed, budget):
    """Random scores over a character-level vocabulary: the worst case for line length."""
    grammar = PlanGrammar(BOX, max_tasks=5, max_string=12, max_items=3)
    text, proc = generate(grammar, seed, budget)
    assert proc.stats["off_grammar"] == 0 and proc.stats["dead_ends"] == 0
    assert END_MARKER in text, text
    plan = parse_plan(text, BOX)
    assert plan.ok and not plan.issues, (text, plan.issues)
    assert 1 <= len(plan.calls) <= 5


def test_budget_forces_join():
    text, proc = generate(PlanGrammar(BOX, max_tasks=8, max_string=6), 3, budget=90)
    assert proc.stats["forced_join"] == 1 and parse_plan(text, BOX).ok


@pytest.mark.slow
def test_real_model_constrained_plan_parses():
    from workbench.compiler.planner import Planner
    from workbench.data import load_bfcl
    from workbench.llm import LocalChat

    entry = load_bfcl("parallel")[0]
    box = Toolbox([Tool.from_schema(f, lambda **k: k) for f in entry.functions])
    plan, result = Planner(LocalChat(), box, max_tokens=120).plan(entry.messages[0]["content"])
    assert plan.ok and not plan.issues, result.text
    assert {t.tool for t in plan.calls} == {"spotify.play"}


def test_enum_values_that_would_repeat_a_line_are_refused_early():
    box = Toolbox([Tool.from_schema(_schema("g", {"mode": {"type": "string",
                                                           "enum": ["a", "b"]}}, ["mode"]),
                                    lambda **k: k)])
    g = PlanGrammar(box)
    st_ = g.advance(g.initial(), '1. g(mode="a")\n2. g(mode="b")\n3. ')
    assert g.advance(st_, 'g(mode="') is None            # both values would repeat a line
    assert g.advance(st_, "g(mode=$1)") is not None and g.advance(st_, "join()") is not None
    assert g.advance(g.initial(), "1. g(mode=$²") is None  # "²".isdigit() is True in Python
