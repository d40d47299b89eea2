"""Fused decode attention over a KVQuant cache: packed codes in, attention output out.

One query token per sequence attends to S cached tokens whose keys and values are stored as
KVQuant stores them (`workbench.kvquant.quantize`):

    keys    pre-RoPE, b-bit codes in bit planes (B, H, S, bits, D/8) uint8, dequantized as
            k = table_k[code] * scale_k[h, d] + zero_k[h, d]   (per-channel, calibrated)
    values  b-bit codes (B, H, S, bits, D/8) uint8, v = table_v[code] * scale_v[b,h,s] + zero_v
    sparse  the outliers and the attention-sink tokens: fp16 deltas added to the dense values,
            as a block-CSR per (batch, kv head): blocks of BLOCK_N tokens, entry = int16
            (token_in_block * D + d) and fp16 delta; `ptr` (B*H*n_blocks + 1) int32 offsets
    RoPE    applied to the dequantized keys on the fly: angle = position * inv_freq

The kernel (one program per (batch, kv head, split of the tokens)) loops over tiles of BLOCK_N
tokens: unpack the codes, look up the level table, add the tile's sparse entries (a one-hot
product on the tensor cores), rotate the keys, scores for the G query heads of the KV head
(GQA) on the tensor cores, online softmax, value product. Each split writes a partial output and
its log-sum-exp; `kernels.lse_merge` merges the splits.

Why this kernel is slower than fp16 SDPA on an H200 (measured, benchmarks/results/
kvquant_decode_h200.json: nuq3 without outliers 2.2 ms vs SDPA 0.49 ms at 128K, 32 KV heads): it
is bound by CUDA-core arithmetic, not bytes. An H200 streams fp16 K/V at ~4.3 TB/s, i.e. ~2.2 G
elements/ms, while its 132 SMs issue ~33.5 G lane-ops/ms: SDPA's break-even is ~15 ops per
dequantized element, and 3x faster than SDPA leaves ~5. Each element here costs bit unpacking
(3 planes), the level lookup (a tree of 7 selects at 3 bits; 15 at 4 bits, where the table
gather is faster), scale/zero, and RoPE via angle addition: ~69 lane-ops per element measured.
The paper's 1.7x was on an A6000 (768 GB/s, ~100 ops of break-even). Beating SDPA here needs
packed 16-bit math (f16x2), byte-permute lookups (`prmt`, 4 per instruction) through inline
PTX and an outlier pass outside the dense loop, not a retuned version of this kernel.

Bytes read per token and KV head at D=128, 3 bits: 48 (key codes) + 48 (value codes) + 4
(value zero/scale) + ~4 per sparse entry (about 1% of 2*D elements: ~10) = ~110, against 512 for
fp16 keys and values: about 4.6x fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from kernels.lse_merge import merge_attention_partials
from workbench.errors import WorkbenchError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_N = 64            # tokens per tile, and per block of the sparse part's CSR


@dataclass
class PackedKV:
    """One layer's KVQuant cache in the kernel's layout (module docstring for shapes)."""

    k_planes: torch.Tensor      # (B, H, S, bits, D/8) uint8
    k_zero: torch.Tensor        # (H, D) float32
    k_scale: torch.Tensor       # (H, D) float32
    k_table: torch.Tensor       # (2^bits,) float32
    v_planes: torch.Tensor      # (B, H, S, bits, D/8) uint8
    v_zero: torch.Tensor        # (B, H, S) float16
    v_scale: torch.Tensor       # (B, H, S) float16
    v_table: torch.Tensor       # (2^bits,) float32
    k_ptr: torch.Tensor         # (B*H*n_blocks + 1,) int32
    k_idx: torch.Tensor         # (nnz_k,) int16: token_in_block * D + d
    k_val: torch.Tensor         # (nnz_k,) float16
    v_ptr: torch.Tensor
    v_idx: torch.Tensor
    v_val: torch.Tensor
    inv_freq: torch.Tensor      # (D/2,) float32
    rope_scale: float = 1.0     # the rotary embedding's attention scaling (1 for plain RoPE)
    block: int = BLOCK_N

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(batch, kv_heads, seq, head_dim, bits)."""
        b, h, s, bits, nb = self.k_planes.shape
        return b, h, s, nb * 8, bits

    def nbytes(self) -> int:
        """Bytes the kernel reads at most: every tensor once (inv_freq and tables included)."""
        return sum(t.numel() * t.element_size() for t in self.__dict__.values()
                   if isinstance(t, torch.Tensor))


