"""The parallel lookup kernels (centroid keep flags over tiles, chunked selection) and the chunked
sparse attention with the user tokens in the same launch, against their PyTorch references
(Triton's interpreter on CPU). Odd sizes, GQA, several row tiles, chunks that end mid-context."""

import math

import pytest
import torch

from kernels.squeezed_attention import chunked_to_flat, sparse_attention, sparse_attention_reference
from kernels.squeezed_lookup import centroid_scores_reference, select_indices_reference
from kernels.squeezed_select import (
    _select_chunks_kernel,
    centroid_keep,
    chunk_size,
    select_chunks,
    select_chunks_reference,
)
from kernels.testing import TEST_DEVICE, assert_matches_reference, fresh_seed
from kernels.testing import needs_triton as needs_triton_for
from workbench.errors import WorkbenchError

DEVICE = TEST_DEVICE
needs_triton = needs_triton_for(_select_chunks_kernel)


def _gen():
    seed = fresh_seed()
    return torch.Generator().manual_seed(seed), f"(seed {seed})"


@needs_triton
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 16, 157, 32),      # decode, GQA: logits stored
                                   (1, 6, 3, 37, 16, 97, 40),      # prefill blocks, 2 row tiles
                                   (2, 2, 2, 5, None, 300, 16)])   # one set, 5 centroid tiles
@pytest.mark.parametrize("fuse_lse, vote", [(False, "mean"), (True, "mean"), (False, "max")])
def test_centroid_keep_kernel(shape, fuse_lse, vote):
    b, hq, kv, q_len, block, k, d = shape
    gen, ctx = _gen()
    q = torch.randn(b, hq, q_len, d, generator=gen).to(DEVICE)
    c = torch.randn(kv, k, d, generator=gen).to(DEVICE)
    ln = torch.log(torch.randint(1, 30, (kv, k), generator=gen).float()).to(DEVICE)
    p = centroid_scores_reference(q.double(), c.double(), ln.double(), d ** -0.5, block,
                                  vote=vote)
    threshold = float(p.flatten().kthvalue(max(1, int(0.8 * p.numel()))).values)
    got = centroid_keep(q, c, ln, d ** -0.5, block, threshold, backend="triton",
                        fuse_lse=fuse_lse, vote=vote)
    est = centroid_keep(q, c, ln, d ** -0.5, block, None, backend="triton", vote=vote)
    torch.testing.assert_close(est.double().cpu(), p.cpu(), atol=1e-6, rtol=1e-4)
    want = p >= threshold
    # only estimates within float32 rounding of the threshold may differ
    near = (p - threshold).abs() <= 1e-6 * threshold
    assert got.shape == want.shape and bool(((got == want) | near).all()), ctx


@needs_triton
@pytest.mark.parametrize("n, chunk", [(301, 64), (1000, 128), (2500, 2048), (4500, 4096)])
@pytest.mark.parametrize("label_dtype", [torch.int16, torch.int32])
def test_select_chunks_kernel(n, chunk, label_dtype):
    gen, ctx = _gen()
    b, kv, nb, k, n_sink, window = 1, 2, 3, 23, 4, 16
    keep = (torch.rand(b, kv, nb, k, generator=gen) < 0.3).to(DEVICE)
    labels = torch.randint(0, k, (kv, n - n_sink - window), generator=gen).to(DEVICE, label_dtype)
    idx, cnt, ch = select_chunks(keep, labels, n, n_sink, window, chunk, backend="triton")
    ridx, rcnt = select_chunks_reference(keep, labels, n, n_sink, window, chunk)
    assert ch == chunk and torch.equal(cnt, rcnt), ctx
    ok = (torch.arange(chunk, device=DEVICE) < cnt[..., None]).flatten(3)
    assert torch.equal(idx[ok], ridx[ok]), ctx
    # the same set of positions as the flat selection
    flat, fcnt = chunked_to_flat(idx, cnt, 1, None)
    fidx, fref = select_indices_reference(keep, labels, n, n_sink, window)
    assert torch.equal(fcnt, fref)
    width = min(flat.shape[-1], n)
    valid = torch.arange(width, device=DEVICE) < fcnt[..., None]
    assert torch.equal(flat[..., :width][valid], fidx[..., :width][valid]), ctx


def test_chunk_size_and_bad_chunks():
    assert chunk_size(128 * 1024, 8) == 2048          # decode, 8 KV heads: 64 chunks
    assert chunk_size(128 * 1024, 32 * 32) == 16 * 1024   # prefill blocks: 8 chunks a row
    assert chunk_size(300, 1) == 2048
    keep = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    with pytest.raises(WorkbenchError, match="power of two"):
        select_chunks(keep, torch.zeros(1, 80, dtype=torch.int32), 100, 4, 16, 100,
                      backend="torch")


