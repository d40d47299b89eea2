"""Prompt compression: the one interface, the achieved-ratio promise, each method's contract."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from workbench.compression import METHODS, TOLERANCE, Target, compress, get_compressor
from workbench.compression.base import runs, tokenize
from workbench.compression.extractive import bm25_scores
from workbench.compression.metrics import contains_answer, first_number, rouge_l
from workbench.compression.segment import split_units, token_units
from workbench.compression.token_pruning import allocate
from workbench.data import long_documents, python_docs_topics
from workbench.errors import WorkbenchError

FAST = ("truncate", "sentence-bm25", "sentence-minilm", "paragraph-bm25", "paragraph-minilm")
LM = ("sentence-lm", "paragraph-lm", "llmlingua", "longllmlingua")
FACT = "The access code for the blue vault is 48213."
QUESTION = "What is the access code for the blue vault?"


@pytest.fixture(scope="module")
def tokenizer():
    from workbench.models import load_model

    return load_model()[1]


def _docs():
    docs = [d.text for d in python_docs_topics() if len(d.text) > 6000][:6]
    docs += [d.text for d in long_documents(min_chars=6000, sources=("sharegpt",))][:2]
    return docs


DOCS = _docs()


def _slice(doc_index: int, start: float, chars: int) -> str:
    doc = DOCS[doc_index % len(DOCS)]
    a = int(start * max(len(doc) - chars, 0))
    return doc[a:a + chars]


def _check(result, context: str):
    assert abs(result.achieved_ratio / result.requested_ratio - 1) <= TOLERANCE, result.summary()
    for a, b in result.kept_spans:  # spans are real, ordered pieces of the context
        assert 0 <= a < b <= len(context)
    starts = [a for a, _ in result.kept_spans]
    assert starts == sorted(starts)


# ------------------------------------------------------------------ the achieved-ratio property

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# a short context where re-tokenization oscillated around the budget (found in CI)
@example(method="sentence-bm25", doc=7, start=1.0, chars=2031, ratio=2.0, question=False)
@given(method=st.sampled_from(FAST), doc=st.integers(0, 7), start=st.floats(0, 1),
       chars=st.integers(1500, 9000), ratio=st.floats(2, 20), question=st.booleans())
def test_achieved_ratio_within_5_percent_fast_methods(tokenizer, method, doc, start, chars,
                                                      ratio, question):
    context = _slice(doc, start, chars)
    if not context.strip():
        with pytest.raises(WorkbenchError, match="empty"):
            compress(context, None, ratio, method, tokenizer)
        return
    n = len(tokenize(tokenizer, context))
    if round(n / ratio) < 16:
        with pytest.raises(WorkbenchError, match="too few"):
            compress(context, QUESTION if question else None, ratio, method, tokenizer)
        return
    _check(compress(context, QUESTION if question else None, ratio, method, tokenizer), context)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# one whitespace token re-tokenized as four: 37 <-> 41 tokens around a budget of 39 (found by
# a clean-clone make test)
@example(method="sentence-lm", doc=6, start=0.4358180984909704, chars=1501, ratio=5.0,
         question=False)
# a 22-token budget where adding one token re-tokenized 20 -> 23 (found by a clean-clone make test)
@example(method="llmlingua", doc=0, start=0.6328125, chars=1200, ratio=14.0, question=False)
@given(method=st.sampled_from(LM), doc=st.integers(0, 7), start=st.floats(0, 1),
       chars=st.integers(1200, 2500), ratio=st.floats(2, 20), question=st.booleans())
def test_achieved_ratio_within_5_percent_lm_methods(tokenizer, method, doc, start, chars, ratio,
                                                    question):
    context = _slice(doc, start, chars)
    if not context.strip():
        return
    ratio = min(ratio, len(tokenize(tokenizer, context)) / 16)
    _check(compress(context, QUESTION if question else None, ratio, method, tokenizer), context)


@pytest.mark.slow
@pytest.mark.parametrize("target", [10.0, Target(tokens=40)])
def test_abstractive_hits_the_budget(tokenizer, target):
    context = _slice(0, 0.3, 1600)
    r = compress(context, QUESTION, target, "abstractive", tokenizer)
    _check(r, context)
    assert r.kept_spans == [] and r.info["backend"] == "local"


def test_token_budget_target(tokenizer):
    context = _slice(1, 0.0, 4000)
    r = compress(context, QUESTION, Target(tokens=120), "sentence-bm25", tokenizer)
    assert r.budget_tokens == 120 and abs(r.compressed_tokens - 120) <= 2
    assert r.requested_ratio == pytest.approx(r.original_tokens / 120)
    assert compress(context, None, "5x", "truncate", tokenizer).requested_ratio == 5.0


# ------------------------------------------------------------------ errors a user can fix

def test_errors_say_what_to_do(tokenizer):
    with pytest.raises(WorkbenchError, match="empty"):
        compress("   ", QUESTION, 4, "truncate", tokenizer)
    with pytest.raises(WorkbenchError, match="out of range"):
        Target(ratio=0.5)
    with pytest.raises(WorkbenchError, match="out of range"):
        compress("Some text.", None, 1000, "truncate", tokenizer)
    with pytest.raises(WorkbenchError, match="exactly one"):
        Target(ratio=2, tokens=5)
    with pytest.raises(WorkbenchError, match="Cannot read"):
        Target.of("fast")
    with pytest.raises(WorkbenchError, match="Unknown compression method"):
        get_compressor("zip")
    with pytest.raises(WorkbenchError, match="at most"):
        compress(_slice(2, 0, 300), QUESTION, 20, "sentence-bm25", tokenizer)


def test_none_keeps_everything(tokenizer):
    context = _slice(3, 0.5, 2000)
    r = compress(context, QUESTION, 8, "none", tokenizer)
    assert r.text == context and r.achieved_ratio == 1.0 and r.requested_ratio == 1.0


# ------------------------------------------------------------------ what each family keeps

def _with_fact(context: str) -> str:
    mid = context.find(". ", len(context) // 2) + 1
    return context[:mid] + " " + FACT + context[mid:]


@pytest.mark.parametrize("method", ["sentence-bm25", "sentence-minilm"])
def test_question_aware_extractive_keeps_the_fact_in_order(tokenizer, method):
    context = _with_fact(_slice(4, 0.2, 6000))
    r = compress(context, QUESTION, 10, method, tokenizer)
    assert "48213" in r.text
    pieces = [context[a:b] for a, b in r.kept_spans]
    assert " ".join(pieces) == r.text  # kept text is verbatim context, in document order
    assert contains_answer(r.text, "48213")


def test_truncate_keeps_a_prefix(tokenizer):
    context = _slice(5, 0.0, 3000)
    r = compress(context, None, 4, "truncate", tokenizer)
    assert context.startswith(r.text) and r.kept_spans[0][0] == 0


@pytest.mark.slow
def test_contrastive_pruning_keeps_verbatim_tokens_in_order(tokenizer):
    # Whether the code survives is the benchmark's business (it often does not: digits are
    # single tokens and pruning keeps some of them); here the contract: verbatim, ordered, exact.
    context = _with_fact(_slice(0, 0.4, 2500))
    r = compress(context, QUESTION, 5, "longllmlingua", tokenizer)
    _check(r, context)
    assert "".join(context[a:b] for a, b in r.kept_spans) == r.text


# ------------------------------------------------------------------ building blocks

def test_sentences_and_paragraphs_cover_the_text():
    text = python_docs_topics()[5].text
    for g in ("sentence", "paragraph"):
        spans = split_units(text, g)
        assert all(a < b for a, b in spans)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))
    assert len(split_units(text, "sentence")) > len(split_units(text, "paragraph"))
    assert split_units("One. Two! Three? four", "sentence") == [(0, 4), (4, 9), (9, 21)]


def test_token_units_cap_the_unit_length(tokenizer):
    tok = tokenize(tokenizer, _slice(6, 0, 5000))
    owner, ranges = token_units(tok, "paragraph", max_tokens=50)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(tok)
    assert all(0 < b - a <= 50 for a, b in ranges)
    assert (np.diff(owner) >= 0).all()


def test_bm25_ranks_the_matching_unit_first():
    units = ["The cat sat on the mat.", "Vault access codes are secret.", "Dogs bark loudly."]
    s = bm25_scores(units, "What is the vault access code?")
    assert s.argmax() == 1 and s[0] == s[2] == 0


def test_allocate_respects_caps_and_sums_to_budget():
    b = allocate(np.array([10, 100, 50]), np.array([1.0, 1.0, 8.0]), 90)
    assert b.sum() == 90 and (b <= [10, 100, 50]).all() and b[2] == 50
    assert allocate(np.array([5, 5]), np.array([1.0, 1.0]), 100).sum() == 10


def test_runs():
    assert runs(np.array([1, 1, 0, 1, 0, 0, 1], bool)) == [(0, 2), (3, 4), (6, 7)]


def test_metrics():
    assert rouge_l("the cat sat", "the cat sat")["f"] == 1.0
    r = rouge_l("the cat was on the mat", "the cat sat on the mat")
    assert r["p"] == r["r"] == pytest.approx(5 / 6)
    assert rouge_l("", "x")["f"] == 0.0
    assert contains_answer("Code: 48213.", "48213") and not contains_answer("148213", "48213")
    assert first_number("It is 48213, not 1.") == "48213"


def test_registry_lists_every_family():
    fams = {get_compressor(m).family for m in METHODS}
    assert fams == {"none", "baseline", "extractive", "abstractive", "token"}


def test_highlight_marks_kept_spans_and_escapes():
    from workbench.widgets.compression import highlight

    html_text = highlight("a <b> c", [(2, 5)], drop_attr='class="drop"', mark_attr="")
    assert html_text == ('<span class="drop">a </span><mark>&lt;b&gt;</mark>'
                         '<span class="drop"> c</span>')
    assert highlight("xy", [], mark_attr="").count("<mark") == 0


def test_reader_study_bookkeeping():
    """Wilson intervals, exact McNemar and paired flips of the reader study (no model run)."""
    from workbench.compression.reader_study import (
        conclusion,
        paired,
        sign_test_p,
        study_statement,
        summarize,
        wilson,
    )

    lo, hi = wilson(8, 25)                      # worked by hand: 0.1720 .. 0.5159
    assert abs(lo - 0.1720) < 1e-3 and abs(hi - 0.5159) < 1e-3
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) == 1.0
    assert abs(sign_test_p(0, 6) - 2 / 64) < 1e-12 and abs(sign_test_p(1, 9) - 22 / 1024) < 1e-12
    base, other = [True, True, False, False, False], [True, False, True, True, False]
    p = paired(base, other)
    assert (p["both_right"], p["right_to_wrong"], p["wrong_to_right"], p["both_wrong"]) == (1, 1, 2, 1)
    assert p["net"] == 1
    with pytest.raises(ValueError):
        paired([True], [True, False])

    def row(item, method, ratio, correct, kept=True):
        return {"item": item, "method": method, "ratio": ratio, "correct": correct,
                "retention": kept, "achieved_ratio": ratio, "compressor_s": 0.0, "reader_s": 1.0}

    rows = [row(f"i{k}", "none", 1.0, k < 2) for k in range(5)]
    rows += [row(f"i{k}", "bm25", 5.0, k in (0, 2, 3, 4), kept=k != 1) for k in range(5)]
    rows += [row(f"i{k}", "slow", 5.0, k == 1) for k in range(2)]   # a slow method on 2 items
    s = summarize(rows)
    t = {(x["method"], x["ratio"]): x for x in s["table"]}
    assert [x["method"] for x in s["table"]][0] == "none"
    assert (t["none", 1.0]["k"], t["none", 1.0]["n"]) == (2, 5)
    b = t["bm25", 5.0]
    assert (b["k"], b["n"], b["retained"], b["correct_when_retained"]) == (4, 5, 4, "4/4")
    assert (b["vs_none"]["right_to_wrong"], b["vs_none"]["wrong_to_right"]) == (1, 3)
    sl = t["slow", 5.0]                         # paired on its own 2 items only
    assert (sl["k"], sl["n"], sl["none_on_same_items"]) == (1, 2, "2/2")
    assert sl["vs_none"]["right_to_wrong"] == 1 and sl["vs_none"]["both_right"] == 1
    c = conclusion(s)
    assert c["uncompressed"] == "2/5" and c["best"]["method"] == "bm25"
    assert c["significantly_better"] == [] and c["significantly_worse"] == []
    text = study_statement({"config": {"n_tokens": 1024}, **s, "conclusion": c})
    assert "uncompressed 2/5" in text and "3 wrong->right vs 1 right->wrong" in text
    assert "uncompressed 2/2 on these items" in text
