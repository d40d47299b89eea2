"""workbench.squeezed: clustering, lookup, calibration, save/load, online attention on the real
embedded model (short contexts), and the errors people hit."""

import copy
import math

import pytest
import torch

from workbench.attention_registry import dense_causal
from workbench.errors import WorkbenchError
from workbench.squeezed import (
    OracleSelector,
    QuestSelector,
    RandomSelector,
    SqueezedIndex,
    StreamingSelector,
    build_index,
    capture_context,
    kmeans_cosine,
    squeezed_attention,
)
from workbench.squeezed.attention import causal_attention_with_lse, masked_context_attention
from workbench.squeezed.capture import cache_kwargs
from workbench.squeezed.lookup import (
    centroid_estimates,
    compact,
    hierarchical_estimates,
    weighted_threshold,
)
from workbench.squeezed.selectors import budget_keys, top_keys

# --- clustering and lookup on random tensors ---------------------------------------------------


def test_kmeans_finds_separated_directions_and_keeps_unnormalized_means():
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(2, 4, 8, generator=gen), dim=-1)
    which = torch.randint(0, 4, (2, 200), generator=gen)
    scale = 0.5 + 3 * torch.rand(2, 200, 1, generator=gen)                  # varied norms
    pts = torch.gather(dirs, 1, which[..., None].expand(-1, -1, 8)) * scale
    pts = pts + 0.01 * torch.randn(pts.shape, generator=gen)
    res = kmeans_cosine(pts, 4, generator=gen)
    assert res.sizes.sum(1).tolist() == [200, 200]
    for h in range(2):                                                      # same partition
        pairs = {(int(a), int(b)) for a, b in zip(which[h], res.labels[h], strict=True)}
        assert len(pairs) == 4
        for k in range(4):
            members = pts[h][res.labels[h] == k]
            torch.testing.assert_close(res.centroids[h, k], members.mean(0))


def _random_centroids(gen, kv=2, kf=12, kc=3, d=16):
    fine = torch.randn(kv, kf, d, generator=gen)
    sizes = torch.randint(1, 20, (kv, kf), generator=gen)
    parent = torch.sort(torch.randint(0, kc, (kv, kf), generator=gen), dim=1).values
    coarse = torch.randn(kv, kc, d, generator=gen)
    csizes = torch.zeros(kv, kc, dtype=torch.long).scatter_add_(1, parent, sizes)
    return fine, sizes, parent, coarse, csizes


@pytest.mark.parametrize("block_size", [None, 1, 4])
def test_hierarchical_lookup_with_all_coarse_kept_is_the_one_level_lookup(block_size):
    gen = torch.Generator().manual_seed(1)
    fine, sizes, parent, coarse, csizes = _random_centroids(gen)
    q = torch.randn(1, 6, 7, 16, generator=gen)                             # 3 q heads per kv
    one = centroid_estimates(q, fine, sizes, 0.25, block_size)
    two, scored = hierarchical_estimates(q, fine, sizes, coarse, csizes, parent, -math.inf,
                                         0.25, block_size)
    torch.testing.assert_close(two, one)
    assert (scored == fine.shape[1]).all()
    # one key of each cluster: sizes-weighted estimates sum to 1 over the clusters
    torch.testing.assert_close((one * sizes[None, :, None]).sum(-1),
                               torch.ones(one.shape[:3]))


def test_hierarchical_lookup_scores_only_children_of_kept_coarse_centroids():
    gen = torch.Generator().manual_seed(2)
    fine, sizes, parent, coarse, csizes = _random_centroids(gen, kv=1, kf=30, kc=5)
    q = torch.randn(1, 1, 1, 16, generator=gen)
    pc = centroid_estimates(q, coarse, csizes, 0.25)[0, 0, 0]               # (kc,)
    t = float(pc.max())                                                     # keep the best only
    p, scored = hierarchical_estimates(q, fine, sizes, coarse, csizes, parent, t, 0.25)
    children = parent[0] == int(pc.argmax())
    assert int(scored) == int(children.sum())
    assert (p[0, 0, 0, ~children] == 0).all() and (p[0, 0, 0, children] > 0).all()


def test_compact_and_weighted_threshold():
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])
    idx, counts = compact(mask)
    assert idx.tolist() == [[0, 2, 3], [-1, -1, -1]] and counts.tolist() == [3, 0]
    values, weights = torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([10.0, 1.0, 4.0, 5.0])
    assert weighted_threshold(values, weights, 0.25) == 0.5                 # 1 + 4 of 20
    assert weighted_threshold(values, weights, 1.0) == -math.inf