def _user_case(gen, b, hq, kv, q_len, block, n, u, label_dtype=torch.int64, d=32):
    """bf16 q, k, v with n context + u user keys, and random keep flags (31 clusters) and
    labels for the clustered middle (sink 4, window 16)."""
    q = torch.randn(b, hq, q_len, d, generator=gen).to(DEVICE, torch.bfloat16)
    k = torch.randn(b, kv, n + u, d, generator=gen).to(DEVICE, torch.bfloat16)
    v = torch.randn(b, kv, n + u, d, generator=gen).to(DEVICE, torch.bfloat16)
    nb = 1 if block is None or block >= q_len else math.ceil(q_len / block)
    keep = (torch.rand(b, kv, nb, 31, generator=gen) < 0.25).to(DEVICE)
    labels = torch.randint(0, 31, (kv, n - 4 - 16), generator=gen).to(DEVICE, label_dtype)
    return q, k, v, keep, labels


@needs_triton
@pytest.mark.parametrize("case", [(1, 8, 2, 1, 16, 700, 9, 128),     # decode, GQA
                                  (1, 4, 4, 37, 16, 301, 40, 64),    # prefill blocks, odd u
                                  (2, 6, 3, 19, None, 450, 19, 128)])  # one set, u == q_len
def test_chunked_sparse_attention_with_user_part(case):
    b, hq, kv, q_len, block, n, u, chunk = case
    gen, ctx = _gen()
    d = 32
    q, k, v, keep, labels = _user_case(gen, b, hq, kv, q_len, block, n, u, d=d)
    idx, cnt = select_chunks_reference(keep, labels, n, 4, 16, chunk)
    causal = n + u - q_len

    def flat_reference(q, k, v):
        fi, fc = chunked_to_flat(idx, cnt, q_len, block, n, u)
        return sparse_attention_reference(q, k, v, fi, fc, block, d ** -0.5, causal)

    assert_matches_reference(
        lambda q, k, v: sparse_attention(q, k, v, idx, cnt, block, d ** -0.5,
                                         causal_start=causal, user_start=n, user_len=u,
                                         backend="triton"),
        flat_reference, (q, k, v), names=("o", "lse"), context=ctx)


@needs_triton
@pytest.mark.parametrize("case", [(1, 8, 2, 1, 16, 700, 9, 128, torch.int16),     # decode, GQA
                                  (1, 4, 4, 37, 16, 301, 40, 64, torch.int32),    # prefill, odd
                                  (2, 6, 3, 19, None, 4500, 19, 4096, torch.int16)])  # 2 steps
def test_select_and_attend_fused(case):
    """Selection fused into the attention launch: the same output and lse as select_chunks +
    sparse_attention's reference, and the same kept counts per chunk."""
    from kernels.squeezed_attention import select_and_attend

    b, hq, kv, q_len, block, n, u, chunk, label_dtype = case
    gen, ctx = _gen()
    d = 32
    q, k, v, keep, labels = _user_case(gen, b, hq, kv, q_len, block, n, u, label_dtype, d)
    causal = n + u - q_len
    _, rcnt = select_chunks_reference(keep, labels, n, 4, 16, chunk)
    counts = {}

    def fused(q, k, v):
        o, lse, counts["got"] = select_and_attend(q, k, v, keep, labels, n, 4, 16, block,
                                                  d ** -0.5, causal_start=causal, user_start=n,
                                                  user_len=u, chunk=chunk, backend="triton")
        return o, lse

    def reference(q, k, v):
        o, lse, _ = select_and_attend(q, k, v, keep, labels, n, 4, 16, block, d ** -0.5,
                                      causal_start=causal, user_start=n, user_len=u,
                                      chunk=chunk, backend="torch")
        return o, lse

    assert_matches_reference(fused, reference, (q, k, v), names=("o", "lse"), context=ctx)
    assert torch.equal(counts["got"], rcnt), ctx


# ----------------------------------------------------------------------------------------------
# The prefill path (kernels.squeezed_prefill): query rows stationary, flat lists, 128-row tiles
# (16 under the interpreter, so that small cases still span several tiles and segments)
# ----------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("shape", [(1, 8, 2, 37, None, 70, 32),    # one set, GQA 4: 10 tiles
                                   (1, 4, 2, 7, 3, 41, 16),        # blocks of 6 rows: 2 a tile
                                   (2, 6, 3, 11, 4, 33, 40)])      # odd d, 3 blocks, b 2
@pytest.mark.parametrize("trans,vote", [(True, "mean"), (False, "mean"), (True, "max"),
                                        (False, "max")])
def test_prefill_keep_kernel(shape, trans, vote):
    from kernels.squeezed_prefill import prefill_keep as keep_fn
    from kernels.squeezed_prefill import prefill_keep_reference as reference

    def prefill_keep(*a, **kw):
        return keep_fn(*a, **kw, tuning={"trans": trans}, vote=vote)

    def prefill_keep_reference(*a):
        return reference(*a, vote=vote)

    b, hq, kv, q_len, block, k, d = shape
    gen, ctx = _gen()
    q = torch.randn(b, hq, q_len, d, generator=gen).to(DEVICE)
    c = torch.randn(kv, k, d, generator=gen).to(DEVICE)
    sizes = torch.randint(0, 30, (kv, k), generator=gen).float()            # some size 0
    ln = torch.log(sizes).to(DEVICE)
    assert_matches_reference(
        lambda *a: prefill_keep(*a, backend="triton"), prefill_keep_reference,
        (q, c, ln, d ** -0.5, block, None), names=("p",), context=ctx)
    p = prefill_keep_reference(q.double(), c.double(), ln.double(), d ** -0.5, block, None)
    threshold = float(p.flatten().kthvalue(max(1, int(0.8 * p.numel()))).values)
    got = prefill_keep(q, c, ln, d ** -0.5, block, threshold, backend="triton")
    near = (p - threshold).abs() <= 1e-6 * threshold
    assert got.dtype == torch.bool and bool(((got == (p >= threshold)) | near).all()), ctx


