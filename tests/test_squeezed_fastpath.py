"""The kernel path of squeezed attention (lookup -> select_chunks -> sparse attention -> merge)
equals the readable CPU path (selector mask -> masked attention -> merge), one-level and
hierarchical, prefill and decode, with the kernels in Triton's interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.dispatch import HAS_TRITON, is_interpreted  # noqa: E402
from kernels.lse_merge import merge_attention_partials  # noqa: E402
from kernels.squeezed_attention import _sparse_attention_kernel  # noqa: E402
from workbench.squeezed.attention import (  # noqa: E402
    causal_attention_with_lse,
    masked_context_attention,
)
from workbench.squeezed.fastpath import DevicePlan, fast_squeezed_attention  # noqa: E402
from workbench.squeezed.index import SqueezedIndex, _cluster_layer  # noqa: E402
from workbench.squeezed.selectors import SqueezedSelector  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and (
    DEVICE == "cuda" or is_interpreted(_sparse_attention_kernel)) else [])


def synthetic_index(n=203, kv=2, hq=6, d=32, n_sink=4, window=8, layers=1, seed=0):
    """A SqueezedIndex built from random keys with a few directions (no model needed)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(kv, 6, d, generator=gen)
    keys = (dirs[:, torch.randint(0, 6, (n,), generator=gen)]
            + 0.5 * torch.randn(kv, n, d, generator=gen)) * 2
    parts = _cluster_layer(keys[:, n_sink:n - window], 20, 4, 10, gen)
    index = SqueezedIndex(
        model="synthetic", model_name="synthetic", context_hash="0", context_len=n,
        n_sink=n_sink, window=window, head_dim=d, q_heads=hq,
        key_means=keys.mean(1)[None], queries=torch.randn(1, hq, window, d, generator=gen) * 2,
        **{k: v[None] for k, v in parts.items()})
    return index, keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("q_len,block,fused", [(1, 16, True), (11, 4, True), (9, None, True),
                                               (1, 16, False), (11, 4, False),
                                               (11, 4, None), (9, None, None),   # prefill
                                               (11, 4, "rows"), (9, None, "rows")])
def test_fast_path_equals_cpu_path(backend, hierarchical, q_len, block, fused):
    index, keys = synthetic_index()
    gen = torch.Generator().manual_seed(1)
    n, kv, d = index.context_len, index.kv_heads, index.head_dim
    u = q_len + 3                                            # earlier user tokens too
    k = torch.cat([keys, torch.randn(kv, u, d, generator=gen)], 1)[None]
    v = torch.randn(1, kv, n + u, d, generator=gen)
    q = torch.randn(1, index.q_heads, q_len, d, generator=gen) * 2
    budget = 0.3
    sel = SqueezedSelector(index, budget, hierarchical=hierarchical, block_size=block)
    mask = sel.select(0, q, k[:, :, :n])
    o1, l1 = masked_context_attention(q, k[:, :, :n], v[:, :, :n], mask, block, index.scaling)
    o2, l2 = causal_attention_with_lse(q, k[:, :, n:], v[:, :, n:], index.scaling)
    want, _ = merge_attention_partials(torch.stack([o1, o2], -2), torch.stack([l1, l2], -1))
    assert 0 < mask.float().mean() < 1
    plan = DevicePlan.from_index(index, budget, hierarchical=hierarchical, block_size=block,
                                 device=DEVICE, dtype=torch.float32)
    got = fast_squeezed_attention(plan, 0, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), block,
                                  backend=backend, fused_select=None if fused == "rows" else fused,
                                  prefill="rows" if fused == "rows" else None)
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels")
@pytest.mark.parametrize("tuning", [{"fuse_lse": True},
                                    {"fuse_lse": True, "prefetch": 2, "block_n": 32},
                                    {"index_ahead": True, "block_n": 16}])
def test_decode_variants_equal_cpu_path(tuning):
    """Decode launch variants that bench_squeezed times (two-launch lookup, L2 prefetch: a
    no-op under the interpreter) give the readable CPU path's output."""
    index, keys = synthetic_index()
    gen = torch.Generator().manual_seed(2)
    n, kv, d = index.context_len, index.kv_heads, index.head_dim
    k = torch.cat([keys, torch.randn(kv, 4, d, generator=gen)], 1)[None]
    v = torch.randn(1, kv, n + 4, d, generator=gen)
    q = torch.randn(1, index.q_heads, 1, d, generator=gen) * 2
    sel = SqueezedSelector(index, 0.3, block_size=16)
    mask = sel.select(0, q, k[:, :, :n])
    o1, l1 = masked_context_attention(q, k[:, :, :n], v[:, :, :n], mask, 16, index.scaling)
    o2, l2 = causal_attention_with_lse(q, k[:, :, n:], v[:, :, n:], index.scaling)
    want, _ = merge_attention_partials(torch.stack([o1, o2], -2), torch.stack([l1, l2], -1))
    plan = DevicePlan.from_index(index, 0.3, block_size=16, device=DEVICE, dtype=torch.float32)
    got = fast_squeezed_attention(plan, 0, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 16,
                                  backend="triton", tuning=tuning)
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("q_len,block,rows,vote", [(1, 16, False, "mean"), (11, 4, False, "mean"),
                                                   (11, 4, True, "mean"), (1, 16, False, "max"),
                                                   (11, 4, True, "max")])
