"""Squeezed-attention kernels vs their PyTorch references (Triton's interpreter on CPU): centroid
scoring with the estimated denominator (GQA, gathered index lists, extra denominator mass),
mask-to-index compaction, and the gathered sparse attention with split-KV (decode, prefill,
causal user part), with odd sizes and budgets that are not multiples of the block."""

import math

import pytest
import torch

from kernels.squeezed_attention import (
    _sparse_attention_kernel,
    sparse_attention,
    sparse_attention_reference,
    squeezed_context_attention,
)
from kernels.squeezed_lookup import (
    centroid_scores,
    centroid_scores_reference,
    compact_mask,
    compact_mask_reference,
)
from kernels.testing import TEST_DEVICE, assert_matches_reference, fresh_seed
from kernels.testing import needs_triton as needs_triton_for
from workbench.errors import WorkbenchError
from workbench.squeezed.attention import masked_context_attention
from workbench.squeezed.lookup import centroid_estimates

DEVICE = TEST_DEVICE
needs_triton = needs_triton_for(_sparse_attention_kernel)


def _gen():
    seed = fresh_seed()
    return torch.Generator().manual_seed(seed), f"(seed {seed})"


def _random_lists(gen, b, kv, nb, n, frac):
    """Random kept-index lists (b, kv, nb, n) padded with -1, counts not a multiple of 16."""
    mask = torch.rand(b, kv, nb, n, generator=gen) < frac
    mask[..., 0] = True
    return compact_mask_reference(mask)


def test_centroid_reference_is_the_lookup_estimate():
    gen, _ = _gen()
    q = torch.randn(1, 6, 7, 16, generator=gen)
    c = torch.randn(2, 11, 16, generator=gen)
    sizes = torch.randint(0, 9, (2, 11), generator=gen)
    got = centroid_scores_reference(q, c, torch.log(sizes.float()), 0.25, 3)
    torch.testing.assert_close(got, centroid_estimates(q, c, sizes, 0.25, 3))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 6, 2, 5, 3, 37, 40), (2, 4, 4, 1, None, 23, 16),
                                   (1, 8, 2, 40, None, 70, 16)])      # 160 rows: 3 row tiles
@pytest.mark.parametrize("vote", ["mean", "max"])
def test_centroid_scores_kernel(dtype, shape, vote):
    b, hq, kv, q_len, block, k, d = shape
    gen, ctx = _gen()
    q = torch.randn(b, hq, q_len, d, generator=gen).to(DEVICE, dtype)
    c = torch.randn(kv, k, d, generator=gen).to(DEVICE, dtype)
    ln = torch.log(torch.randint(0, 30, (kv, k), generator=gen).float()).to(DEVICE)
    assert_matches_reference(
        lambda *a: centroid_scores(*a, backend="triton", vote=vote),
        lambda q_, c_, ln_, s_, bl_: centroid_scores_reference(q_, c_, ln_, s_, bl_, vote=vote),
        (q, c, ln, d ** -0.5, block), context=ctx, atol=1e-6, names=("p",))


def test_centroid_reference_votes():
    """The kernels' reference estimates equal the lookup's for both votes (mean: the paper's;
    max: any row of the block that needs a key keeps it)."""
    gen, _ = _gen()
    q = torch.randn(1, 6, 5, 16, generator=gen)
    c = torch.randn(2, 9, 16, generator=gen)
    sizes = torch.randint(1, 9, (2, 9), generator=gen).float()
    for vote in ("mean", "max"):
        got = centroid_scores_reference(q, c, sizes.log(), 0.25, 3, vote=vote)
        torch.testing.assert_close(got, centroid_estimates(q, c, sizes, 0.25, 3, vote=vote))
    with pytest.raises(WorkbenchError, match="vote"):
        centroid_scores(q, c, sizes.log(), 0.25, 3, vote="median")


