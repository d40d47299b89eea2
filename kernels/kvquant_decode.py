"""Fused decode attention over a KVQuant cache: packed codes in, attention output out.

One query token per sequence attends to S cached tokens whose keys and values are stored as
KVQuant stores them (`workbench.kvquant.quantize`):

    keys    pre-RoPE, b-bit codes (B, H, S, bits, D/8) uint8 in the layout of
            `kernels.kvquant_layout`, dequantized as
            k = table_k[h, code] * scale_k[h, d] + zero_k[h, d]   (per-channel, calibrated)
    values  b-bit codes (B, H, S, bits, D/8) uint8, v = table_v[h, code] * scale_v[b,h,s] + zero_v
    tables  one level table per KV head (H, 2^bits), or one for all heads (2^bits,)
    rotated values (`v_hadamard`): the values were quantized as v @ H (H the orthonormal
            Hadamard matrix); the kernel attends in that basis and the output is rotated back
    sparse  the outliers and the attention-sink tokens: fp16 deltas added to the dense values,
            as a block-CSR per (batch, kv head): blocks of BLOCK_N tokens, entry = int16
            (token_in_block * D + d) and fp16 delta; `ptr` (n_blocks*B*H + 1) int32 offsets,
            block-major (group blk * B*H + b*H + h), so a growing cache appends blocks.
            Key entries are sorted by token within a block, value entries by channel.
    RoPE    applied to the dequantized keys on the fly

The kernel (one program per (batch, kv head, split of the tokens)) loops over tiles of BLOCK_N
tokens. What it does per element is the point of its design (an H200 streams fp16 K/V at
~2.2 G elements/ms and issues ~33.5 G lane-ops/ms, so matching fp16 SDPA allows ~15 operations
per dequantized element and 3x faster ~5):

- level lookup by byte permutes: the code layout turns three plane words into `prmt.b32`
  selectors with one rotate and one mask per plane and lane; each `prmt` looks up 4 codes in the
  low (or high) bytes of the 8 fp16 levels held in two registers, two more interleave low and
  high bytes into f16x2 pairs (inline PTX, `USE_ASM`; the same function in plain Triton is the
  fallback, used by the interpreter, by 4-bit codes and by float32 queries);
- packed fp16 math (ptxas pairs the elementwise fp16 operations into HFMA2): scale and zero,
  then RoPE. RoPE is split as R(p0 + t) = R(p0) R(t): the query is rotated back by the tile's
  start p0 (cos/sin of p0 from a per-tile table computed in float64), the keys by their offset
  t < BLOCK_N inside the tile, whose cos/sin (BLOCK_N x D/2) are the same for every tile and
  stay in registers;
- scores and the value product on the tensor cores (fp16 operands, fp32 accumulation), online
  softmax in fp32;
- the sparse part off the dense path: per tile, key outliers become score corrections
  delta * (q . R(p) e_d), summed per token (a histogram of the entries' tokens, prefix sums
  over the entries and two gathers) and added to the scores before the softmax; value
  outliers are weighted by the gathered probabilities of their tokens and summed per channel
  the same way, then added to the accumulator with the same rescaling. Exact, and ~E + N + D
  work per tile instead of a dense one-hot product.

Each split writes a partial output and its log-sum-exp; `kernels.lse_merge` merges the splits.

Measured on an H200 (benchmarks/results/kvquant_decode_h200.json, 128K tokens, batch 1, bf16
queries): nuq3-1% 1.26 ms for the Llama-2-7B shape (32 KV heads; fp16 SDPA 0.48 ms) and 0.46 ms
for the Llama-3-8B shape (8 KV heads; SDPA 0.137 ms); nuq3 without sparse part 0.77 / 0.19 ms
(the first kernel: 5.4 / 1.4 ms with outliers). Per kernel (torch.profiler, Llama-2 / Llama-3
shape, nuq3-1%): dense loop 885 / 229 us, key pre-pass 296 / 76 us, value post-pass 61 / 41 us.
The dense loop compiles to ~7 lane-operations per element (sm_90 SASS; the first kernel ~69)
but runs at ~550 GB/s of packed bytes: it is latency-bound (~214 registers per thread, two
blocks of four warps per multiprocessor, a chain of shared-memory round trips per tile;
capping registers at 168 or 128 spilled and was slower, 8 warps were slower). Not yet faster
than SDPA.
Launch options (`kvquant_decode_triton`; each exact against the reference in the interpreter
tests; benchmarks/bench_kvquant.py times them all next to the default):
- key_sparse="prepass" (the default where the cache has per-token offsets): a separate light
  kernel (one program per KV head and block) computes the key outliers' score corrections in
  token space from per-token entry offsets written at pack time
  (`block_csr(..., token_offsets=True)`: 2 bytes per token, read only by this mode) into a
  (B*Hq, S) fp32 buffer the loop adds to its scores. All entries of a chunk at once: the
  per-token sums are prefix sums over the entries read at the token boundaries (296 -> 65 us
  on the H200 for the Llama-2 shape against a first version that looped over each token's
  entries);
- value_sparse="post" (the default): the loop stores its scores (B*Hq, S) fp32; a separate
  kernel adds each value outlier, weighted by exp2(s - lse) of its token in its split, to that
  split's partial output by fp32 atomic adds before the merge;
- key_sparse="segments", value_sparse="segments": the sparse part inside the tile loop (1.51 /
  0.54 ms on the H200);
- rotate_queries="prepass": a separate kernel writes the per-tile rotated queries
  (B*Hq, n_blocks, D) in the math dtype, so the loop loads them instead of holding the fp32
  query halves and rotating them per tile and warp (not faster on the H200);
- tiles of 32 tokens: `workbench.kvquant.fused.reblock(packed, 32)` (the tile is the sparse
  part's block);
- score_math="fma" (one query head per KV head, e.g. Llama-2): scores and the value product by
  fp32 FMAs in registers (row sums of q * k; one accumulator row per token of the tile, summed
  after the loop, rescaled only when the running max grows) instead of tensor-core dots on
  15-of-16 padding rows whose operands go through shared memory. Local sm_90 SASS (Triton 3.9,
  nuq3-1% with both sparse passes, D=128): no shared-memory operands or HMMA; 64-token tiles
  250 registers and 1077 loop instructions per tile (the dot path: 220 / 938), 32-token tiles
  167 registers (3 blocks per SM) and 645 per tile. Not yet timed on a GPU.
Why the separate passes: with the sparse part in the loop the tile loop holds inner loops
(the entry chunks), and Triton's pipeliner then does not stage it (18 KB of shared memory
instead of 31 KB, num_stages has no effect), besides the histogram/prefix-sum barriers.
Local sm_90 SASS (Triton 3.9, ptxas from the triton package; nuq3-1%, D=128, 4 warps,
3 stages; Llama-2 shape G=1 / Llama-3 shape G=4): registers, tile-loop instructions per token,
barriers in the loop:
    default (segments)               224 / 236 regs, 20.6 / 26.2 per token, 36 / 82 BAR
    both sparse passes               220 / 220,      14.7 / 13.9,           10 / 14
    passes + query pre-pass          192 / 236,      15.0 / 14.5,           10 / 11
    passes + qrot, 32-token tiles    165 / 174,      18.8 / 18.5,           10 / 11 (3 / 2 blocks per SM)
    same, maxnreg=168                157 / 167, no spills: 3 blocks per SM for both
    no sparse: default 214 / 194, 13.9 / 13.4; qrot + 32-token tiles 157 / 165, 16.8 (3 blocks)
The pre-pass kernels are small: key corrections 32 regs, ~60-70 instructions per entry slot
of a block; value post 29-32 regs, 54 / 109 instructions per 128 entries.
With bf16 queries the math is fp16 (3 more mantissa bits than bf16) with fp32 softmax and
accumulation; float32 and fp16 queries take the float32 math (the fallback path: with fp16
queries, fp16 rounding of the dequantized, rotated keys went past 2x PyTorch's own fp16 error
on ~5% of random inputs). Errors stay within the flash-attention rule of `kernels.testing`.

Bytes read per token and KV head at D=128, 3 bits: 48 (key codes) + 48 (value codes) + 4
(value zero/scale) + ~4 per sparse entry (about 1% of 2*D elements: ~10) = ~110, against 512 for
fp16 keys and values: about 4.6x fewer. The cos/sin tables (BLOCK_N x D/2 and n_blocks x D/2,
shared by all heads) add ~8 bytes per block of 64 tokens, counted by `kernel_bytes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from kernels.hadamard import hadamard
from kernels.kvquant_layout import lookup_levels, unpack_codes
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
    k_table: torch.Tensor       # (2^bits,) or per KV head (H, 2^bits) float32
    v_planes: torch.Tensor      # (B, H, S, bits, D/8) uint8
    v_zero: torch.Tensor        # (B, H, S) float16
    v_scale: torch.Tensor       # (B, H, S) float16
    v_table: torch.Tensor       # (2^bits,) or (H, 2^bits) float32
    k_ptr: torch.Tensor         # (n_blocks*B*H + 1,) int32, block-major
    k_idx: torch.Tensor         # (nnz_k,) int16: token_in_block * D + d, by token in a block
    k_val: torch.Tensor         # (nnz_k,) float16
    v_ptr: torch.Tensor
    v_idx: torch.Tensor         # by channel within a block
    v_val: torch.Tensor
    inv_freq: torch.Tensor      # (D/2,) float32
    rope_scale: float = 1.0     # the rotary embedding's attention scaling (1 for plain RoPE)
    block: int = BLOCK_N
    k_tok: torch.Tensor | None = None   # (n_blocks*B*H*block,) int16: start of each token's key
                                        # entries relative to its block's (the key pre-pass)
    v_hadamard: bool = False    # values (codes, ranges, outliers) are in the Hadamard basis:
                                # v = (dequantized) @ H, and so is the attention output

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(batch, kv_heads, seq, head_dim, bits)."""
        b, h, s, bits, nb = self.k_planes.shape
        return b, h, s, nb * 8, bits

    def nbytes(self) -> int:
        """Bytes of the packed tensors (inv_freq and tables included; not the key pre-pass's
        per-token offsets k_tok, which `kernel_bytes` counts where they are read)."""
        return sum(t.numel() * t.element_size() for k, t in self.__dict__.items()
                   if isinstance(t, torch.Tensor) and k != "k_tok")

    def key_sparse_mode(self, key_sparse: str = "auto") -> str:
        """"auto" -> "prepass" when the per-token key offsets are there, else "segments"."""
        if key_sparse != "auto":
            return key_sparse
        return "prepass" if self.k_tok is not None else "segments"

    def kernel_bytes(self, key_sparse: str = "auto", value_sparse: str = "post",
                     q_heads: int | None = None) -> int:
        """Bytes the kernel reads from memory at least once: the packed tensors and its cos/sin
        tables (in-tile: 2 x BLOCK_N x D/2 float32; per tile start: n_blocks x 2 x D/2 float32).
        The per-token key offsets count only for the key pre-pass; the fp32 buffers of the
        separate passes (key score corrections written and read, scores written; `q_heads` rows
        each) count for those modes."""
        key_sparse = self.key_sparse_mode(key_sparse)
        prepass = key_sparse == "prepass" and self.k_idx.numel() > 0
        b, h, s, d, _ = self.shape
        n = self.nbytes() + (2 * self.block + 2 * triton_cdiv(s, self.block)) * d // 2 * 4
        if prepass and self.k_tok is not None:
            n += self.k_tok.numel() * self.k_tok.element_size()
        rows = b * (q_heads or h) * triton_cdiv(s, self.block) * self.block
        if prepass:
            n += 2 * rows * 4
        if value_sparse == "post" and self.v_idx.numel():
            n += rows * 4
        return n