def test_top_keys_keeps_at_most_k_and_never_unscored_keys():
    scores = torch.tensor([[0.5, 0.0, 0.2, 0.9, 0.1], [0.0, 0.0, 0.3, 0.0, 0.0]])
    assert top_keys(scores, 2).tolist() == [[True, False, False, True, False],
                                            [False, False, True, False, False]]
    per_row = top_keys(scores, torch.tensor([1, 3]))
    assert per_row.sum(-1).tolist() == [1, 1]                               # zeros stay out
    assert not top_keys(scores, 0).any()
    assert budget_keys(0.25, 7) == 1 and budget_keys(1.0, 7) == 7          # rounded down


def test_layer_shares_average_to_the_budget_fraction():
    from workbench.squeezed.index import _layer_shares

    gen = torch.Generator().manual_seed(4)
    p = [torch.rand(50, generator=gen) * s for s in (0.2, 1.0, 3.0)]        # flat to peaked
    w = [torch.ones(50) for _ in p]
    shares = _layer_shares(p, w, 0.5, 0.3)
    assert abs(sum(shares) / 3 - 0.3) < 1e-9 and max(shares) <= 1.0
    assert shares[0] < shares[1] < shares[2]
    assert all(x <= 1.0 for x in _layer_shares(p, w, 0.01, 0.9))