def block_csr(index: torch.Tensor, delta: torch.Tensor, batch: int, heads: int, seq: int,
              head_dim: int, block: int = BLOCK_N):
    """Token-major COO outliers (flat index ((s * B + b) * H + h) * D + d, as the cache holds
    them) -> (ptr, idx int16, val fp16) block-CSR per (batch, kv head) over blocks of `block`."""
    if block * head_dim > 32767:
        raise WorkbenchError(f"block {block} x head_dim {head_dim} does not fit the int16 index.")
    idx = index.long()
    bhd = batch * heads * head_dim
    s, rest = idx // bhd, idx % bhd
    bh, d = rest // head_dim, rest % head_dim
    n_blocks = triton_cdiv(seq, block)
    order = torch.argsort(bh * seq + s, stable=True)
    s, bh, d, val = s[order], bh[order], d[order], delta[order].half()
    counts = torch.bincount(bh * n_blocks + s // block, minlength=batch * heads * n_blocks)
    ptr = torch.zeros(batch * heads * n_blocks + 1, dtype=torch.int64, device=idx.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr.to(torch.int32), ((s % block) * head_dim + d).to(torch.int16), val


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------
# Reference: dequantize everything, RoPE, plain attention (the teaching path)
# ----------------------------------------------------------------------------------------------


def _unpack(planes: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=planes.device, dtype=torch.uint8)
    bits = (planes[..., None] >> shifts) & 1                          # (..., bits, D/8, 8)
    w = (1 << torch.arange(planes.shape[-2], device=planes.device)).to(torch.uint8)
    return (bits * w[:, None, None]).sum(-3).reshape(*planes.shape[:-2], -1).long()


def _scatter_csr(dense: torch.Tensor, ptr, idx, val, block: int) -> torch.Tensor:
    b, h, s, d = dense.shape
    n_blocks = triton_cdiv(s, block)
    if idx.numel() == 0:
        return dense
    counts = (ptr[1:] - ptr[:-1]).long()                              # entries per (bh, block)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=dense.device), counts)
    bh, blk = owner // n_blocks, owner % n_blocks
    t = blk * block + idx.long() // d
    flat = dense.view(b * h, s, d)
    flat.index_put_((bh, t, idx.long() % d), val.to(dense.dtype), accumulate=True)
    return dense


def dequantize_packed(p: PackedKV, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE keys and values (B, H, S, D) in `dtype` (float32 or float64 math)."""
    b, h, s, d, _ = p.shape
    k = p.k_table.to(dtype)[_unpack(p.k_planes)] * p.k_scale.to(dtype)[None, :, None] \
        + p.k_zero.to(dtype)[None, :, None]
    k = _scatter_csr(k, p.k_ptr, p.k_idx, p.k_val, p.block)
    v = p.v_table.to(dtype)[_unpack(p.v_planes)] * p.v_scale.to(dtype)[..., None] \
        + p.v_zero.to(dtype)[..., None]
    v = _scatter_csr(v, p.v_ptr, p.v_idx, p.v_val, p.block)
    pos = torch.arange(s, device=k.device, dtype=dtype)
    ang = pos[:, None] * p.inv_freq.to(dtype)[None, :]                 # (S, D/2)
    cos, sin = torch.cos(ang) * p.rope_scale, torch.sin(ang) * p.rope_scale
    k1, k2 = k[..., : d // 2], k[..., d // 2:]
    k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return k, v


def kvquant_decode_reference(q: torch.Tensor, packed: PackedKV) -> torch.Tensor:
    """q (B, Hq, D) post-RoPE -> attention output (B, Hq, D) over the packed cache, in q.dtype:
    dequantized K/V are cast to q.dtype and attention runs in that precision (float64 q: the
    truth)."""
    b, h, s, d, _ = packed.shape
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = dequantize_packed(packed, math_dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    g = q.shape[1] // h
    qg = q.view(b, h, g, d)                                           # (B, H, G, D)
    scores = (qg @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))        # (B, H, G, S)
    probs = torch.softmax(scores.to(math_dtype), dim=-1).to(q.dtype)
    return (probs @ v).reshape(b, h * g, d)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _unpack_half(planes_ptr, row_off, n_ok, byte0: tl.constexpr, BITS: tl.constexpr,
                     NB: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr):
        # codes (BLOCK_N, HALF) int32 of channels [8 * byte0, 8 * byte0 + HALF): each plane byte
        # is loaded once and spread over its 8 channels by shifts
        nbh: tl.constexpr = HALF // 8
        offs_b = byte0 + tl.arange(0, nbh)
        shifts = tl.arange(0, 8)
        code = tl.zeros([BLOCK_N, nbh, 8], dtype=tl.int32)
        for j in tl.static_range(BITS):
            raw = tl.load(planes_ptr + row_off[:, None] + j * NB + offs_b[None, :],
                          mask=n_ok[:, None], other=0).to(tl.int32)      # (BLOCK_N, HALF/8)
            code |= ((raw[:, :, None] >> shifts[None, None, :]) & 1) << j
        return tl.reshape(code, [BLOCK_N, HALF])

    @triton.jit
    def _plane_bits(planes_ptr, row_off, n_ok, byte0, j: tl.constexpr, NB: tl.constexpr,
                    HALF: tl.constexpr):
        # bit j of the codes of channels [8 * byte0, 8 * byte0 + HALF): (BLOCK_N, HALF/8, 8) bool
        nbh: tl.constexpr = HALF // 8
        offs_b = byte0 + tl.arange(0, nbh)
        raw = tl.load(planes_ptr + row_off[:, None] + j * NB + offs_b[None, :],
                      mask=n_ok[:, None], other=0).to(tl.int32)
        return ((raw[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1) != 0

    @triton.jit
    def _pair(b, t_ptr, i: tl.constexpr):
        # level 2i + 1 where bit 0 is set, else level 2i
        return tl.where(b, tl.load(t_ptr + 2 * i + 1), tl.load(t_ptr + 2 * i))

    @triton.jit
    def _levels_select(t_ptr, planes_ptr, row_off, n_ok, byte0: tl.constexpr,
                       BITS: tl.constexpr, NB: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        # table[code] as a binary tree of selects on the code's bits (levels are scalars in
        # registers): 2^bits - 1 selects per element, no gather through the memory pipeline
        b0 = _plane_bits(planes_ptr, row_off, n_ok, byte0, 0, NB, HALF)
        b1 = _plane_bits(planes_ptr, row_off, n_ok, byte0, 1, NB, HALF)
        x = tl.where(b1, _pair(b0, t_ptr, 1), _pair(b0, t_ptr, 0))
        if BITS >= 3:
            b2 = _plane_bits(planes_ptr, row_off, n_ok, byte0, 2, NB, HALF)
            x = tl.where(b2, tl.where(b1, _pair(b0, t_ptr, 3), _pair(b0, t_ptr, 2)), x)
        if BITS >= 4:
            b3 = _plane_bits(planes_ptr, row_off, n_ok, byte0, 3, NB, HALF)
            x_hi = tl.where(b1, _pair(b0, t_ptr, 5), _pair(b0, t_ptr, 4))
            x_hi = tl.where(b2, tl.where(b1, _pair(b0, t_ptr, 7), _pair(b0, t_ptr, 6)), x_hi)
            x = tl.where(b3, x_hi, x)
        return tl.reshape(x, [BLOCK_N, HALF])

    @triton.jit
    def _levels(t_ptr, planes_ptr, row_off, n_ok, byte0: tl.constexpr, BITS: tl.constexpr,
                NB: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
                LUT_SELECT: tl.constexpr):
        # dequantized levels (BLOCK_N, HALF) float32 of one channel half
        if LUT_SELECT:
            x = _levels_select(t_ptr, planes_ptr, row_off, n_ok, byte0, BITS, NB, HALF,
                               BLOCK_N)
        else:
            x = tl.load(t_ptr + _unpack_half(planes_ptr, row_off, n_ok, byte0, BITS, NB, HALF,
                                             BLOCK_N))
        return x

    @triton.jit
    def _sparse_tiles(ptr_ptr, idx_ptr, val_ptr, blk_flat, blk_ok, n_local, lo, hi,
                      D: tl.constexpr, E_CHUNK: tl.constexpr):
        # the sparse deltas of one block as two dense (BLOCK_N, HALF) tiles (channel halves):
        # one-hot(token) (BLOCK_N, E) @ delta-at-channel (E, HALF), on the tensor cores
        e0 = tl.load(ptr_ptr + blk_flat, mask=blk_ok, other=0)
        e1 = tl.load(ptr_ptr + blk_flat + 1, mask=blk_ok, other=0)
        out1 = tl.zeros([n_local.shape[0], lo.shape[0]], dtype=tl.float32)
        out2 = tl.zeros([n_local.shape[0], lo.shape[0]], dtype=tl.float32)
        for e in range(e0, e1, E_CHUNK):
            offs_e = e + tl.arange(0, E_CHUNK)
            e_ok = offs_e < e1
            idx = tl.load(idx_ptr + offs_e, mask=e_ok, other=-1).to(tl.int32)
            val = tl.load(val_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
            t_e = tl.where(e_ok, idx // D, -1)
            d_e = idx % D
            onehot_t = (n_local[:, None] == t_e[None, :]).to(tl.float32)        # (BLOCK_N, E)
            out1 += tl.dot(onehot_t, tl.where(d_e[:, None] == lo[None, :], val[:, None], 0.0))
            out2 += tl.dot(onehot_t, tl.where(d_e[:, None] == hi[None, :], val[:, None], 0.0))
        return out1, out2

    @triton.jit
    def _kvq_decode_kernel(
        q_ptr, o_ptr, lse_ptr,                       # (B*Hq, D), (B*Hq, n_splits, D), (B*Hq, n_splits)
        kp_ptr, kz_ptr, ks_ptr, kt_ptr,              # key planes, per-channel zero/scale, table
        vp_ptr, vz_ptr, vs_ptr, vt_ptr,              # value planes, per-token zero/scale, table
        kptr_ptr, kidx_ptr, kval_ptr,                # key sparse block-CSR
        vptr_ptr, vidx_ptr, vval_ptr,                # value sparse block-CSR
        invf_ptr, rtab_ptr,                          # inv_freq (HALF,), cos/sin(t f) (2, BLOCK_N, HALF)
        S, H, G, n_blocks, n_splits, tiles_per_split, qk_scale, rope_scale,
        BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
        E_CHUNK: tl.constexpr, HAS_SPARSE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        LUT_SELECT: tl.constexpr,
    ):
        # Tensor-core operands are fp16 for 16-bit queries (bf16 queries are converted: keys,
        # values and probabilities fit fp16's range, and it has 3 more mantissa bits), fp32
        # otherwise; accumulation is fp32.
        HALF: tl.constexpr = D // 2
        NB: tl.constexpr = D // 8
        bh = tl.program_id(0)
        split = tl.program_id(1)
        h = bh % H
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        lo = tl.arange(0, HALF)
        hi = HALF + lo
        qrow = (bh * G + offs_g).to(tl.int64)                       # query rows of this KV head
        q1 = tl.load(q_ptr + qrow[:, None] * D + lo[None, :], mask=g_ok[:, None], other=0.0)
        q2 = tl.load(q_ptr + qrow[:, None] * D + hi[None, :], mask=g_ok[:, None], other=0.0)
        q1 = q1.to(DOT_DTYPE)
        q2 = q2.to(DOT_DTYPE)
        kz1 = tl.load(kz_ptr + h * D + lo)
        kz2 = tl.load(kz_ptr + h * D + hi)
        ks1 = tl.load(ks_ptr + h * D + lo)
        ks2 = tl.load(ks_ptr + h * D + hi)
        invf = tl.load(invf_ptr + lo)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc1 = tl.zeros([BLOCK_G, HALF], tl.float32)
        acc2 = tl.zeros([BLOCK_G, HALF], tl.float32)
        n_local = tl.arange(0, BLOCK_N)
        for tile in range(tiles_per_split):
            blk = split * tiles_per_split + tile
            offs_n = blk * BLOCK_N + n_local
            n_ok = offs_n < S
            row_off = (bh.to(tl.int64) * S + offs_n) * (BITS * NB)      # byte offset of planes
            # keys: codes -> levels -> per-channel scale/zero (+ sparse) -> RoPE
            k1 = _levels(kt_ptr, kp_ptr, row_off, n_ok, 0, BITS, NB, HALF, BLOCK_N, LUT_SELECT)
            k2 = _levels(kt_ptr, kp_ptr, row_off, n_ok, NB // 2, BITS, NB, HALF, BLOCK_N,
                         LUT_SELECT)
            k1 = k1 * ks1[None, :] + kz1[None, :]
            k2 = k2 * ks2[None, :] + kz2[None, :]
            if HAS_SPARSE:
                blk_flat = bh * n_blocks + blk
                blk_ok = blk < n_blocks
                dk1, dk2 = _sparse_tiles(kptr_ptr, kidx_ptr, kval_ptr, blk_flat, blk_ok, n_local,
                                         lo, hi, D, E_CHUNK)
                k1 += dk1
                k2 += dk2
            # cos/sin((p0 + t) * f) = angle addition of the tile start p0 (HALF cos/sin per
            # tile) and t < BLOCK_N (a small table, L1-resident): 4 FMAs per pair, no libdevice
            base = (blk * BLOCK_N).to(tl.float32) * invf                     # (HALF,)
            cb = tl.cos(base) * rope_scale
            sb = tl.sin(base) * rope_scale
            ct = tl.load(rtab_ptr + n_local[:, None] * HALF + lo[None, :])   # (BLOCK_N, HALF)
            st = tl.load(rtab_ptr + (BLOCK_N + n_local[:, None]) * HALF + lo[None, :])
            cos = cb[None, :] * ct - sb[None, :] * st
            sin = sb[None, :] * ct + cb[None, :] * st
            kr1 = (k1 * cos - k2 * sin).to(DOT_DTYPE)
            kr2 = (k2 * cos + k1 * sin).to(DOT_DTYPE)
            s = tl.dot(q1, tl.trans(kr1)) + tl.dot(q2, tl.trans(kr2))   # (BLOCK_G, BLOCK_N)
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # values: codes -> levels -> per-token scale/zero (+ sparse)
            vz = tl.load(vz_ptr + bh.to(tl.int64) * S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + bh.to(tl.int64) * S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            v1 = _levels(vt_ptr, vp_ptr, row_off, n_ok, 0, BITS, NB, HALF, BLOCK_N, LUT_SELECT)
            v2 = _levels(vt_ptr, vp_ptr, row_off, n_ok, NB // 2, BITS, NB, HALF, BLOCK_N,
                         LUT_SELECT)
            v1 = v1 * vs[:, None] + vz[:, None]
            v2 = v2 * vs[:, None] + vz[:, None]
            if HAS_SPARSE:
                dv1, dv2 = _sparse_tiles(vptr_ptr, vidx_ptr, vval_ptr, blk_flat, blk_ok, n_local,
                                         lo, hi, D, E_CHUNK)
                v1 += dv1
                v2 += dv2
            v1 = tl.where(n_ok[:, None], v1, 0.0).to(DOT_DTYPE)
            v2 = tl.where(n_ok[:, None], v2, 0.0).to(DOT_DTYPE)
            pc = p.to(DOT_DTYPE)
            acc1 = acc1 * alpha[:, None] + tl.dot(pc, v1)
            acc2 = acc2 * alpha[:, None] + tl.dot(pc, v2)
            m_i = m_new

        has = l_i > 0
        l_safe = tl.where(has, l_i, 1.0)
        out_row = (qrow * n_splits + split)
        tl.store(o_ptr + out_row[:, None] * D + lo[None, :], acc1 / l_safe[:, None],
                 mask=g_ok[:, None])
        tl.store(o_ptr + out_row[:, None] * D + hi[None, :], acc2 / l_safe[:, None],
                 mask=g_ok[:, None])
        lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + out_row, lse, mask=g_ok)

else:
    _kvq_decode_kernel = None


# ----------------------------------------------------------------------------------------------
# Launcher and public op
# ----------------------------------------------------------------------------------------------

_ROPE_TABLES: dict = {}


def rope_table(inv_freq: torch.Tensor, block: int) -> torch.Tensor:
    """(2, block, D/2) float32: cos and sin of t * inv_freq for t < block (cached per tensor)."""
    key = (inv_freq.data_ptr(), inv_freq.device, block, inv_freq.numel())
    if key not in _ROPE_TABLES:
        ang = torch.arange(block, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq
        _ROPE_TABLES[key] = torch.stack([torch.cos(ang), torch.sin(ang)]).contiguous()
    return _ROPE_TABLES[key]


_MIN_PROGRAMS = 528       # about four programs per multiprocessor on an H200 (132 SMs)


def choose_splits(batch_heads: int, seq: int, interpreted: bool = False) -> int:
    """Splits of the token axis so that the grid fills the GPU (one split per 8 tiles at most
    for short contexts; one in the interpreter unless the sequence is long)."""
    tiles = triton_cdiv(seq, BLOCK_N)
    if interpreted:
        return min(tiles, 2)
    want = max(1, triton_cdiv(_MIN_PROGRAMS, batch_heads))
    return max(1, min(tiles, want))


def kvquant_decode_triton(q: torch.Tensor, p: PackedKV, n_splits: int | None = None,
                          num_warps: int = 4, num_stages: int = 2, lut_select: bool = True):
    """Launch the kernel: q (B, Hq, D) -> partial outputs (B, Hq, n_splits, D) float32 and
    lses (B, Hq, n_splits) float32 (natural log). lut_select: levels by a tree of selects on
    the code bits (True) or by a gather from the level table (False)."""
    b, h, s, d, bits = p.shape
    hq = q.shape[1]
    g = hq // h
    n_blocks = triton_cdiv(s, p.block)
    if n_splits is None:
        n_splits = choose_splits(b * h, s, is_interpreted(_kvq_decode_kernel))
    tiles_per_split = triton_cdiv(n_blocks, n_splits)
    n_splits = triton_cdiv(n_blocks, tiles_per_split)
    o = torch.empty(b, hq, n_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n_splits, dtype=torch.float32, device=q.device)
    has_sparse = p.k_idx.numel() + p.v_idx.numel() > 0
    dummy_i = torch.zeros(1, dtype=torch.int16, device=q.device)
    dummy_v = torch.zeros(1, dtype=torch.float16, device=q.device)
    qk_scale = 1.0 / math.sqrt(d) * 1.4426950408889634
    _kvq_decode_kernel[(b * h, n_splits)](
        q.contiguous(), o, lse,
        p.k_planes, p.k_zero, p.k_scale, p.k_table,
        p.v_planes, p.v_zero, p.v_scale, p.v_table,
        p.k_ptr, p.k_idx if p.k_idx.numel() else dummy_i, p.k_val if p.k_val.numel() else dummy_v,
        p.v_ptr, p.v_idx if p.v_idx.numel() else dummy_i, p.v_val if p.v_val.numel() else dummy_v,
        p.inv_freq, rope_table(p.inv_freq, p.block),
        s, h, g, n_blocks, n_splits, tiles_per_split, qk_scale, float(p.rope_scale),
        BITS=bits, D=d, BLOCK_N=p.block, BLOCK_G=max(16, triton.next_power_of_2(g)),
        E_CHUNK=32, HAS_SPARSE=has_sparse,
        DOT_DTYPE=tl.float32 if q.dtype == torch.float32 else tl.float16,
        LUT_SELECT=lut_select, num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


def _check(q: torch.Tensor, p: PackedKV) -> None:
    b, h, s, d, bits = p.shape
    if q.dim() != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] % h:
        raise WorkbenchError(f"kvquant_decode_attention: q must be (batch={b}, q_heads (a "
                             f"multiple of kv_heads={h}), head_dim={d}), got {tuple(q.shape)}.")
    if d % 32 or d > 256:
        raise WorkbenchError(f"kvquant_decode_attention: head_dim must be a multiple of 32 up "
                             f"to 256, got {d}.")
    if s == 0:
        raise WorkbenchError("kvquant_decode_attention: the cache is empty.")
    if p.block != BLOCK_N:
        raise WorkbenchError(f"kvquant_decode_attention: the sparse part must use blocks of "
                             f"{BLOCK_N} tokens (block_csr(..., block={BLOCK_N})).")


def kvquant_decode_attention(q: torch.Tensor, packed: PackedKV, backend: str = "auto",
                             n_splits: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over a packed KVQuant cache.

    q: (B, Hq, D) post-RoPE queries, Hq a multiple of the cache's kv heads (GQA); float16,
    bfloat16 or float32. Returns (B, Hq, D) in q.dtype. backend: "auto" | "triton" | "torch".
    """
    _check(q, packed)
    which = pick_backend(backend, (q, packed.k_planes), _kvq_decode_kernel,
                         op="kvquant_decode_attention", supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        return kvquant_decode_reference(q, packed)
    o, lse = kvquant_decode_triton(q, packed, n_splits)
    merged, _ = merge_attention_partials(o, lse, backend="auto")
    return merged.to(q.dtype)
