"""KVQuant Triton kernels against their PyTorch references (Triton's interpreter on CPU), and the
fused decode kernel on a real model's packed cache."""


from dataclasses import replace

import pytest
import torch

from kernels.kvquant_decode import (
    _kvq_decode_kernel,
    dequantize_packed,
    kvquant_decode_attention,
    kvquant_decode_reference,
    kvquant_decode_triton,
)
from kernels.kvquant_pack import quantize_pack, quantize_pack_reference, round_with_feedback
from kernels.testing import TEST_DEVICE, assert_matches_reference, fresh_seed
from kernels.testing import needs_triton as needs_triton_for
from workbench.errors import WorkbenchError
from workbench.kvquant.fused import pack_layer, random_layer
from workbench.kvquant.levels import nf_levels

DEVICE = TEST_DEVICE
needs_triton = needs_triton_for(_kvq_decode_kernel)


@needs_triton
@pytest.mark.parametrize("kv_heads,group,seq,head_dim,bits,frac,dtype,levels_per", [
    (2, 3, 150, 64, 3, 0.01, torch.bfloat16, "head"),   # GQA like SmolLM2, 3 tiles, 2 splits
    (3, 3, 150, 64, 3, 0.01, torch.bfloat16, "layer"),  # one level table for all heads
    (1, 1, 70, 32, 2, 0.01, torch.float16, "head"),     # MHA, a partial tile
    (2, 4, 130, 64, 4, 0.0, torch.bfloat16, "head"),    # Llama-3-like group, no sparse part
    (2, 2, 64, 64, 3, 0.05, torch.float32, "head"),     # one tile, many outliers, fp32 math
    (1, 5, 77, 128, 3, 0.03, torch.float16, "layer"),   # odd group (padded to 8), head_dim 128
    (2, 3, 100, 64, 3, 0.01, torch.bfloat16, "rotated"),  # values in the Hadamard basis
])
def test_decode_kernel_matches_reference(kv_heads, group, seq, head_dim, bits, frac, dtype,
                                         levels_per):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rotated = levels_per == "rotated"
    packed = random_layer(1, kv_heads, seq, head_dim, bits, frac, 1 if frac else 0,
                          device=DEVICE, generator=gen, levels_per="layer" if rotated else
                          levels_per, value_rotation="hadamard" if rotated else "none")
    assert packed.k_table.dim() == (2 if levels_per == "head" else 1)
    assert packed.v_hadamard == rotated
    q = torch.randn(1, kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    out = kvquant_decode_attention(q, packed, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches_reference(None, kvquant_decode_reference, (q, packed), kernel_out=(out,),
                             context=f"(seed {seed})")
    o, lse = kvquant_decode_triton(q, packed)
    assert not torch.isnan(o).any() and torch.isfinite(lse).any()
    # sparse entries in chunks of 16 (several chunks per tile): the same sums up to rounding
    o2, lse2 = kvquant_decode_triton(q, packed, e_chunk=16)
    torch.testing.assert_close(o2, o, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("kv_heads,group,seq,head_dim,frac,dtype,block", [
    (2, 3, 150, 64, 0.03, torch.float16, 64),     # GQA, 3 tiles, 2 splits
    (1, 1, 70, 32, 0.05, torch.bfloat16, 32),     # MHA, tiles of 32, a partial tile
    (2, 2, 40, 32, 0.0, torch.float32, 32),       # no sparse part, float32 math
    (2, 1, 300, 128, 0.02, torch.float16, 64),    # MHA (fma scores), 5 tiles, head_dim 128
])
def test_decode_variants_match_reference(kv_heads, group, seq, head_dim, frac, dtype, block):
    """The launch variants (sparse part in separate passes, queries rotated by a pre-pass,
    tiles of 32 tokens) against the reference, and the separate passes against the default
    launch's partials on the same tiles."""
    from workbench.kvquant.fused import reblock

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    packed = random_layer(1, kv_heads, seq, head_dim, 3, frac, 1 if frac else 0,
                          device=DEVICE, generator=gen)
    if block != packed.block:
        packed = reblock(packed, block)
    q = torch.randn(1, kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    o0, lse0 = kvquant_decode_triton(q, packed)
    for opts in ({"key_sparse": "prepass"}, {"key_sparse": "segments"},
                 {"key_sparse": "segments", "value_sparse": "segments"}, {"value_sparse": "post"},
                 {"key_sparse": "prepass", "value_sparse": "post", "rotate_queries": "prepass"},
                 *([{"score_math": "fma"}, {"score_math": "fma", "key_sparse": "segments",
                                             "value_sparse": "segments"},
                    {"score_math": "fma", "rotate_queries": "prepass"}] if group == 1 else [])):
        out = kvquant_decode_attention(q, packed, backend="triton", **opts)
        assert_matches_reference(None, kvquant_decode_reference, (q, packed),
                                 kernel_out=(out,), context=f"{opts} (seed {seed})")
        o, lse = kvquant_decode_triton(q, packed, **opts)
        torch.testing.assert_close(lse, lse0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o, o0, rtol=1e-3, atol=1e-3)
    with pytest.raises(WorkbenchError, match="key_sparse"):
        kvquant_decode_triton(q, packed, key_sparse="dense")
    if group > 1:
        with pytest.raises(WorkbenchError, match="score_math"):
            kvquant_decode_triton(q, packed, score_math="fma")


def test_reblock_and_token_offsets():
    """block_csr's per-token key offsets, and re-blocking the sparse part (same values)."""
    from workbench.kvquant.fused import reblock

    gen = torch.Generator().manual_seed(fresh_seed())
    p = random_layer(1, 2, 100, 32, 3, 0.05, 1, generator=gen)
    n_blocks = 2
    for i in range(2 * n_blocks):
        e0, e1 = int(p.k_ptr[i]), int(p.k_ptr[i + 1])
        tok = p.k_idx[e0:e1].long() // 32
        counts = torch.bincount(tok, minlength=64)
        start = p.k_tok[i * 64:(i + 1) * 64].long()
        assert torch.equal(start, torch.cumsum(counts, 0) - counts)
    p32 = reblock(p, 32)
    for a, b in zip(dequantize_packed(p), dequantize_packed(p32), strict=True):
        torch.testing.assert_close(a, b)
    assert p32.k_ptr.numel() == 2 * 4 + 1 and p32.k_tok.numel() == 2 * 4 * 32


def test_code_layout_and_csr_order():
    """The packed layout's bit map (kernels.kvquant_layout) and the block-CSR entry order."""
    from kernels.kvquant_decode import block_csr
    from kernels.kvquant_layout import pack_codes, unpack_codes

    gen = torch.Generator().manual_seed(fresh_seed())
    codes = torch.randint(0, 8, (3, 96), generator=gen, dtype=torch.uint8)
    planes = pack_codes(codes, 3)
    assert planes.shape == (3, 3, 12) and torch.equal(unpack_codes(planes), codes)
    words = planes.view(torch.int32)                                   # (3, bits, D/32)
    for w, lane, k in [(0, 0, 0), (1, 3, 7), (2, 2, 5), (0, 1, 3)]:
        ch = (lane // 2) * 48 + 16 * w + 8 * (lane % 2) + k
        for j in range(3):
            bit = (int(words[1, j, w]) >> ((4 * k + lane + j) % 32)) & 1
            assert bit == (int(codes[1, ch]) >> j) & 1
    # value entries by channel within a block, key entries by token
    b, h, s, d = 1, 2, 100, 32
    flat = torch.randperm(b * h * s * d, generator=gen)[:200].sort().values
    delta = torch.randn(200, generator=gen)
    for by_channel in (False, True):
        ptr, idx, val = block_csr(flat, delta, b, h, s, d, 64, by_channel=by_channel)
        assert int(ptr[-1]) == 200
        # groups are block-major: group (s // 64) * (B*H) + bh, so appended tokens append groups
        group = (flat // (b * h * d)) // 64 * (b * h) + (flat // d) % (b * h)
        assert torch.equal(ptr[1:] - ptr[:-1], torch.bincount(group, minlength=len(ptr) - 1).int())
        for i in range(len(ptr) - 1):
            e = idx[ptr[i]:ptr[i + 1]].long()
            key = (e % d) * 64 + e // d if by_channel else e
            assert torch.all(key[1:] > key[:-1])


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mode", ["token", "channel"])
@pytest.mark.parametrize("per_head", [False, True])
def test_pack_kernel_matches_reference(bits, mode, per_head):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 64, generator=gen).to(DEVICE)
    lv = nf_levels(bits)
    if per_head:                                   # one table per head: (2, 2^b), sorted
        lv = (lv.sign() * lv.abs() ** torch.tensor([[0.8], [1.3]])).sort(-1).values
    lv = lv.to(DEVICE)
    table = lv * 1.05
    if mode == "token":
        kw = dict(cut_lo=x.quantile(0.02, dim=1), cut_hi=x.quantile(0.98, dim=1),
                  rows_per_head=5, n_sink=1, heads=2)
    else:
        lo = torch.randn(2, 64, generator=gen).to(DEVICE) - 1.0
        kw = dict(lo=lo, hi=lo + 2.0, heads=2, rows_per_head=7, pos0=0, n_sink=2)
    if per_head:                    # the reference's rows of head j = one table lv[j] for all
        h = (torch.arange(37, device=x.device) // kw["rows_per_head"]) % 2
        full = quantize_pack_reference(x, lv, table, bits, **kw)
        for j in range(2):
            one = quantize_pack_reference(x, lv[j], table[j], bits, **kw)
            assert torch.equal(full[0][h == j], one[0][h == j])
            assert torch.equal(full[3][h == j], one[3][h == j])
    got = quantize_pack(x, lv, table, bits, backend="triton", **kw)
    ref = quantize_pack_reference(x, lv, table, bits, **kw)
    assert torch.equal(got[0], ref[0]), f"seed {seed}"
    for a, b in zip(got[1:], ref[1:], strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-3)


def _random_fisher(heads, d, gen, rank=4):
    """Fisher-like (H, D, D): a few dominant directions (as the keys' gradients have) + noise."""
    a = torch.randn(heads, d, rank, generator=gen) * 3
    b = torch.randn(heads, d, 4 * d, generator=gen) * 0.1
    return a @ a.transpose(1, 2) + b @ b.transpose(1, 2) / (4 * d)


def test_round_with_feedback_first_principles():
    """Diagonal Fisher: no feedback (= nearest rounding). Correlated Fisher: lower
    Fisher-weighted error e^T F e than nearest rounding; kept elements exact, never fed."""
    from workbench.kvquant.calibration import feedback_factor

    gen = torch.Generator().manual_seed(fresh_seed())
    h, m, d = 2, 200, 32
    x = torch.randn(h, m, d, generator=gen) * 0.4
    zero, scale = torch.zeros(1), torch.ones(1)
    lv = nf_levels(3)
    keep = torch.rand(h, m, d, generator=gen) < 0.02
    mids = (lv[1:] + lv[:-1]) / 2
    nearest = torch.bucketize(x.clamp(-1, 1).contiguous(), mids)
    diag = torch.diag_embed(torch.rand(h, d, generator=gen) + 0.5)
    codes, w = round_with_feedback(x, zero, scale, keep, lv, lv, feedback_factor(diag, 0.0))
    assert torch.equal(codes, nearest) and torch.equal(w, x)
    fisher = _random_fisher(h, d, gen)
    codes, w = round_with_feedback(x, zero, scale, keep, lv, lv, feedback_factor(fisher))
    def cost(deq):                                          # mean e^T F e per vector
        e = x - deq
        return float(torch.einsum("hmd,hde,hme->", e, fisher, e)) / (h * m)
    fed = torch.where(keep, w, lv[codes])                   # kept: the fed value, stored exactly
    assert cost(fed) < 0.6 * cost(torch.where(keep, x, lv[nearest]))
    assert torch.equal(w[..., 0], x[..., 0])                # the first channel gets no feedback


@needs_triton
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("per_head", [False, True])
def test_pack_kernel_feedback_matches_reference(bits, per_head):
    from workbench.kvquant.calibration import feedback_factor

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 32, generator=gen)
    lv = nf_levels(bits)
    if per_head:
        lv = (lv.sign() * lv.abs() ** torch.tensor([[0.8], [1.3]])).sort(-1).values
    lo = torch.randn(2, 32, generator=gen) - 1.0
    kw = dict(lo=lo.to(DEVICE), hi=(lo + 2.0).to(DEVICE), heads=2, rows_per_head=7, pos0=0,
              n_sink=2, feedback=feedback_factor(_random_fisher(2, 32, gen)).to(DEVICE))
    x, lv = x.to(DEVICE), lv.to(DEVICE)
    got = quantize_pack(x, lv, lv * 1.05, bits, backend="triton", **kw)
    ref = quantize_pack_reference(x, lv, lv * 1.05, bits, **kw)
    plain = quantize_pack_reference(x, lv, lv * 1.05, bits, **{**kw, "feedback": None})
    assert torch.equal(got[0], ref[0]), f"seed {seed}"
    assert not torch.equal(ref[0], plain[0])                # feedback changed some codes
    torch.testing.assert_close(got[3].float(), ref[3].float(), atol=1e-3, rtol=1e-3)
    assert torch.equal(ref[3] != 0, plain[3] != 0)          # same outliers and sinks kept


def test_decode_errors():
    packed = random_layer(1, 2, 40, 64, 3)
    three = torch.stack([nf_levels(3)] * 3)
    with pytest.raises(WorkbenchError, match="level tables"):
        quantize_pack(torch.randn(4, 64), three, three, 3, lo=torch.zeros(2, 64),
                      hi=torch.ones(2, 64), heads=2, rows_per_head=2)
    with pytest.raises(WorkbenchError, match="level tables"):
        kvquant_decode_attention(torch.randn(1, 2, 64), replace(packed, k_table=three))
    with pytest.raises(WorkbenchError, match="q must be"):
        kvquant_decode_attention(torch.randn(1, 3, 64), packed)
    with pytest.raises(WorkbenchError, match="per-token"):
        quantize_pack(torch.randn(4, 64), nf_levels(3), nf_levels(3), 3)
    with pytest.raises(WorkbenchError, match="error feedback"):
        quantize_pack(torch.randn(4, 64), nf_levels(3), nf_levels(3), 3, cut_lo=torch.zeros(4),
                      cut_hi=torch.ones(4), feedback=torch.eye(64)[None])


@needs_triton
def test_kernel_reads_real_cache():
    """Prefill real text into a KVQuantCache, pack one layer for the kernel: its keys/values are
    the cache's, and the kernel's attention matches attention over the cache's output."""
    from workbench.data import text_chunks
    from workbench.kvquant import KVQuantCache, forward_with_cache, load_calibration
    from workbench.models import load_model

    model, tok = load_model()
    cache = KVQuantCache(model, "nuq3-1%", load_calibration(model))
    ids = text_chunks(tok, 96, 1, "sharegpt")
    with torch.no_grad():
        forward_with_cache(model, ids, cache)
        k_cache, v_cache = cache.layers[7].update(torch.zeros(1, 3, 0, 64),
                                                  torch.zeros(1, 3, 0, 64))
    packed = pack_layer(cache.layers[7])
    k, v = dequantize_packed(packed)
    torch.testing.assert_close(k, k_cache, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v, v_cache, atol=1e-4, rtol=1e-4)
    q = torch.randn(1, 9, 64)
    got = kvquant_decode_attention(q, packed, backend="triton")
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_cache, v_cache, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(got, dense, atol=1e-3, rtol=1e-3)


@needs_triton
@pytest.mark.parametrize("kv_heads,group,r,head_dim,dtype", [
    (3, 3, 37, 64, torch.bfloat16),     # SmolLM2's GQA, a partial tile
    (2, 1, 1, 32, torch.float16),       # one key
    (1, 4, 70, 128, torch.float32),     # two tiles under the interpreter
])
def test_window_attention_kernel(kv_heads, group, r, head_dim, dtype):
    """The recent window's partial (kernels.window_decode) against its reference, and merged
    into the packed cache's attention by kvquant_decode_attention(extra_partial=...): the same
    as attending to the dequantized quantized tokens and the window together (the quantized
    values in the Hadamard basis, the window's not)."""
    from kernels.window_decode import window_attention, window_attention_reference

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
    k = torch.randn(2, kv_heads, r, head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(2, kv_heads, r, head_dim, generator=gen).to(DEVICE, dtype)
    scaling = head_dim ** -0.5
    assert_matches_reference(
        lambda *a: window_attention(*a, scaling, backend="triton"),
        lambda *a: window_attention_reference(*a, scaling), (q, k, v), names=("o", "lse"),
        context=f"(seed {seed})")

    packed = random_layer(2, kv_heads, 90, head_dim, 3, 0.02, 1, device=DEVICE, generator=gen,
                          value_rotation="hadamard")      # KVQuant's values: Hadamard basis
    kq, vq = dequantize_packed(packed, torch.float64)     # (B, H, S, D) post-RoPE keys
    part = window_attention(q, k, v, scaling, backend="triton")
    got, lse = kvquant_decode_attention(q, packed, backend="triton", extra_partial=part,
                                        return_lse=True)
    want, want_lse = window_attention_reference(q.double(), torch.cat([kq, k.double()], 2),
                                                torch.cat([vq, v.double()], 2), scaling)
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-2, rtol=1e-3)
    ref = kvquant_decode_attention(q, packed, backend="torch", extra_partial=part)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(WorkbenchError, match="power of two"):
        window_attention(q[..., :24], k[..., :24], v[..., :24], scaling, backend="triton")