def test_sparse_parts_merge_to_dense_attention():
    gen = torch.Generator().manual_seed(3)
    b, hq, kv, n, u, d = 1, 6, 2, 40, 9, 16
    q = torch.randn(b, hq, u, d, generator=gen)
    k = torch.randn(b, kv, n + u, d, generator=gen)
    v = torch.randn(b, kv, n + u, d, generator=gen)
    mask = torch.ones(b, kv, 3, n, dtype=torch.bool)
    o1, l1 = masked_context_attention(q, k[:, :, :n], v[:, :, :n], mask, 4, 0.25)
    o2, l2 = causal_attention_with_lse(q, k[:, :, n:], v[:, :, n:], 0.25)
    from kernels.lse_merge import merge_attention_partials

    merged, _ = merge_attention_partials(torch.stack([o1, o2], -2), torch.stack([l1, l2], -1))
    torch.testing.assert_close(merged, dense_causal(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


# --- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    from workbench.data import text_chunks
    from workbench.models import load_model

    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    ids = text_chunks(tokenizer, 320, 1)[0]
    ctx, user = ids[:288], ids[288:]
    cap = capture_context(model, ctx, window=16)
    index = build_index(model, capture=cap, window=16, centroid_ratio=0.1)
    return model, tokenizer, ctx, user, cap, index


@pytest.mark.slow
def test_capture_matches_the_cache_and_index_shapes(setup):
    model, _, ctx, _, cap, index = setup
    cfg = model.config
    assert len(cap.keys) == cfg.num_hidden_layers
    assert cap.keys[0].shape == (cfg.num_key_value_heads, 288, 64)
    assert cap.queries[0].shape == (cfg.num_attention_heads, 16, 64)
    assert index.fine.shape[:2] == (cfg.num_hidden_layers, cfg.num_key_value_heads)
    assert (index.fine_sizes.sum(-1) == 288 - 4 - 16).all()
    assert (index.parent.diff(dim=-1) >= 0).all()                           # children contiguous
    assert (index.coarse_sizes.sum(-1) == index.fine_sizes.sum(-1)).all()


@pytest.mark.slow
def test_budget_one_reproduces_dense_logits_and_budget_is_spent(setup):
    model, _, ctx, user, cap, index = setup
    ids = torch.cat([ctx, user])[None]
    dense = model(ids).logits
    with squeezed_attention(model, index, budget=1.0):
        full = model(ids).logits
    torch.testing.assert_close(full, dense, atol=2e-4, rtol=1e-4)
    for hier in (False, True):
        with squeezed_attention(model, index, budget=0.5, hierarchical=hier) as sq:
            out = model(user[None], **cache_kwargs(model, copy.deepcopy(cap.cache))).logits
        assert out.shape == (1, user.numel(), model.config.vocab_size)
        assert torch.isfinite(out).all()
        assert 0.3 < sq.kept_fraction() < 0.75, sq.kept_fraction()
        assert sq.kept_per_head().shape == (model.config.num_hidden_layers,
                                            model.config.num_key_value_heads)
    # a larger coarse margin reaches the selector: a lower coarse threshold, more children
    coarse = []
    for factor in (3.0, 6.0):
        with squeezed_attention(model, index, budget=0.1, hierarchical=True,
                                coarse_factor=factor) as sq:
            coarse.append(sq.selector.thresholds.coarse)
    assert coarse[1] < coarse[0], coarse
    assert model.config._attn_implementation != "workbench_attention"      # switched back


@pytest.mark.parametrize("selector", [
    StreamingSelector(0.3, block_size=8), RandomSelector(0.3, window=16),
    QuestSelector(0.3, window=16, page=8), QuestSelector(0.3, window=16, page=8, block_size=1),
    OracleSelector(0.3, window=16, block_size=None)])
@pytest.mark.slow
def test_baselines_spend_exactly_the_budget(setup, selector):
    model, _, ctx, user, cap, _ = setup
    with squeezed_attention(model, selector, context_ids=ctx) as sq:
        model(user[None], **cache_kwargs(model, copy.deepcopy(cap.cache)))
    assert sq.kept_fraction() == pytest.approx(budget_keys(0.3, 288) / 288, abs=1e-6)


@pytest.mark.parametrize("allocation", ["capped", "layer", "head"])
@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.slow
def test_squeezed_allocations_never_spend_more_than_the_budget(setup, allocation, hierarchical):
    model, tokenizer, ctx, user, cap, index = setup
    question = torch.tensor(tokenizer("\n\nQuestion: what is a class?", add_special_tokens=False)
                            ["input_ids"])
    for ids, block in ((user, 1), (user, 8), (question, 1)):
        with squeezed_attention(model, index, 0.25, hierarchical=hierarchical, block_size=block,
                                allocation=allocation) as sq:
            model(ids[None], **cache_kwargs(model, copy.deepcopy(cap.cache)))
        spend = budget_keys(0.25, 288) / 288
        if allocation == "layer":                 # the budget over all layers, some use more
            assert sq.kept_fraction() <= spend + 1e-6
        else:                                     # the budget in every head and block
            assert float(sq.kept_per_head().max()) <= spend + 1e-6
        if not hierarchical and allocation != "capped":
            assert sq.kept_fraction() > spend - 0.01  # and the whole budget is used


@pytest.mark.slow
def test_recall_items_come_from_the_context_and_need_it(setup):
    from workbench.squeezed.evaluate import recall
    from workbench.squeezed.tasks import QualityTask, recall_items

    model, tokenizer, ctx, user, cap, index = setup
    task = QualityTask("test", ctx, user, ())
    items = recall_items(model, tokenizer, task, n_items=3, prefix_len=8, answer_len=3)
    assert items, "no recall item in the test context"
    for item in items:
        p = item.position
        assert ctx[p:p + 8].tolist() == item.prefix_ids.tolist()
        assert ctx[p + 8:p + 11].tolist() == item.answer_ids.tolist()
        text, ok, kept = recall(model, tokenizer, cap.cache, task, item,
                                squeezed_attention(model, index, 1.0))
        assert kept == 1.0 and isinstance(ok, bool)


@pytest.mark.slow
def test_generate_inside_the_context_manager(setup):
    model, tokenizer, ctx, user, cap, index = setup
    ids = torch.cat([ctx, user[:8]])[None]
    dense = model.generate(ids, **cache_kwargs(model, copy.deepcopy(cap.cache)), max_new_tokens=5,
                           do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with squeezed_attention(model, index, budget=1.0, context_ids=ctx):
        same = model.generate(ids, max_new_tokens=5, do_sample=False,     # prefills the context
                              pad_token_id=tokenizer.eos_token_id)
    assert same.tolist() == dense.tolist()
    with squeezed_attention(model, index, budget=0.25, hierarchical=True) as sq:
        out = model.generate(ids, **cache_kwargs(model, copy.deepcopy(cap.cache)), max_new_tokens=5,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, ids.shape[1] + 5) and sq.calls[0] == 5      # prefill + 4 decodes


@pytest.mark.slow
def test_save_load_and_refusals(setup, tmp_path):
    model, _, ctx, user, cap, index = setup
    path = index.save(tmp_path / "ctx.safetensors")
    loaded = SqueezedIndex.load(path, model=model, context_ids=ctx)
    torch.testing.assert_close(loaded.fine, index.fine)
    assert loaded.calibrate(0.5) == index.calibrate(0.5)
    other = ctx.clone()
    other[5] += 1
    with pytest.raises(WorkbenchError, match="does not match the saved centroids"):
        SqueezedIndex.load(path, context_ids=other)
    with pytest.raises(WorkbenchError, match="does not match the saved centroids"):
        with squeezed_attention(model, index, budget=0.5, context_ids=other):
            pass
    # a cache of another text is caught at the first attention call
    wrong = capture_context(model, torch.flip(ctx, [0]), window=16).cache
    with pytest.raises(WorkbenchError, match="does not match"):
        with squeezed_attention(model, index, budget=0.5):
            model(user[None], **cache_kwargs(model, wrong))


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), "half"])
def test_budget_outside_unit_interval_is_refused(setup, budget):
    model, _, _, _, _, index = setup
    with pytest.raises(WorkbenchError, match="budget"):
        with squeezed_attention(model, index, budget=budget):
            pass