@needs_triton
def test_centroid_scores_kernel_gathered_with_extra_mass():
    gen, ctx = _gen()
    b, hq, kv, q_len, block, k, d = 1, 6, 2, 9, 4, 50, 32
    q = torch.randn(b, hq, q_len, d, generator=gen).to(DEVICE)
    c = torch.randn(kv, k, d, generator=gen).to(DEVICE)
    ln = torch.log(torch.randint(1, 30, (kv, k), generator=gen).float()).to(DEVICE)
    nb = math.ceil(q_len / block)
    idx, cnt = _random_lists(gen, b, kv, nb, k, 0.4)
    extra = torch.randn(b, kv, nb, (hq // kv) * block, generator=gen) + 3
    extra[..., 0] = -math.inf
    args = (q, c, ln, d ** -0.5, block)

    def run(*a, backend):
        return centroid_scores(*a, indices=idx.to(DEVICE), counts=cnt.to(DEVICE),
                               extra_lse=extra.to(DEVICE), backend=backend)

    assert_matches_reference(lambda *a: run(*a, backend="triton"),
                             lambda *a: centroid_scores_reference(
                                 *a, indices=idx.to(a[0].device), counts=cnt.to(a[0].device),
                                 extra_lse=extra.to(a[0].device, a[0].dtype)),
                             args, context=ctx, names=("p",))


@needs_triton
@pytest.mark.parametrize("n", [1, 37, 4099])
def test_compact_mask_kernel(n):
    gen, ctx = _gen()
    mask = (torch.rand(3, 2, n, generator=gen) < 0.3).to(DEVICE)
    mask[0, 0] = False
    got = compact_mask(mask, backend="triton")
    want = compact_mask_reference(mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), ctx


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [
    # b, hq, kv, q_len, block, n, kept fraction, head_dim, n_splits
    (1, 6, 2, 1, 16, 300, 0.13, 64, 3),        # decode, GQA 3, split-KV
    (1, 4, 4, 1, None, 70, 0.5, 40, 1),        # decode, MHA, odd head_dim
    (2, 6, 3, 19, 8, 97, 0.2, 32, 2),          # prefill, per-block lists, odd lengths
    (1, 8, 2, 5, None, 130, 0.3, 16, None),    # prefill, one list for the whole input
    (1, 8, 2, 21, None, 50, 0.5, 16, 1),       # 84 rows of one list: 2 row tiles
])
def test_sparse_attention_kernel(dtype, case):
    b, hq, kv, q_len, block, n, frac, d, splits = case
    if dtype != torch.float32 and case[3] in (19, 21) and DEVICE == "cpu":
        pytest.skip("interpreter time: the bf16/fp16 variants run the smaller cases")
    gen, ctx = _gen()
    q = torch.randn(b, hq, q_len, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, kv, n, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(b, kv, n, d, generator=gen).to(DEVICE, dtype)
    nb = 1 if block is None or block >= q_len else math.ceil(q_len / block)
    idx, cnt = _random_lists(gen, b, kv, nb, n, frac)
    idx, cnt = idx.to(DEVICE), cnt.to(DEVICE)
    assert_matches_reference(
        lambda *a: sparse_attention(*a, n_splits=splits, backend="triton"),
        sparse_attention_reference, (q, k, v, idx, cnt, block, d ** -0.5),
        context=f"{ctx} {case}", names=("o", "lse"))


@needs_triton
def test_sparse_attention_causal_user_part():
    gen, ctx = _gen()
    b, hq, kv, u, d = 1, 6, 2, 13, 32
    q = torch.randn(b, hq, u, d, generator=gen).to(DEVICE)
    k = torch.randn(b, kv, u, d, generator=gen).to(DEVICE)
    v = torch.randn(b, kv, u, d, generator=gen).to(DEVICE)
    idx = torch.arange(u, dtype=torch.int32).expand(b, kv, 1, u).to(DEVICE)
    cnt = torch.full((b, kv, 1), u, dtype=torch.int32, device=DEVICE)
    got = sparse_attention(q, k, v, idx, cnt, None, d ** -0.5, causal_start=0, backend="triton")
    want = sparse_attention_reference(q, k, v, idx, cnt, None, d ** -0.5, causal_start=0)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(got[0], ref, atol=1e-5, rtol=1e-5, msg=ctx)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, msg=ctx)


@needs_triton
def test_context_attention_kernel_path_equals_masked_cpu_path():
    gen, ctx = _gen()
    b, hq, kv, u, n, d, block = 1, 6, 2, 7, 90, 32, 4
    q = torch.randn(b, hq, u, d, generator=gen).to(DEVICE)
    k = torch.randn(b, kv, n, d, generator=gen).to(DEVICE)
    v = torch.randn(b, kv, n, d, generator=gen).to(DEVICE)
    mask = (torch.rand(b, kv, 2, n, generator=gen) < 0.25).to(DEVICE)
    mask[:, 1, 1] = False                                                   # an empty list
    got = squeezed_context_attention(q, k, v, mask, block, d ** -0.5, backend="triton")
    want = masked_context_attention(q, k, v, mask, block, d ** -0.5)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, msg=ctx)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, msg=ctx)