def test_layer_allocation_on_the_device(backend, hierarchical, q_len, block, rows, vote):
    """allocation='layer' (the evaluated default): the device path keeps whole clusters in
    decreasing estimate, pooled over the KV heads, without passing the layer's share; what it
    keeps is a subset of the CPU selector's keys that misses at most one cluster per block
    (the CPU selector fills the share exactly by splitting the boundary cluster)."""
    from kernels.squeezed_attention import chunked_to_flat
    from kernels.squeezed_select import select_chunks
    from workbench.squeezed.fastpath import kept_centroids
    from workbench.squeezed.selectors import budget_keys

    index, keys = synthetic_index(n=301, seed=3)
    gen = torch.Generator().manual_seed(4)
    n, kv, d = index.context_len, index.kv_heads, index.head_dim
    q = torch.randn(1, index.q_heads, q_len, d, generator=gen) * 2
    budget = 0.3
    sel = SqueezedSelector(index, budget, hierarchical=hierarchical, block_size=block,
                           allocation="layer", vote=vote)
    cpu = sel.select(0, q, keys[None])                                      # (1, kv, nb, n)
    plan = DevicePlan.from_index(index, budget, hierarchical=hierarchical, block_size=block,
                                 device=DEVICE, dtype=torch.float32, allocation="layer",
                                 vote=vote)
    keep = kept_centroids(plan, 0, q.to(DEVICE), block, backend, rows=rows)   # rows: prefill
    idx, cnt, _ = select_chunks(keep, plan.labels[0], n, index.n_sink, index.window,
                                backend=backend)
    flat, fcnt = chunked_to_flat(idx, cnt, q_len, block)
    dev = torch.zeros_like(cpu)
    for hb in range(kv):
        for blk in range(cpu.shape[2]):
            dev[0, hb, blk, flat[0, hb, blk, :fcnt[0, hb, blk]].long().cpu()] = True
    spent = dev.sum(dim=(1, 3))                                             # (1, nb)
    assert bool((spent <= budget_keys(budget, n) * kv).all())
    assert bool((dev <= cpu).all()), "the device keeps a key the CPU selector does not"
    biggest = int(plan.member_counts[0].max())
    assert bool((cpu.sum(dim=(1, 3)) - spent <= biggest).all())
    with pytest.raises(Exception, match="allocation"):
        DevicePlan.from_index(index, budget, device=DEVICE, allocation="capped")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len,block", [(1, 16), (11, 4)])
def test_clustered_layout_gives_the_same_attention(backend, q_len, block):
    """Reordering the context's clustered middle by label (sink, window and user rows in place)
    changes no output: attention over the fixed context is over a set of post-RoPE keys."""
    from workbench.squeezed.layout import clustered_plan, to_clustered

    index, keys = synthetic_index(n=301, seed=5)
    gen = torch.Generator().manual_seed(6)
    n, kv, d = index.context_len, index.kv_heads, index.head_dim
    u = q_len + 2
    k = torch.cat([keys, torch.randn(kv, u, d, generator=gen)], 1)[None].to(DEVICE)
    v = torch.randn(1, kv, n + u, d, generator=gen).to(DEVICE)
    q = (torch.randn(1, index.q_heads, q_len, d, generator=gen) * 2).to(DEVICE)
    plan = DevicePlan.from_index(index, 0.3, block_size=block, device=DEVICE,
                                 dtype=torch.float32)
    cplan = clustered_plan(plan)
    assert bool((cplan.labels[..., 1:] >= cplan.labels[..., :-1]).all())
    kc, vc = to_clustered(cplan, 0, k, v)
    assert torch.equal(kc[:, :, :index.n_sink], k[:, :, :index.n_sink])
    assert torch.equal(kc[:, :, n - index.window:], k[:, :, n - index.window:])
    want = fast_squeezed_attention(plan, 0, q, k, v, block, backend=backend)
    got = fast_squeezed_attention(cplan, 0, q, kc, vc, block, backend=backend)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_prefill_choice_is_checked():
    index, keys = synthetic_index()
    plan = DevicePlan.from_index(index, 0.3, device="cpu", dtype=torch.float32)
    q = torch.randn(1, index.q_heads, 5, index.head_dim)
    k = torch.cat([keys, torch.randn(index.kv_heads, 5, index.head_dim)], 1)[None]
    with pytest.raises(Exception, match="prefill must be"):
        fast_squeezed_attention(plan, 0, q, k, k, 4, backend="torch", prefill="dense")