def block_csr(index: torch.Tensor, delta: torch.Tensor, batch: int, heads: int, seq: int,
              head_dim: int, block: int = BLOCK_N, by_channel: bool = False,
              token_offsets: bool = False):
    """Token-major COO outliers (flat index ((s * B + b) * H + h) * D + d, as the cache holds
    them) -> (ptr, idx int16, val fp16) block-CSR per (batch, kv head) over blocks of `block`,
    block-major (entry group blk * B*H + bh: appending tokens appends groups); entries sorted by
    token within a block (by channel with `by_channel`). token_offsets (by token only): also
    tok int16 (n_blocks*B*H*block,), the start of each token's entries relative to its
    group's."""
    if block * head_dim > 32767:
        raise WorkbenchError(f"block {block} x head_dim {head_dim} does not fit the int16 index.")
    idx = index.long()
    bhd = batch * heads * head_dim
    s, rest = idx // bhd, idx % bhd
    bh, d = rest // head_dim, rest % head_dim
    n_blocks = triton_cdiv(seq, block)
    blk = (s // block) * (batch * heads) + bh
    inner = (d * block + s % block) if by_channel else ((s % block) * head_dim + d)
    order = torch.argsort(blk * (block * head_dim) + inner, stable=True)
    s, bh, d, val, blk = s[order], bh[order], d[order], delta[order].half(), blk[order]
    counts = torch.bincount(blk, minlength=batch * heads * n_blocks)
    ptr = torch.zeros(batch * heads * n_blocks + 1, dtype=torch.int64, device=idx.device)
    ptr[1:] = torch.cumsum(counts, 0)
    out = ptr.to(torch.int32), ((s % block) * head_dim + d).to(torch.int16), val
    if not token_offsets:
        return out
    if by_channel:
        raise WorkbenchError("block_csr: token offsets need entries sorted by token.")
    per_tok = torch.bincount(blk * block + s % block,
                             minlength=batch * heads * n_blocks * block).view(-1, block)
    start = torch.cumsum(per_tok, 1) - per_tok
    return (*out, start.reshape(-1).to(torch.int16).contiguous())


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------
# Reference: dequantize everything, RoPE, plain attention (the teaching path)
# ----------------------------------------------------------------------------------------------


def _unpack(planes: torch.Tensor) -> torch.Tensor:
    return unpack_codes(planes).long()


def csr_entries(ptr: torch.Tensor, idx: torch.Tensor, bh_count: int, head_dim: int,
                block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each block-CSR entry's (batch x head, token, channel), int64 (E,) each."""
    counts = (ptr[1:] - ptr[:-1]).long()                          # entries per (block, bh)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=idx.device), counts)
    blk, bh = owner // bh_count, owner % bh_count
    return bh, blk * block + idx.long() // head_dim, idx.long() % head_dim


def _scatter_csr(dense: torch.Tensor, ptr, idx, val, block: int) -> torch.Tensor:
    b, h, s, d = dense.shape
    if idx.numel() == 0:
        return dense
    bh, t, ch = csr_entries(ptr, idx, b * h, d, block)
    dense.view(b * h, s, d).index_put_((bh, t, ch), val.to(dense.dtype), accumulate=True)
    return dense


def dequantize_packed(p: PackedKV, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE keys and values (B, H, S, D) in `dtype` (float32 or float64 math)."""
    b, h, s, d, _ = p.shape
    k = lookup_levels(p.k_table.to(dtype), _unpack(p.k_planes)) * p.k_scale.to(dtype)[None, :, None] \
        + p.k_zero.to(dtype)[None, :, None]
    k = _scatter_csr(k, p.k_ptr, p.k_idx, p.k_val, p.block)
    v = lookup_levels(p.v_table.to(dtype), _unpack(p.v_planes)) * p.v_scale.to(dtype)[..., None] \
        + p.v_zero.to(dtype)[..., None]
    v = _scatter_csr(v, p.v_ptr, p.v_idx, p.v_val, p.block)
    if p.v_hadamard:                                                   # back from the basis
        v = v @ hadamard(d, v.device, dtype)
    pos = torch.arange(s, device=k.device, dtype=dtype)
    ang = pos[:, None] * p.inv_freq.to(dtype)[None, :]                 # (S, D/2)
    cos, sin = torch.cos(ang) * p.rope_scale, torch.sin(ang) * p.rope_scale
    k1, k2 = k[..., : d // 2], k[..., d // 2:]
    k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
    return k, v


def kvquant_decode_reference(q: torch.Tensor, packed: PackedKV, return_lse: bool = False):
    """q (B, Hq, D) post-RoPE -> attention output (B, Hq, D) over the packed cache, in q.dtype:
    dequantized K/V are cast to q.dtype and attention runs in that precision (float64 q: the
    truth). return_lse: also the log-sum-exp of the scaled scores (B, Hq), natural log, in the
    math dtype (float32, float64 for float64 q)."""
    b, h, s, d, _ = packed.shape
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = dequantize_packed(packed, math_dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    g = q.shape[1] // h
    qg = q.view(b, h, g, d)                                           # (B, H, G, D)
    scores = (qg @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))        # (B, H, G, S)
    probs = torch.softmax(scores.to(math_dtype), dim=-1).to(q.dtype)
    out = (probs @ v).reshape(b, h * g, d)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores.to(math_dtype), dim=-1).reshape(b, h * g)


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------


def _lut_asm(bits: int) -> str:
    """PTX: three (two) plane words of one 32-channel group + the level table's low and high
    bytes in four registers -> 32 fp16 levels, slot l * 8 + k (kernels.kvquant_layout)."""
    lines = ["{", ".reg .b32 ra, rb, rs, rl, rh, rx, ry;"]
    for lane in range(4):
        for j in range(bits):
            w = f"${32 + j}"
            src = w
            if lane:
                lines.append(f"shf.r.wrap.b32 rb, {w}, {w}, {lane};")
                src = "rb"
            if j == 0:
                lines.append(f"and.b32 ra, {src}, {hex(0x11111111 << j)};")
            else:
                lines.append(f"and.b32 rb, {src}, {hex(0x11111111 << j)};")
                lines.append("or.b32 ra, ra, rb;")
        for part in range(2):
            sel = "ra"
            if part:
                lines.append("shr.b32 rs, ra, 16;")
                sel = "rs"
            lines.append(f"prmt.b32 rl, $35, $36, {sel};")
            lines.append(f"prmt.b32 rh, $37, $38, {sel};")
            lines.append("prmt.b32 rx, rl, rh, 0x5140;")
            lines.append("prmt.b32 ry, rl, rh, 0x7362;")
            o = lane * 8 + part * 4
            lines.append(f"mov.b32 {{${o}, ${o + 1}}}, rx;")
            lines.append(f"mov.b32 {{${o + 2}, ${o + 3}}}, ry;")
    lines.append("}")
    return "\n".join(lines)


if HAS_TRITON:
    _ASM2 = tl.constexpr(_lut_asm(2))
    _ASM3 = tl.constexpr(_lut_asm(3))
    _ASM_CONSTRAINTS = tl.constexpr(",".join(["=h"] * 32 + ["r"] * 7))
    _F16X32 = tl.constexpr((tl.float16,) * 32)

    @triton.jit
    def _t4(o, i0: tl.constexpr, st: tl.constexpr):
        return tl.join(tl.join(o[i0], o[i0 + 2 * st]), tl.join(o[i0 + st], o[i0 + 3 * st]))

    @triton.jit
    def _t16(o, i0: tl.constexpr):
        # outputs o[i0 .. i0 + 15] joined so that the flattened last dims are in natural order
        # (the last join pairs o[2i] with o[2i + 1], the halves of one f16x2 register)
        a = tl.join(_t4(o, i0, 4), _t4(o, i0 + 2, 4))
        b = tl.join(_t4(o, i0 + 1, 4), _t4(o, i0 + 3, 4))
        return tl.join(a, b)

    @triton.jit
    def _table_like_levels(t_ptr, BLOCK_N: tl.constexpr, HALF: tl.constexpr, NG: tl.constexpr,
                           MATH: tl.constexpr):
        # t (BLOCK_N, HALF) row-major, loaded as 16 (BLOCK_N, NG) slices joined like the decoded
        # levels: the result has their register layout (no layout conversion in the loop)
        p = t_ptr + tl.arange(0, BLOCK_N)[:, None] * HALF + tl.arange(0, NG)[None, :] * 16
        o = (tl.load(p + 0), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4),
             tl.load(p + 5), tl.load(p + 6), tl.load(p + 7), tl.load(p + 8), tl.load(p + 9),
             tl.load(p + 10), tl.load(p + 11), tl.load(p + 12), tl.load(p + 13),
             tl.load(p + 14), tl.load(p + 15))
        return tl.reshape(_t16(o, 0), [BLOCK_N, HALF]).to(MATH)

    @triton.jit
    def _decode(w_ptr, row_w, n_ok, t_ptr, reg_ptr, BITS: tl.constexpr, NG: tl.constexpr,
                BLOCK_N: tl.constexpr, MATH: tl.constexpr, USE_ASM: tl.constexpr):
        # levels (BLOCK_N, D/2) x 2 of the first and second channel halves: column 16 w + m of
        # a half is channel 16 w + m of it (kernels.kvquant_layout)
        offs_w = tl.arange(0, NG)
        base = w_ptr + row_w[:, None] + offs_w[None, :]
        w0 = tl.load(base, mask=n_ok[:, None], other=0)
        w1 = tl.load(base + NG, mask=n_ok[:, None], other=0)
        if USE_ASM:
            z = tl.zeros_like(w0)
            regs = [z + tl.load(reg_ptr), z + tl.load(reg_ptr + 1), z + tl.load(reg_ptr + 2),
                    z + tl.load(reg_ptr + 3)]
            if BITS == 2:
                o = tl.inline_asm_elementwise(_ASM2, _ASM_CONSTRAINTS, [w0, w1, z] + regs,
                                              dtype=_F16X32, is_pure=True, pack=1)
            else:
                w2 = tl.load(base + 2 * NG, mask=n_ok[:, None], other=0)
                o = tl.inline_asm_elementwise(_ASM3, _ASM_CONSTRAINTS, [w0, w1, w2] + regs,
                                              dtype=_F16X32, is_pure=True, pack=1)
            x1 = tl.reshape(_t16(o, 0), [BLOCK_N, NG * 16])
            x2 = tl.reshape(_t16(o, 16), [BLOCK_N, NG * 16])
        else:
            # slot (l, k) of column m of a half: l = 2 * half + m // 8, k = m % 8
            m = tl.arange(0, 16)
            sh1 = 4 * (m % 8) + m // 8                                   # + j: bit of plane j
            c1 = tl.zeros([BLOCK_N, NG, 16], dtype=tl.int32)
            c2 = tl.zeros([BLOCK_N, NG, 16], dtype=tl.int32)
            for j in tl.static_range(BITS):
                wj = tl.load(base + j * NG, mask=n_ok[:, None], other=0)[:, :, None]
                c1 |= ((wj >> ((sh1 + j) % 32)[None, None, :]) & 1) << j
                c2 |= ((wj >> ((sh1 + 2 + j) % 32)[None, None, :]) & 1) << j
            x1 = tl.reshape(tl.load(t_ptr + c1), [BLOCK_N, NG * 16]).to(MATH)
            x2 = tl.reshape(tl.load(t_ptr + c2), [BLOCK_N, NG * 16]).to(MATH)
        return x1, x2

    @triton.jit
    def _rows(x, GS: tl.constexpr, BLOCK_G: tl.constexpr):
        # (GS, M) -> (BLOCK_G, M), row r = x[r % GS] (rows >= G are padding: any values do)
        if GS == BLOCK_G:
            return x
        else:
            return tl.reshape(tl.broadcast_to(x[None, :, :], [BLOCK_G // GS, GS, x.shape[1]]),
                              [BLOCK_G, x.shape[1]])

    @triton.jit
    def _segment_bounds(seg, ok, NSEG: tl.constexpr):
        # entries sorted by seg (E,) int32, masked ones last: [start, end) of each segment
        cnt = tl.histogram(seg, NSEG, mask=ok)
        end = tl.cumsum(cnt, 0)
        return end - cnt, end

    @triton.jit
    def _segment_sum(x, start, end):
        # x (E,) fp32 in segment order (masked entries 0) -> (NSEG,) sums per segment, by
        # prefix sums and two gathers. Rank 1 on purpose: Triton 3.6's layout optimization of
        # a 2-D gather with fewer rows than warps asserts (setOptimizedGatherLayout, #11600)
        c = tl.cumsum(x, 0)
        hi_v = tl.where(end > 0, tl.gather(c, tl.maximum(end - 1, 0), 0), 0.0)
        lo_v = tl.where(start > 0, tl.gather(c, tl.maximum(start - 1, 0), 0), 0.0)
        return hi_v - lo_v

    @triton.jit
    def _key_chunk(corr, idx_ptr, val_ptr, offs_e, e_ok, blk, q_ptr, qrow0, G, rtab_ptr,
                   ttab_ptr, start, end, c0, D: tl.constexpr, BLOCK_N: tl.constexpr,
                   GS: tl.constexpr, HIST: tl.constexpr):
        # corr (GS, BLOCK_N) += the score corrections of one chunk of a block's key outliers,
        # summed per token: an outlier delta at pre-RoPE channel d of token p0 + t adds
        # delta * (q . R(p0 + t) e_d). The tokens' entry bounds within the chunk come from a
        # histogram of the chunk (HIST) or from per-token offsets start/end relative to the
        # block's first entry, the chunk starting at entry c0
        HALF: tl.constexpr = D // 2
        idx = tl.load(idx_ptr + offs_e, mask=e_ok, other=0).to(tl.int32)
        val = tl.load(val_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        t_e = idx // D
        d_e = idx % D
        i_e = d_e % HALF
        up = d_e >= HALF
        cb = tl.load(ttab_ptr + blk * D + i_e)
        sb = tl.load(ttab_ptr + blk * D + HALF + i_e)
        ct = tl.load(rtab_ptr + t_e * HALF + i_e)
        st = tl.load(rtab_ptr + (BLOCK_N + t_e) * HALF + i_e)
        c = cb * ct - sb * st
        sn = sb * ct + cb * st
        if HIST:
            lo, hi = _segment_bounds(t_e, e_ok, BLOCK_N)
        else:
            lo = tl.minimum(tl.maximum(start - c0, 0), offs_e.shape[0])
            hi = tl.minimum(tl.maximum(end - c0, 0), offs_e.shape[0])
        rows = tl.arange(0, GS)[:, None]
        for g in tl.static_range(GS):
            qrow = qrow0 + tl.minimum(g, G - 1)                # rows >= G: padding copies
            qa = tl.load(q_ptr + qrow * D + i_e).to(tl.float32)
            qb = tl.load(q_ptr + qrow * D + HALF + i_e).to(tl.float32)
            delta = val * tl.where(up, qb * c - qa * sn, qa * c + qb * sn)
            corr += tl.where(rows == g, _segment_sum(delta, lo, hi)[None, :], 0.0)
        return corr

    @triton.jit
    def _key_sparse(ptr_ptr, idx_ptr, val_ptr, blk_flat, blk, blk_ok, q_ptr, qrow0, G,
                    rtab_ptr, ttab_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    GS: tl.constexpr, E_CHUNK: tl.constexpr):
        # score corrections (GS, BLOCK_N) of the tile's key outliers, inside the tile loop
        e0 = tl.load(ptr_ptr + blk_flat, mask=blk_ok, other=0)
        e1 = tl.load(ptr_ptr + blk_flat + 1, mask=blk_ok, other=0)
        corr = tl.zeros([GS, BLOCK_N], dtype=tl.float32)
        for e in range(e0, e1, E_CHUNK):
            offs_e = e + tl.arange(0, E_CHUNK)
            corr = _key_chunk(corr, idx_ptr, val_ptr, offs_e, offs_e < e1, blk, q_ptr, qrow0, G,
                              rtab_ptr, ttab_ptr, 0, 0, 0, D, BLOCK_N, GS, True)
        return corr

    @triton.jit
    def _value_sparse(p, ptr_ptr, idx_ptr, val_ptr, blk_flat, blk_ok, D: tl.constexpr,
                      BLOCK_G: tl.constexpr, GS: tl.constexpr, E_CHUNK: tl.constexpr):
        # sum over the tile's value outliers of p[token] * delta, per channel: (GS, D)
        e0 = tl.load(ptr_ptr + blk_flat, mask=blk_ok, other=0)
        e1 = tl.load(ptr_ptr + blk_flat + 1, mask=blk_ok, other=0)
        rows_p = tl.arange(0, BLOCK_G)[:, None]
        rows = tl.arange(0, GS)[:, None]
        corr = tl.zeros([GS, D], dtype=tl.float32)
        for e in range(e0, e1, E_CHUNK):
            offs_e = e + tl.arange(0, E_CHUNK)
            e_ok = offs_e < e1
            idx = tl.load(idx_ptr + offs_e, mask=e_ok, other=0).to(tl.int32)
            val = tl.load(val_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
            t_e = idx // D
            start, end = _segment_bounds(idx % D, e_ok, D)
            for g in tl.static_range(GS):
                pg = tl.sum(tl.where(rows_p == g, p, 0.0), axis=0)    # (BLOCK_N,) row g
                pe = tl.gather(pg, t_e, 0)                          # (E,)
                corr += tl.where(rows == g, _segment_sum(pe * val, start, end)[None, :], 0.0)
        return corr

    @triton.jit
    def _key_corr_kernel(kc_ptr, q_ptr, kptr_ptr, kidx_ptr, kval_ptr, ktok_ptr, rtab_ptr,
                         ttab_ptr, G, n_blocks, SP, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         GS: tl.constexpr, E_CHUNK: tl.constexpr):
        # key pre-pass, one program per (batch x kv head, block): the score corrections
        # (G, BLOCK_N) of the block's key outliers, written to kc (B*Hq, SP) fp32 for the dense
        # loop. An outlier delta at pre-RoPE channel d of token p0 + t adds
        # delta * (q . R(p0 + t) e_d). All entries of a chunk at once; the per-token sums are
        # prefix sums over the entries (sorted by token) read at the token boundaries, which
        # the per-token entry offsets of block_csr(..., token_offsets=True) give directly
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        blk_flat = blk * tl.num_programs(0) + bh               # block-major CSR groups
        e0 = tl.load(kptr_ptr + blk_flat)
        e1 = tl.load(kptr_ptr + blk_flat + 1)
        n_local = tl.arange(0, BLOCK_N)
        tb = blk_flat.to(tl.int64) * BLOCK_N
        start = tl.load(ktok_ptr + tb + n_local).to(tl.int32)          # relative to e0
        last = n_local + 1 >= BLOCK_N
        end = tl.where(last, e1 - e0, tl.load(ktok_ptr + tb + n_local + 1, mask=~last,
                                              other=0).to(tl.int32))
        corr = tl.zeros([GS, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, e1 - e0, E_CHUNK):
            offs_e = e0 + c0 + tl.arange(0, E_CHUNK)
            corr = _key_chunk(corr, kidx_ptr, kval_ptr, offs_e, offs_e < e1, blk, q_ptr, bh * G,
                              G, rtab_ptr, ttab_ptr, start, end, c0, D, BLOCK_N, GS, False)
        qrows = (bh * G + tl.minimum(tl.arange(0, GS), G - 1)).to(tl.int64)[:, None]
        tl.store(kc_ptr + qrows * SP + blk * BLOCK_N + n_local[None, :], corr,
                 mask=(tl.arange(0, GS) < G)[:, None])

    @triton.jit
    def _value_post_kernel(o_ptr, lse_ptr, s_ptr, vptr_ptr, vidx_ptr, vval_ptr, G, n_blocks,
                           n_splits, tiles_per_split, SP, D: tl.constexpr,
                           BLOCK_N: tl.constexpr, GS: tl.constexpr, E_CHUNK: tl.constexpr):
        # value post-pass, one program per (batch x kv head, split): each value outlier of the
        # split weighted by its token's probability within the split, exp2(s - lse) from the
        # scores the dense loop stored, added to the split's partial output by fp32 atomic
        # adds (o is acc / l, so p / l is what it needs; ~G adds per entry)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, GS)
        g_ok = rows < G
        qrow = (bh * G + tl.minimum(rows, G - 1)).to(tl.int64)
        out_row = qrow * n_splits + split
        lse2 = tl.load(lse_ptr + out_row) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
        blk_lo = split * tiles_per_split
        blk_hi = tl.minimum(blk_lo + tiles_per_split, n_blocks)
        for blk in range(blk_lo, blk_hi):
            e0 = tl.load(vptr_ptr + blk * tl.num_programs(0) + bh)      # block-major
            e1 = tl.load(vptr_ptr + blk * tl.num_programs(0) + bh + 1)
            for e in range(e0, e1, E_CHUNK):
                offs_e = e + tl.arange(0, E_CHUNK)
                e_ok = offs_e < e1
                idx = tl.load(vidx_ptr + offs_e, mask=e_ok, other=0).to(tl.int32)
                val = tl.load(vval_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
                tok = blk * BLOCK_N + idx // D
                ok = g_ok[:, None] & e_ok[None, :]
                sv = tl.load(s_ptr + qrow[:, None] * SP + tok[None, :], mask=ok,
                             other=float("-inf"))
                w = tl.exp2(sv - lse2[:, None]) * val[None, :]            # (GS, E)
                tl.atomic_add(o_ptr + out_row[:, None] * D + (idx % D)[None, :], w, mask=ok,
                              sem="relaxed")

    @triton.jit
    def _qrot_kernel(qr_ptr, q_ptr, ttab_ptr, n_blocks, D: tl.constexpr, TB: tl.constexpr):
        # query pre-pass, one program per (query row, TB tiles): the query rotated back by each
        # tile's start, R(p0)^T q, in the dense loop's math dtype: (B*Hq, n_blocks, D)
        HALF: tl.constexpr = D // 2
        row = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1) * TB + tl.arange(0, TB)
        ok = (blk < n_blocks)[:, None]
        lo = tl.arange(0, HALF)[None, :]
        q1 = tl.load(q_ptr + row * D + lo).to(tl.float32)
        q2 = tl.load(q_ptr + row * D + HALF + lo).to(tl.float32)
        cb = tl.load(ttab_ptr + blk[:, None] * D + lo, mask=ok, other=0.0)
        sb = tl.load(ttab_ptr + blk[:, None] * D + HALF + lo, mask=ok, other=0.0)
        out = qr_ptr + row * n_blocks * D + blk[:, None] * D + lo
        tl.store(out, (q1 * cb + q2 * sb).to(qr_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HALF, (q2 * cb - q1 * sb).to(qr_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _kvq_decode_kernel(
        q_ptr, o_ptr, lse_ptr,                       # (B*Hq, D), (B*Hq, n_splits, D), (B*Hq, n_splits)
        kw_ptr, kz_ptr, ks_ptr, kt_ptr, kreg_ptr,    # key plane words (int32), zero, scale, levels
        vw_ptr, vz_ptr, vs_ptr, vt_ptr, vreg_ptr,    # value plane words, per-token zero/scale, levels
        kptr_ptr, kidx_ptr, kval_ptr,                # key sparse block-CSR
        vptr_ptr, vidx_ptr, vval_ptr,                # value sparse block-CSR
        rtab_ptr, ttab_ptr,                          # cos/sin(t f) (2, BLOCK_N, D/2); cos/sin(p0 f) (n_blocks, 2, D/2)
        kc_ptr, s_ptr,                               # (B*Hq, SP) fp32: key score corrections in, scores out
        qr_ptr,                                      # (B*Hq, n_blocks, D): rotated queries (QROT)
        S, H, G, n_blocks, n_splits, tiles_per_split, qk_scale, SP,
        BITS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
        GS: tl.constexpr, E_CHUNK: tl.constexpr, HAS_KS: tl.constexpr, HAS_VS: tl.constexpr,
        HALF_MATH: tl.constexpr, USE_ASM: tl.constexpr, TBL: tl.constexpr = 8,
        KS_MODE: tl.constexpr = 0,
        VS_MODE: tl.constexpr = 0, QROT: tl.constexpr = 0, FMA: tl.constexpr = 0,
    ):
        # KS_MODE 0: key outliers by segment sums in the loop; 1: their score corrections
        # precomputed by _key_corr_kernel, loaded per tile. VS_MODE 0: value outliers by
        # segment sums in the loop; 1: the loop stores its scores for _value_post_kernel.
        # Modes 1 keep the dense loop free of inner loops (the pipeliner then stages it).
        # QROT 1: the per-tile rotated queries come from _qrot_kernel (loaded, not computed:
        # no fp32 query halves and cos/sin in the dot operand layout across the loop).
        # FMA 1 (one query row per KV head, BLOCK_G = GS = 1): scores and the value product
        # by fp32 FMAs in registers instead of tensor-core dots, whose operands go through
        # shared memory: s = row sums of q * k; the accumulator keeps one row per token of
        # the tile (BLOCK_N, D/2) x 2, rescaled only when the running max grows, and is summed
        # over its rows once, after the loop.
        # HALF_MATH: dequantization, RoPE and the tensor-core operands in fp16 (bf16 queries,
        # converted: keys, values and probabilities fit fp16's range, and it has 3 more
        # mantissa bits); else float32 throughout. Softmax and accumulation: fp32.
        HALF: tl.constexpr = D // 2
        NG: tl.constexpr = D // 32
        MATH: tl.constexpr = tl.float16 if HALF_MATH else tl.float32
        PREC: tl.constexpr = "tf32" if HALF_MATH else "ieee"
        bh = tl.program_id(0)
        split = tl.program_id(1)
        h = bh % H
        lo = tl.arange(0, HALF)
        hi = HALF + lo
        offs_gs = tl.arange(0, GS)
        gs_ok = offs_gs < G
        qrow_s = (bh * G + offs_gs).to(tl.int64)                      # query rows of this KV head
        q1 = tl.load(q_ptr + qrow_s[:, None] * D + lo[None, :], mask=gs_ok[:, None],
                     other=0.0).to(tl.float32)
        q2 = tl.load(q_ptr + qrow_s[:, None] * D + hi[None, :], mask=gs_ok[:, None],
                     other=0.0).to(tl.float32)
        ks1 = tl.load(ks_ptr + h * D + lo).to(MATH)
        ks2 = tl.load(ks_ptr + h * D + hi).to(MATH)
        kz1 = tl.load(kz_ptr + h * D + lo).to(MATH)
        kz2 = tl.load(kz_ptr + h * D + hi).to(MATH)
        n_local = tl.arange(0, BLOCK_N)
        ct = _table_like_levels(rtab_ptr, BLOCK_N, HALF, NG, MATH)
        kt_h = kt_ptr + h * TBL                                       # this KV head's levels:
        vt_h = vt_ptr + h * TBL                                       # (TBL,) and 4 prmt
        kreg_h = kreg_ptr + h * 4                                     # registers
        vreg_h = vreg_ptr + h * 4
        st = _table_like_levels(rtab_ptr + BLOCK_N * HALF, BLOCK_N, HALF, NG, MATH)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        ACC_ROWS: tl.constexpr = BLOCK_N if FMA else BLOCK_G
        acc1 = tl.zeros([ACC_ROWS, HALF], tl.float32)
        acc2 = tl.zeros([ACC_ROWS, HALF], tl.float32)
        for tile in range(tiles_per_split):
            blk = split * tiles_per_split + tile
            blk_ok = blk < n_blocks
            blk_flat = blk * tl.num_programs(0) + bh                # block-major CSR groups
            offs_n = blk * BLOCK_N + n_local
            n_ok = offs_n < S
            # the query rotated back by the tile start: q . R(p0 + t) k = (R(p0)^T q) . R(t) k
            if QROT:
                qrb = qr_ptr + (bh * G).to(tl.int64) * n_blocks * D + blk * D
                qr_ok = blk * D + lo < n_blocks * D
                if GS == 1:
                    qa = tl.broadcast_to(tl.load(qrb + lo, mask=qr_ok, other=0.0)[None, :],
                                         [BLOCK_G, HALF])
                    qb = tl.broadcast_to(tl.load(qrb + hi, mask=qr_ok, other=0.0)[None, :],
                                         [BLOCK_G, HALF])
                else:
                    qro = tl.minimum(tl.arange(0, BLOCK_G) % GS, G - 1)[:, None] * (n_blocks * D)
                    qa = tl.load(qrb + qro + lo[None, :], mask=qr_ok[None, :], other=0.0)
                    qb = tl.load(qrb + qro + hi[None, :], mask=qr_ok[None, :], other=0.0)
            else:
                lo_ok = blk * D + lo < n_blocks * D
                cb = tl.load(ttab_ptr + blk * D + lo, mask=lo_ok, other=0.0)[None, :]
                sb = tl.load(ttab_ptr + blk * D + hi, mask=lo_ok, other=0.0)[None, :]
                qa = _rows(q1 * cb + q2 * sb, GS, BLOCK_G).to(MATH)
                qb = _rows(q2 * cb - q1 * sb, GS, BLOCK_G).to(MATH)
            row_w = (bh.to(tl.int64) * S + offs_n) * (BITS * NG)        # word offset of planes
            # keys: codes -> levels -> per-channel scale/zero -> RoPE by the in-tile offset
            k1, k2 = _decode(kw_ptr, row_w, n_ok, kt_h, kreg_h, BITS, NG, BLOCK_N, MATH,
                             USE_ASM)
            k1 = k1 * ks1[None, :] + kz1[None, :]
            k2 = k2 * ks2[None, :] + kz2[None, :]
            kr1 = k1 * ct - k2 * st
            kr2 = k2 * ct + k1 * st
            if FMA:
                s = tl.sum(qa.to(tl.float32) * kr1.to(tl.float32)
                           + qb.to(tl.float32) * kr2.to(tl.float32), axis=1)[None, :]
            else:
                s = tl.dot(qa, tl.trans(kr1), input_precision=PREC)
                s = tl.dot(qb, tl.trans(kr2), s, input_precision=PREC)   # (BLOCK_G, BLOCK_N)
            if HAS_KS and KS_MODE == 1:
                if GS == 1:
                    s += tl.load(kc_ptr + (bh * G).to(tl.int64) * SP + offs_n, mask=n_ok,
                                 other=0.0)[None, :]
                else:
                    kr = tl.minimum(tl.arange(0, GS), G - 1)
                    s += _rows(tl.load(kc_ptr + (bh * G).to(tl.int64) * SP + kr[:, None] * SP
                                       + offs_n[None, :], mask=n_ok[None, :], other=0.0),
                               GS, BLOCK_G)
            if HAS_KS and KS_MODE == 0:
                s += _rows(_key_sparse(kptr_ptr, kidx_ptr, kval_ptr, blk_flat, blk, blk_ok,
                                       q_ptr, bh * G, G, rtab_ptr, ttab_ptr, D, BLOCK_N, GS,
                                       E_CHUNK), GS, BLOCK_G)
            s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
            if HAS_VS and VS_MODE == 1:
                # rows repeat with period GS: store one copy of the G query rows
                s_g = tl.max(tl.reshape(s, [BLOCK_G // GS, GS, BLOCK_N]), axis=0)
                sr = tl.arange(0, GS)
                tl.store(s_ptr + (bh * G).to(tl.int64) * SP + sr[:, None] * SP
                         + offs_n[None, :], s_g, mask=(sr < G)[:, None] & n_ok[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # values: codes -> levels -> per-token scale/zero (masked tokens have p = 0 and
            # finite levels: no select needed)
            vz = tl.load(vz_ptr + bh.to(tl.int64) * S + offs_n, mask=n_ok, other=0.0).to(MATH)
            vs = tl.load(vs_ptr + bh.to(tl.int64) * S + offs_n, mask=n_ok, other=0.0).to(MATH)
            v1, v2 = _decode(vw_ptr, row_w, n_ok, vt_h, vreg_h, BITS, NG, BLOCK_N, MATH,
                             USE_ASM)
            v1 = v1 * vs[:, None] + vz[:, None]
            v2 = v2 * vs[:, None] + vz[:, None]
            if FMA:
                if tl.max(m_new - m_i, axis=0) > 0:          # the max grew: rescale the rows
                    acc1 = acc1 * alpha[:, None]
                    acc2 = acc2 * alpha[:, None]
                pt = tl.reshape(p, [BLOCK_N])[:, None]                  # (BLOCK_N, 1)
                acc1 += pt * v1.to(tl.float32)
                acc2 += pt * v2.to(tl.float32)
            else:
                pc = p.to(MATH)
                acc1 = tl.dot(pc, v1, acc1 * alpha[:, None], input_precision=PREC)
                acc2 = tl.dot(pc, v2, acc2 * alpha[:, None], input_precision=PREC)
            if HAS_VS and VS_MODE == 0:
                cv = _value_sparse(p, vptr_ptr, vidx_ptr, vval_ptr, blk_flat, blk_ok, D,
                                   BLOCK_G, GS, E_CHUNK)                 # (GS, D)
                cv1, cv2 = tl.split(tl.permute(tl.reshape(cv, [GS, 2, HALF]), (0, 2, 1)))
                if FMA:                                 # into one row of the token rows
                    acc1 += tl.where(n_local[:, None] == 0, cv1, 0.0)
                    acc2 += tl.where(n_local[:, None] == 0, cv2, 0.0)
                else:
                    acc1 += _rows(cv1, GS, BLOCK_G)
                    acc2 += _rows(cv2, GS, BLOCK_G)
            m_i = m_new
        if FMA:
            acc1 = tl.sum(acc1, axis=0)[None, :]                       # (1, D/2)
            acc2 = tl.sum(acc2, axis=0)[None, :]

        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < G
        qrow = (bh * G + offs_g).to(tl.int64)
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
    _kvq_decode_kernel = _key_corr_kernel = _value_post_kernel = _qrot_kernel = None


# ----------------------------------------------------------------------------------------------
# Launcher and public op
# ----------------------------------------------------------------------------------------------

_TABLES: dict = {}


def _cached(source: torch.Tensor, key, make):
    """make(), cached by `key` and the address of `source`, the tensor it is computed from. The
    entry holds a reference to `source`, so that address cannot be freed and handed to another
    tensor (which would then hit this entry) while the entry lives."""
    key = (key, source.data_ptr(), source.device, source.dtype, source.numel(), source._version)
    if key not in _TABLES:
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = (source, make())
    return _TABLES[key][1]


_PLACEHOLDERS: dict = {}


def _placeholders(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-element float32 / int16 / float16 tensors for the pointer arguments of modes that are
    off (the kernel never reads or writes them), made once per device: a decode step then
    launches no fills for them."""
    key = str(device)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = tuple(torch.zeros(1, dtype=dt, device=device)
                                   for dt in (torch.float32, torch.int16, torch.float16))
    return _PLACEHOLDERS[key]


def rope_table(inv_freq: torch.Tensor, block: int) -> torch.Tensor:
    """(2, block, D/2) float32: cos and sin of t * inv_freq for t < block (float64 math)."""
    def make():
        ang = torch.arange(block, device=inv_freq.device, dtype=torch.float64)[:, None] \
            * inv_freq.double()
        return torch.stack([torch.cos(ang), torch.sin(ang)]).float().contiguous()
    return _cached(inv_freq, ("rope", block), make)


def tile_table(inv_freq: torch.Tensor, block: int, n_blocks: int,
               dtype=torch.float32) -> torch.Tensor:
    """(>= n_blocks, 2, D/2) in `dtype`: cos and sin of (tile * block) * inv_freq (float64
    math); cached with room to grow (a power of two of tiles)."""
    cap = triton.next_power_of_2(n_blocks) if triton is not None else n_blocks

    def make():
        pos = torch.arange(cap, device=inv_freq.device, dtype=torch.float64)[:, None] * block
        ang = pos * inv_freq.double()
        return torch.stack([torch.cos(ang), torch.sin(ang)], dim=1).to(dtype).contiguous()
    return _cached(inv_freq, ("tile", block, cap, dtype), make)


def level_tables(table: torch.Tensor, heads: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per KV head (a single table (K,) is repeated): levels in fp16 and in float32
    (H, max(8, K)), zero-padded, and the prmt registers (H, 4) int32 (low bytes of levels 0-3,
    4-7, high bytes of levels 0-3, 4-7: tables of up to 8 entries; 16: fp16/fp32 levels only)."""
    def make():
        t = table.float().reshape(-1, table.shape[-1]).expand(heads, -1)   # (H, K)
        n = max(8, t.shape[1])
        t32 = torch.zeros(heads, n, dtype=torch.float32, device=table.device)
        t32[:, : t.shape[1]] = t
        t16 = t32.half()
        b = t16[:, :8].contiguous().view(torch.uint8)                  # little endian: lo, hi
        regs = torch.stack([b[:, 0:8:2], b[:, 8:16:2], b[:, 1:8:2], b[:, 9:16:2]], 1)
        return t16, t32, regs.contiguous().view(torch.int32).reshape(heads, 4)
    if table.dim() == 2 and table.shape[0] != heads:
        raise WorkbenchError(f"kvquant_decode: {table.shape[0]} level tables for {heads} heads.")
    return _cached(table, ("levels", heads), make)


_MIN_PROGRAMS = 1056      # about eight programs per multiprocessor on an H200 (132 SMs): the
                          # Llama-2 shape at 128K ran in 0.82 ms with 34 splits vs 0.95 with 17


def choose_splits(batch_heads: int, seq: int, interpreted: bool = False,
                  block: int = BLOCK_N) -> int:
    """Splits of the token axis so that the grid fills the GPU (one in the interpreter unless
    the sequence is long)."""
    tiles = triton_cdiv(seq, block)
    if interpreted:
        return min(tiles, 2)
    want = max(1, triton_cdiv(_MIN_PROGRAMS, batch_heads))
    return max(1, min(tiles, want))


def kvquant_decode_triton(q: torch.Tensor, p: PackedKV, n_splits: int | None = None,
                          num_warps: int = 4, num_stages: int = 3, use_asm: bool | None = None,
                          e_chunk: int = 128, max_registers: int | None = None,
                          key_sparse: str = "auto", value_sparse: str = "post",
                          rotate_queries: str = "loop", score_math: str = "dot"):
    """Launch the kernel: q (B, Hq, D) -> partial outputs (B, Hq, n_splits, D) float32 and
    lses (B, Hq, n_splits) float32 (natural log). use_asm: levels by PTX byte permutes (default
    on a GPU for 2- and 3-bit codes and bf16 queries) or by the plain-Triton fallback.
    max_registers: cap on registers per thread (ptxas spills above it; the kernel uses ~214 at
    4 warps, which allows two blocks per multiprocessor: a lower cap trades spills for
    occupancy, not yet measured).
    key_sparse: "prepass" (a separate kernel writes the key outliers' score corrections,
    (B*Hq, S) fp32, from the per-token entry offsets of `block_csr(..., token_offsets=True)`;
    the loop adds them), "segments" (in the loop) or "auto" (the default: "prepass" when the
    cache has the per-token offsets, as the KVQuant cache's packing writes them). value_sparse:
    "post" (the default: the loop stores its scores, (B*Hq, S) fp32; a separate kernel adds
    the value outliers to the partial outputs) or "segments". The separate passes keep the
    dense loop free of inner loops and barriers for the sparse part: on the H200 at 128K,
    nuq3-1%, 1.26 vs 1.50 ms (Llama-2 shape) and 0.43 vs 0.54 ms (Llama-3 shape).
    rotate_queries: "loop" (each tile rotates the query by its start, the default) or
    "prepass" (a separate kernel writes the rotated queries, (B*Hq, n_blocks, D) in the math
    dtype; the loop loads them; not faster on the H200). score_math: "dot" (scores and the
    value product on the tensor cores, query rows padded to 16) or "fma" (one query head per
    KV head only: fp32 FMAs in registers, no shared-memory operands; not yet timed on a GPU)."""
    b, h, s, d, bits = p.shape
    hq = q.shape[1]
    g = hq // h
    if score_math not in ("dot", "fma") or (score_math == "fma" and g != 1):
        raise WorkbenchError(f"score_math must be 'dot' or 'fma' ('fma' for one query head per "
                             f"KV head), got {score_math!r} with {g} query heads per KV head.")
    fma = score_math == "fma"
    n_blocks = triton_cdiv(s, p.block)
    interpreted = is_interpreted(_kvq_decode_kernel)
    if n_splits is None:
        n_splits = choose_splits(b * h, s, interpreted, p.block)
    tiles_per_split = triton_cdiv(n_blocks, n_splits)
    n_splits = triton_cdiv(n_blocks, tiles_per_split)
    # fp16 math for bf16 queries (fp16 has 3 more mantissa bits than bf16: well inside 2x
    # PyTorch's bf16 error); fp16 queries take the float32 math, as fp16 intermediate rounding
    # (dequantization and RoPE) exceeded 2x PyTorch's own fp16 error on ~5% of random inputs
    half_math = q.dtype == torch.bfloat16
    asm_ok = half_math and bits <= 3 and not interpreted
    if use_asm is None:
        use_asm = asm_ok
    elif use_asm and not asm_ok:
        raise WorkbenchError("use_asm needs a GPU, 2- or 3-bit codes and bf16 queries.")
    o = torch.empty(b, hq, n_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, n_splits, dtype=torch.float32, device=q.device)
    has_ks, has_vs = p.k_idx.numel() > 0, p.v_idx.numel() > 0
    if key_sparse not in ("auto", "segments", "prepass") or \
            value_sparse not in ("segments", "post"):
        raise WorkbenchError(f"key_sparse must be 'auto', 'segments' or 'prepass' and "
                             f"value_sparse 'segments' or 'post', got {key_sparse!r}, "
                             f"{value_sparse!r}.")
    key_sparse = p.key_sparse_mode(key_sparse)
    ks_mode = int(key_sparse == "prepass" and has_ks)
    vs_mode = int(value_sparse == "post" and has_vs)
    if ks_mode and p.k_tok is None:
        raise WorkbenchError("key_sparse='prepass' needs the per-token key offsets "
                             "(PackedKV.k_tok, from block_csr(..., token_offsets=True)).")
    sp = n_blocks * p.block
    dummy_f, dummy_i, dummy_v = _placeholders(q.device)
    rtab = rope_table(p.inv_freq, p.block)
    ttab = tile_table(p.inv_freq, p.block, n_blocks)
    qc = q.contiguous()
    kc = dummy_f
    if ks_mode:
        kc = torch.empty(b * hq, sp, dtype=torch.float32, device=q.device)
        _key_corr_kernel[(b * h, n_blocks)](
            kc, qc, p.k_ptr, p.k_idx, p.k_val, p.k_tok, rtab, ttab, g, n_blocks, sp,
            D=d, BLOCK_N=p.block, GS=triton.next_power_of_2(g), E_CHUNK=e_chunk, num_warps=4)
    s_buf = torch.empty(b * hq, sp, dtype=torch.float32, device=q.device) if vs_mode \
        else dummy_f
    if rotate_queries not in ("loop", "prepass"):
        raise WorkbenchError(f"rotate_queries must be 'loop' or 'prepass', got "
                             f"{rotate_queries!r}.")
    qrot = rotate_queries == "prepass"
    qr = dummy_f
    if qrot:
        qr = torch.empty(b * hq, n_blocks, d, device=q.device,
                         dtype=torch.float16 if half_math else torch.float32)
        _qrot_kernel[(b * hq, triton_cdiv(n_blocks, 16))](qr, qc, ttab, n_blocks, D=d, TB=16,
                                                          num_warps=4)
    kt16, kt32, kregs = level_tables(p.k_table, h)
    vt16, vt32, vregs = level_tables(p.v_table, h)
    qk_scale = float(p.rope_scale) / math.sqrt(d) * 1.4426950408889634
    gs = triton.next_power_of_2(g)
    _kvq_decode_kernel[(b * h, n_splits)](
        qc, o, lse,
        p.k_planes.view(torch.int32), p.k_zero, p.k_scale,
        kt16 if half_math else kt32, kregs,
        p.v_planes.view(torch.int32), p.v_zero, p.v_scale,
        vt16 if half_math else vt32, vregs,
        p.k_ptr, p.k_idx if has_ks else dummy_i, p.k_val if has_ks else dummy_v,
        p.v_ptr, p.v_idx if has_vs else dummy_i, p.v_val if has_vs else dummy_v,
        rtab, ttab, kc, s_buf, qr,
        s, h, g, n_blocks, n_splits, tiles_per_split, qk_scale, sp,
        BITS=bits, D=d, BLOCK_N=p.block, BLOCK_G=1 if fma else max(16, gs), GS=gs,
        E_CHUNK=e_chunk,
        HAS_KS=has_ks, HAS_VS=has_vs, HALF_MATH=half_math, USE_ASM=bool(use_asm),
        TBL=kt16.shape[1],
        num_warps=num_warps, num_stages=num_stages,
        **({"KS_MODE": 1} if ks_mode else {}), **({"VS_MODE": 1} if vs_mode else {}),
        **({"QROT": 1} if qrot else {}), **({"FMA": 1} if fma else {}),
        **({"maxnreg": int(max_registers)} if max_registers and not interpreted else {}),
    )
    if vs_mode:
        _value_post_kernel[(b * h, n_splits)](
            o, lse, s_buf, p.v_ptr, p.v_idx, p.v_val, g, n_blocks, n_splits, tiles_per_split,
            sp, D=d, BLOCK_N=p.block, GS=gs, E_CHUNK=e_chunk, num_warps=4)
    return o, lse


def _check(q: torch.Tensor, p: PackedKV) -> None:
    b, h, s, d, bits = p.shape
    if q.dim() != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] % h:
        raise WorkbenchError(f"kvquant_decode_attention: q must be (batch={b}, q_heads (a "
                             f"multiple of kv_heads={h}), head_dim={d}), got {tuple(q.shape)}.")
    if d % 32 or d > 256 or d & (d - 1):
        raise WorkbenchError(f"kvquant_decode_attention: head_dim must be a power of two from "
                             f"32 to 256, got {d}.")
    if s == 0:
        raise WorkbenchError("kvquant_decode_attention: the cache is empty.")
    for t in (p.k_table, p.v_table):
        if t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] != h) or t.shape[-1] > 16:
            raise WorkbenchError(f"kvquant_decode_attention: level tables {tuple(t.shape)} for "
                                 f"{h} KV heads: give (2^bits,) or (kv_heads, 2^bits).")
    if p.block not in (32, BLOCK_N):
        raise WorkbenchError(f"kvquant_decode_attention: the sparse part must use blocks of "
                             f"32 or {BLOCK_N} tokens (block_csr(..., block={BLOCK_N})); the "
                             f"block is the kernel's tile.")


def kvquant_decode_attention(q: torch.Tensor, packed: PackedKV, backend: str = "auto",
                             n_splits: int | None = None, return_lse: bool = False,
                             extra_partial: tuple[torch.Tensor, torch.Tensor] | None = None,
                             **launch):
    """Attention of one query token per sequence over a packed KVQuant cache.

    q: (B, Hq, D) post-RoPE queries, Hq a multiple of the cache's kv heads (GQA); float16,
    bfloat16 or float32. Returns (B, Hq, D) in q.dtype, and with return_lse also the
    log-sum-exp of the scaled scores (B, Hq) float32, natural log (to merge with attention
    over other keys). extra_partial: (o (B, Hq, D), lse (B, Hq)) of attention over other keys
    (e.g. `kernels.window_decode.window_attention` over an unquantized window), merged in by
    the same log-sum-exp merge launch as the kernel's splits. backend: "auto" | "triton" |
    "torch". launch: further options of `kvquant_decode_triton` (key_sparse, value_sparse, ...).
    """
    _check(q, packed)
    which = pick_backend(backend, (q, packed.k_planes), _kvq_decode_kernel,
                         op="kvquant_decode_attention", supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        o, lse = kvquant_decode_reference(q, packed, return_lse=True)
        o, lse = o[:, :, None], lse[:, :, None]                      # one part
    else:
        o, lse = kvquant_decode_triton(q, packed, n_splits, **launch)
        if packed.v_hadamard:             # partials over rotated values: rotate back (linear,
            o = o @ hadamard(o.shape[-1], o.device)  # so before or after the merge is the same)
    if extra_partial is not None:
        eo, el = extra_partial
        o = torch.cat([o.float(), eo.float()[:, :, None]], 2)       # (B, Hq, parts + 1, D)
        lse = torch.cat([lse.float(), el.float()[:, :, None]], 2)
    if o.shape[2] == 1:
        merged, lse = o[:, :, 0], lse[:, :, 0]
    else:
        merged, lse = merge_attention_partials(o, lse, backend="auto")
    return (merged.to(q.dtype), lse) if return_lse else merged.to(q.dtype)