@pytest.mark.slow
def test_budget_below_sink_and_window_and_too_long_input(setup):
    model, _, ctx, _, cap, index = setup
    with pytest.raises(WorkbenchError, match="always kept"):
        index.calibrate(0.02)
    too_long = torch.zeros(1, model.config.max_position_embeddings - 288 + 1, dtype=torch.long)
    with pytest.raises(WorkbenchError, match="model allows"):
        with squeezed_attention(model, StreamingSelector(0.5), context_ids=ctx):
            model(too_long[:, :2], **cache_kwargs(model, _long_cache(cap.cache, model)))


def _long_cache(cache, model):
    """A copy of `cache` padded with zeros up to the model's maximum length."""
    c = copy.deepcopy(cache)
    limit = model.config.max_position_embeddings
    for layer in c.layers:
        pad = limit - layer.keys.shape[2]
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(*layer.keys.shape[:2], pad,
                                                                  layer.keys.shape[3])], 2)
        layer.values = torch.cat([layer.values, layer.values.new_zeros(
            *layer.values.shape[:2], pad, layer.values.shape[3])], 2)
    return c


@pytest.mark.slow
def test_widgets_explorer_and_heatmap(setup, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STATIC_FIGURES", "1")
    from workbench.squeezed.capture import capture_user_queries
    from workbench.widgets.centroids import budget_heatmap, centroid_explorer, explorer_state

    model, _, ctx, user, cap, index = setup
    queries = capture_user_queries(model, cap.cache, user[:6], context_len=ctx.numel())
    assert queries.shape == (model.config.num_hidden_layers, model.config.num_attention_heads,
                             6, 64)
    small = explorer_state(index, cap.keys, queries, 10, 1, 0.25, 5)
    large = explorer_state(index, cap.keys, queries, 10, 1, 0.5, 5)
    assert small["kept"].shape == (288 - 4 - 16,) and small["xy"].shape == (288 - 20, 2)
    assert small["kept_fraction"] <= large["kept_fraction"]
    assert 0 < small["mass_kept"] <= large["mass_kept"] + 1e-6 <= 1 + 1e-5
    fig = centroid_explorer(index, cap.keys, queries, layer=10, budget="1/4")
    assert len(fig.data) == 3 and "keeps" in fig.layout.title.text
    heat = budget_heatmap(torch.rand(30, 3))
    assert heat.data[0].z is not None


def test_summary_reports_spend_and_targets():
    from workbench.squeezed.evaluate import check_targets, format_summary, summarize

    def row(method, budget, nll, correct, recall, kept):
        return {"task": "t", "method": method, "budget": budget, "nll": nll, "correct": correct,
                "questions": 4, "recall_correct": recall, "recall_items": 10,
                "kept_continuation": kept, "kept_questions": kept, "kept_recall": kept}

    rows = [row("dense", 1.0, 2.0, 3, 6, 1.0), row("squeezed", 0.25, 2.005, 3, 6, 0.25),
            row("streaming", 0.25, 2.1, 0, 1, 0.25), row("quest", 0.25, 2.05, 2, 3, 0.25),
            row("squeezed", 0.125, 2.03, 2, 4, 0.13)]
    summary = summarize(rows)
    assert "0.250/0.250/0.250" in format_summary(summary)
    met = {t["target"]: t["met"] for t in check_targets(summary)}
    assert met["ppl within 1% of dense at 1/4"] and met["facts + recall equal to dense at 1/4"]
    assert not met["ppl within 2% of dense at 1/8"]                        # +3.0%
    assert met["ppl better than streaming and quest at 1/4"]
    assert not met["spend within the budget at every budget"]              # 0.13 > 1/8


def test_paired_items_counts_flips_against_dense():
    from workbench.squeezed.evaluate import paired_items

    def row(task, method, budget, facts, recall):
        return {"task": task, "method": method, "budget": budget,
                "answers": [{"correct": x} for x in facts],
                "recall": [{"correct": x} for x in recall]}

    rows = [row("a", "dense", 1.0, [True, True], [False]), row("a", "sq", 0.25, [True, False],
                                                               [True]),
            row("b", "dense", 1.0, [True], [True, False]), row("b", "sq", 0.25, [False], [True,
                                                                                          False])]
    t = paired_items(rows, "sq", 0.25)
    assert (t["items"], t["both_right"], t["right_to_wrong"], t["wrong_to_right"],
            t["both_wrong"]) == (6, 2, 2, 1, 1)
    assert t["mcnemar_p"] == 1.0