@needs_triton
@pytest.mark.parametrize("n, chunk", [(301, None), (4500, 2048), (5000, 1024)])
def test_select_flat_kernel(n, chunk):
    from kernels.squeezed_prefill import select_flat

    gen, ctx = _gen()
    b, kv, nb, k, n_sink, window = 1, 2, 3, 23, 4, 16
    keep = (torch.rand(b, kv, nb, k, generator=gen) < 0.3).to(DEVICE)
    keep[0, 1, 2] = False                                                   # sink + window only
    labels = torch.randint(0, k, (kv, n - n_sink - window), generator=gen).to(DEVICE,
                                                                             torch.int16)
    idx, cnt = select_flat(keep, labels, n, n_sink, window, chunk, backend="triton")
    ridx, rcnt = select_indices_reference(keep, labels, n, n_sink, window)
    assert torch.equal(cnt, rcnt), ctx
    ok = torch.arange(n, device=DEVICE) < cnt[..., None]
    assert torch.equal(idx[ok], ridx[ok]), ctx


@needs_triton
@pytest.mark.parametrize("case", [
    # b, hq, kv, q_len, block, n, u, splits
    (1, 8, 2, 21, None, 300, 21, 1),      # one set, GQA 4, u == q_len: 6 row tiles
    (1, 4, 4, 13, 5, 157, 17, 2),         # per-block lists, earlier user tokens, 2 splits
    (2, 6, 3, 9, None, 90, 12, 3),        # b 2, GQA 2, 3 splits (one may be empty)
])
def test_sparse_prefill_kernel(case):
    from kernels.squeezed_prefill import select_flat, sparse_prefill, sparse_prefill_reference

    b, hq, kv, q_len, block, n, u, splits = case
    gen, ctx = _gen()
    d = 32
    q, k, v, keep, labels = _user_case(gen, b, hq, kv, q_len, block, n, u, d=d)
    idx, cnt = select_flat(keep, labels, n, 4, 16, backend="torch")
    causal = n + u - q_len
    assert_matches_reference(
        lambda q, k, v: sparse_prefill(q, k, v, idx, cnt, block, d ** -0.5, causal_start=causal,
                                       user_start=n, user_len=u, n_splits=splits,
                                       backend="triton"),
        lambda q, k, v: sparse_prefill_reference(q, k, v, idx, cnt, block, d ** -0.5, causal,
                                                 n, u),
        (q, k, v), names=("o", "lse"), context=f"{ctx} {case}")
    # without user tokens: the same function as sparse_attention over the lists
    want = sparse_attention_reference(q.float(), k.float(), v.float(), idx, cnt, block,
                                      d ** -0.5)
    got = sparse_prefill(q.float(), k.float(), v.float(), idx, cnt, block, d ** -0.5,
                         n_splits=splits, backend="triton")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, msg=ctx)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, msg=ctx)


@needs_triton
@pytest.mark.parametrize("hq, kv, tuning", [(8, 2, {"prefetch": 2}),               # GQA 4
                                            (2, 2, {"prefetch": 4, "block_n": 32}),  # 1 row
                                            (6, 2, {"block_n": 32, "num_stages": 5}),
                                            (8, 2, {"index_ahead": True, "block_n": 16}),
                                            (2, 2, {"index_ahead": True})])
def test_select_and_attend_decode_variants(hq, kv, tuning):
    """Decode launch variants of the fused kernel (benchmarks/bench_squeezed.py times them;
    the L2 prefetch is off under the interpreter): the same output, lse and counts as the
    reference."""
    from kernels.squeezed_attention import select_and_attend

    b, q_len, block, n, u, chunk, d = 1, 1, 16, 700, 9, 128, 32
    gen, ctx = _gen()
    q, k, v, keep, labels = _user_case(gen, b, hq, kv, q_len, block, n, u, torch.int16, d)
    args = (keep, labels, n, 4, 16, block, d ** -0.5)
    kw = dict(causal_start=n + u - q_len, user_start=n, user_len=u, chunk=chunk)
    _, rcnt = select_chunks_reference(keep, labels, n, 4, 16, chunk)
    counts = {}

    def variant(q, k, v):
        o, lse, counts["got"] = select_and_attend(q, k, v, *args, **kw, backend="triton",
                                                  tuning=tuning)
        return o, lse

    def reference(q, k, v):
        return select_and_attend(q, k, v, *args, **kw, backend="torch")[:2]

    assert_matches_reference(variant, reference, (q, k, v), names=("o", "lse"), context=ctx)
    assert torch.equal(counts["got"], rcnt), ctx
