"""Gathered (sparse) FlashAttention over kept key indices, for decode and prefill, split-KV.

sparse_attention(q, k, v, indices, counts, block_size, scaling, causal_start=None)
    Each (batch, KV head, block of queries) has its own list of kept key indices (counts[...]
    of them, the rest of the row is padding). All query heads of the KV head's group and all
    queries of the block attend exactly those keys, so one program loads each kept K/V row once
    for group * block query rows (GQA shares the bytes). The list is cut into `n_splits` parts
    (split-KV: enough programs to fill the GPU when there are few blocks, as in decode); each
    part gives a partial output and log-sum-exp, merged by `kernels.lse_merge`.
    causal_start: with it, key index j is visible to query t only if j <= causal_start + t
    (the user tokens' own causal attention, with indices = positions). Without it, no mask
    (the fixed context lies before every user query).

squeezed_context_attention(q, k, v, mask, block_size, scaling)
    mask (b, kv, n_blocks, n) -> `compact_mask` -> `sparse_attention`: what the online path runs
    on a GPU for the context part.

Bytes per (batch, KV head, block), one query block: kept * 2 * d * itemsize (K and V rows) +
kept * 4 (indices) + rows * d * itemsize (q, o). A dense kernel reads n * 2 * d * itemsize: at a
budget of 1/8 the kernel reads ~1/8 of the bytes (plus the indices, 4 / (2 * d * 2) = 1.6% of a
key row at d = 128 in bf16). Random row gathers of 256 contiguous bytes still run near full
bandwidth on a GPU.

Shapes: q (b, hq, q_len, d); k, v (b, kv, n, d); indices (b, kv, n_blocks, L) int32 with counts
(b, kv, n_blocks) int32. Returns (o (b, hq, q_len, d) in q.dtype, lse (b, hq, q_len) float32
natural log; -inf and o = 0 for a query with no visible key).
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from kernels.lse_merge import merge_attention_partials
from kernels.squeezed_lookup import _fp32_dot, block_layout, block_rows, compact_mask
from kernels.squeezed_select import chunk_size, compact_chunk, select_chunks_reference
from workbench.errors import WorkbenchError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
SELECT_SUB = 2048     # positions one fused selection step scans with a prefix sum


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def sparse_attention_reference(q, k, v, indices, counts, block_size, scaling, causal_start=None):
    """PyTorch reference: gather the kept rows, attend, in the precision a user would write
    (scores from a matmul in the input dtype, softmax in float32, p cast back for p @ v)."""
    b, hq, q_len, d = q.shape
    kv = k.shape[1]
    g = hq // kv
    nb, bs = block_layout(q_len, block_size)
    width = indices.shape[-1]
    ok = torch.arange(width, device=q.device) < counts[..., None].long()    # (b, kv, nb, L)
    safe = torch.where(ok, indices.long(), 0)
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = torch.arange(kv, device=q.device)[None, :, None, None]
    kg, vg = k[bi, hi, safe], v[bi, hi, safe]                               # (b, kv, nb, L, d)
    x, _ = block_rows(q, kv, block_size)                                    # (b, kv, nb, r, d)
    ct = torch.promote_types(q.dtype, torch.float32)
    s = (x @ kg.transpose(-1, -2)).to(ct) * scaling                         # (b, kv, nb, r, L)
    vis = ok[:, :, :, None, :]
    if causal_start is not None:
        t = torch.arange(nb * bs, device=q.device).reshape(nb, 1, bs).expand(nb, g, bs)
        t = t.reshape(nb, g * bs)                                           # query of each row
        vis = vis & (safe[:, :, :, None, :] <= causal_start + t[None, None, :, :, None])
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)                                        # (b, kv, nb, r)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    o = (p.to(q.dtype) @ vg).to(ct)                                         # (b, kv, nb, r, d)
    # rows back to (b, hq, q_len)
    o = o.reshape(b, kv, nb, g, bs, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, nb * bs, d)
    lse = lse.reshape(b, kv, nb, g, bs).permute(0, 1, 3, 2, 4).reshape(b, hq, nb * bs)
    return o[:, :, :q_len].to(q.dtype), lse[:, :, :q_len]


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _attend_tile(q, kt, vt, vis, m_i, l_i, acc, qk_scale, FP32_DOT: tl.constexpr):
        """One FlashAttention step (log2 units): rows q against the tile (kt, vt), vis mask."""
        if FP32_DOT:
            s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:   # p rounded to v's dtype first, as the 16-bit GPU path does
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype).to(tl.float32),
                                                vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return m_new, l_i, acc

    @triton.jit
    def _store_rows(o_ptr, lse_ptr, acc, l_i, m_i, b, hq, t, split, d, row_ok, d_ok,
                    so_b, so_h, so_t, so_s, sl_b, sl_h, sl_t):
        # one split's normalized output rows (rows, D) and their log-sum-exp (natural log;
        # -inf for a row that saw no key) at query heads hq, user positions t
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tq = t.to(tl.int64)
        tl.store(o_ptr + b * so_b + hq[:, None] * so_h + tq[:, None] * so_t + split * so_s
                 + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + b * sl_b + hq * sl_h + tq * sl_t + split, lse, mask=row_ok)

    @triton.jit
    def _prefetch_rows(ptrs, ok, ROW_BYTES: tl.constexpr, BULK: tl.constexpr):
        # L2 prefetch of the ROW_BYTES at each pointer (no register result, nothing waits on
        # it): the rows a later tile gathers come from HBM while this tile waits on its own.
        # BULK: one sm_90 cp.async.bulk.prefetch per row (the address must be warp-uniform, so
        # ptxas loops over the lanes); else one prefetch.global.L2 per 128-byte line and thread
        if BULK:
            _ = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; "
                "@p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
                "=r,l,r,r", [ptrs, ok.to(tl.int32), tl.full(ok.shape, ROW_BYTES, tl.int32)],
                dtype=tl.int32, is_pure=False, pack=1)
        else:
            LINES: tl.constexpr = (ROW_BYTES + 127) // 128
            step: tl.constexpr = 128 // ptrs.dtype.element_ty.primitive_bitwidth * 8
            lp = ptrs[:, None] + (tl.arange(0, LINES) * step)[None, :]
            lok = ok[:, None] & (tl.arange(0, LINES) < LINES)[None, :]
            _ = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; "
                "mov.u32 $0, 0; }",
                "=r,l,r", [lp, lok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _sparse_attention_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, o_ptr, lse_ptr,
        q_len, group, bs, n_blocks, kv_heads, head_dim, split_len, qk_scale, causal_start,
        n_rtiles, n_ctx_splits, user_start, user_len,
        sq_b, sq_h, sq_t,                   # q (b, hq, q_len, d)
        sk_b, sk_h, sk_n,                   # k (b, kv, n, d)
        sv_b, sv_h, sv_n,                   # v
        si_row,                             # indices (rows = b*kv*nb, L)
        keep_ptr, lab_ptr, n_keys, n_sink, window, skeep_row, slab_h,   # fused selection
        so_b, so_h, so_t, so_s,             # o (b, hq, q_len, n_splits, d)
        sl_b, sl_h, sl_t,                   # lse (b, hq, q_len, n_splits), split stride 1
        CAUSAL: tl.constexpr, CHUNKED: tl.constexpr, FP32_DOT: tl.constexpr,
        FUSED: tl.constexpr, SUB: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PREFETCH: tl.constexpr = 0, ROW_BYTES: tl.constexpr = 0, PF_BULK: tl.constexpr = False,
        INDEX_AHEAD: tl.constexpr = False,
    ):
        prog = tl.program_id(0)             # (batch, kv head, block of queries, tile of rows)
        split = tl.program_id(1)
        rtile = prog % n_rtiles
        pid = prog // n_rtiles              # the (batch, kv head, block) row of indices
        blk = pid % n_blocks
        h = (pid // n_blocks) % kv_heads
        b = (pid // (n_blocks * kv_heads)).to(tl.int64)
        r = rtile * BLOCK_R + tl.arange(0, BLOCK_R)
        t = blk * bs + r % bs               # query position of row r
        hq = (h * group + r // bs).to(tl.int64)
        row_ok = (r < group * bs) & (t < q_len)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(q_ptr + b * sq_b + hq[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)     # (BLOCK_R, BLOCK_D)
        if FP32_DOT:
            q = q.to(tl.float32)
        # splits < n_ctx_splits read kept indices; the others (chunked mode) take the user
        # tokens user_start + j, j < the last key the block's last query sees
        is_user = split >= n_ctx_splits
        if CHUNKED:
            if is_user:
                start = (split - n_ctx_splits) * split_len
                seen = tl.minimum(user_len, user_len - q_len + (blk + 1) * bs)
                end = tl.minimum(start + split_len, seen)
                idx_end = start                 # no index to read
            else:
                start = split * split_len
                if FUSED:
                    # select this chunk's kept positions (see `select_and_attend`) into its own
                    # slot of the index scratch, then attend over them: no select launch
                    total = compact_chunk(idx_ptr + pid.to(tl.int64) * si_row + start,
                                          keep_ptr + pid.to(tl.int64) * skeep_row,
                                          lab_ptr + h * slab_h, start, split_len, n_keys, n_sink,
                                          window, SUB)
                    tl.debug_barrier()           # the slot is written by this program's threads
                    tl.store(cnt_ptr + pid * n_ctx_splits + split, total, mask=rtile == 0)
                    end = start + total
                else:
                    end = start + tl.load(cnt_ptr + pid * n_ctx_splits + split)
                idx_end = end
        else:
            start = split * split_len
            end = tl.minimum(start + split_len, tl.load(cnt_ptr + pid))
            idx_end = end
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        n0 = tl.arange(0, BLOCK_N)
        irow = idx_ptr + pid.to(tl.int64) * si_row
        kbase = k_ptr + b * sk_b + h * sk_h
        vbase = v_ptr + b * sv_b + h * sv_h
        if PREFETCH > 0:    # indices of the tile PREFETCH ahead, carried one iteration early
            pj = start + PREFETCH * BLOCK_N + n0
            pkid = tl.load(irow + pj, mask=pj < idx_end, other=-1)
        if INDEX_AHEAD:     # the first tile's indices; each tile then loads the next tile's
            kid_next = tl.load(irow + start + n0, mask=start + n0 < idx_end, other=0)
        for j0 in range(start, end, BLOCK_N):
            if PREFETCH > 0:
                pok = pkid >= 0
                prow = tl.where(pok, pkid, 0).to(tl.int64)
                _prefetch_rows(kbase + prow * sk_n, pok, ROW_BYTES, PF_BULK)
                _prefetch_rows(vbase + prow * sv_n, pok, ROW_BYTES, PF_BULK)
                pj = j0 + (PREFETCH + 1) * BLOCK_N + n0
                pkid = tl.load(irow + pj, mask=pj < idx_end, other=-1)
            j = j0 + n0
            ok = j < end
            if INDEX_AHEAD:
                kid = kid_next.to(tl.int64)
                jn = j + BLOCK_N
                kid_next = tl.load(irow + jn, mask=jn < idx_end, other=0)
            else:
                kid = tl.load(idx_ptr + pid.to(tl.int64) * si_row + j, mask=j < idx_end,
                              other=0).to(tl.int64)
            if CHUNKED:
                kid = tl.where(is_user, (user_start + j).to(tl.int64), kid)
            kt = tl.load(k_ptr + b * sk_b + h * sk_h + kid[:, None] * sk_n + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0)    # (BLOCK_N, BLOCK_D)
            vt = tl.load(v_ptr + b * sv_b + h * sv_h + kid[:, None] * sv_n + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0)
            vis = ok[None, :]
            if CAUSAL:
                vis = vis & (kid[None, :] <= causal_start + t[:, None])
            m_i, l_i, acc = _attend_tile(q, kt, vt, vis, m_i, l_i, acc, qk_scale, FP32_DOT)
        _store_rows(o_ptr, lse_ptr, acc, l_i, m_i, b, hq, t, split, d, row_ok, d_ok,
                    so_b, so_h, so_t, so_s, sl_b, sl_h, sl_t)

else:
    _sparse_attention_kernel = _store_rows = _attend_tile = None


def check_qkv(op: str, q, k, v) -> None:
    """A clear error unless q is (b, hq, q_len, d) and k, v are both (b, kv, n, d)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[-1] != k.shape[-1]:
        raise WorkbenchError(f"{op}: expected q (b, hq, q_len, d), k and v (b, kv, n, d); got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _prefetch_meta(tuning: dict, k: torch.Tensor, interpreted: bool) -> dict:
    """tuning {"prefetch": P}: each tile first issues L2 prefetches of the K/V rows of the
    tile P ahead (one prefetch.global.L2 per 128-byte line; with "prefetch_bulk" one sm_90
    cp.async.bulk.prefetch per row), so that more gathered bytes are in flight than the one
    K/V buffer Triton's pipeliner gives this loop (sm_90 SASS: the index load feeds the K/V
    cp.async, and the loop waits for all copies at the top of each tile). No effect on the
    results; off under the interpreter (no inline assembly there), and bulk needs rows of a
    multiple of 16 bytes."""
    ahead = int(tuning.get("prefetch", 0))
    row = k.shape[-1] * k.element_size()
    bulk = bool(tuning.get("prefetch_bulk"))
    if not ahead or interpreted or (bulk and row % 16):
        return {}
    return {"PREFETCH": ahead, "ROW_BYTES": row, "PF_BULK": bulk}


def choose_splits(rows: int, width: int, block_n: int, target_programs: int = 264) -> int:
    """Split-KV parts: enough programs (rows * splits) to fill an H200 (132 SMs, ~2 each), but
    each part at least 4 tiles of keys."""
    max_splits = max(1, width // (4 * block_n))
    return max(1, min(max_splits, math.ceil(target_programs / max(rows, 1))))


def chunked_to_flat(indices, counts, q_len: int, block_size: int | None, user_start: int = 0,
                    user_len: int = 0):
    """Chunked index lists (`kernels.squeezed_select.select_chunks`) plus the user tokens as
    one flat list per block: (indices (b, kv, nb, L) int32, counts (b, kv, nb) int32)."""
    b, kv, nb, n_chunks = counts.shape
    chunk = indices.shape[-1] // n_chunks
    ok = torch.arange(chunk, device=counts.device) < counts[..., None]   # (b, kv, nb, nc, ch)
    big = torch.iinfo(torch.int32).max
    flat = torch.where(ok, indices.reshape(b, kv, nb, n_chunks, chunk), big).flatten(3)
    if user_len:
        _, bs = block_layout(q_len, block_size)
        seen = (user_len - q_len + torch.arange(1, nb + 1, device=counts.device) * bs)
        j = torch.arange(user_len, device=counts.device)
        user = torch.where(j[None, :] < seen.clamp_max(user_len)[:, None], user_start + j, big)
        flat = torch.cat([flat, user[None, None].expand(b, kv, -1, -1).to(flat.dtype)], 3)
    flat = torch.sort(flat, dim=-1).values
    cnt = (flat != big).sum(-1).to(torch.int32)
    return torch.where(flat == big, -1, flat).to(torch.int32), cnt


def sparse_attention(q, k, v, indices, counts, block_size: int | None, scaling: float, *,
                     causal_start: int | None = None, n_splits: int | None = None,
                     user_start: int = 0, user_len: int = 0, backend: str = "auto",
                     tuning: dict | None = None):
    """Attention of each query block over its kept key indices (see the module docstring).

    Chunked mode: counts (b, kv, nb, n_chunks) with indices (b, kv, nb, n_chunks * chunk), as
    `select_chunks` returns them: one split per chunk, no empty splits. There `user_len` > 0 adds
    the user tokens k[:, :, user_start:user_start + user_len] as further splits (causal with
    `causal_start`), so one launch covers context and user part before a single merge.
    `tuning` overrides the launch settings (block_n, num_warps, num_stages) for benchmarks,
    {"prefetch": P} turns on L2 prefetches P tiles ahead (`_prefetch_meta`), and
    {"index_ahead": True} loads each tile's kept indices one tile early (carried in registers),
    so the gathers of a tile do not wait for its index load (not yet run on a GPU)."""
    check_qkv("sparse_attention", q, k, v)
    b, hq, q_len, d = q.shape
    kv = k.shape[1]
    nb, bs = block_layout(q_len, block_size)
    chunked = counts.dim() == 4
    if hq % kv or tuple(indices.shape[:3]) != (b, kv, nb) or tuple(counts.shape[:3]) != (b, kv,
                                                                                          nb):
        raise WorkbenchError(f"sparse_attention: indices must be (b, kv, n_blocks, L) = "
                             f"({b}, {kv}, {nb}, L) and counts ({b}, {kv}, {nb}[, chunks]); "
                             f"got {tuple(indices.shape)} and {tuple(counts.shape)}.")
    if user_len and not chunked:
        raise WorkbenchError("sparse_attention: user_len needs chunked counts (select_chunks).")
    which = pick_backend(backend, (q, k, v), _sparse_attention_kernel, op="sparse_attention",
                         supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        if chunked:
            indices, counts = chunked_to_flat(indices, counts, q_len, block_size, user_start,
                                              user_len)
        return sparse_attention_reference(q, k, v, indices, counts, block_size, scaling,
                                          causal_start)
    tuning = {"block_n": 64, "num_warps": 4, **(tuning or {})}
    width = indices.shape[-1]
    if chunked:
        n_ctx = counts.shape[-1]
        split_len = width // n_ctx
    else:
        programs = b * kv * nb * math.ceil(hq // kv * bs / 64)   # (row, tile of query rows)
        n_ctx = n_splits or choose_splits(programs, width, tuning["block_n"])
        split_len = max(tuning["block_n"], math.ceil(math.ceil(width / n_ctx) / tuning["block_n"])
                        * tuning["block_n"])
        n_ctx = max(1, math.ceil(width / split_len)) if width else 1
    idx = indices.reshape(b * kv * nb, width).to(torch.int32).contiguous()
    cnt = counts.reshape(b * kv * nb, -1).to(torch.int32).contiguous()
    return _launch(q, k, v, idx, cnt, block_size, scaling, n_ctx, split_len, chunked,
                   causal_start, user_start, user_len, tuning, backend)


def _launch(q, k, v, idx, cnt, block_size, scaling, n_ctx, split_len, chunked, causal_start,
            user_start, user_len, tuning, backend, select=None):
    """One `_sparse_attention_kernel` launch (n_ctx context splits + the user splits), then the
    merge. idx (rows, L) int32, cnt (rows, n_ctx or 1) int32 (written by the kernel when
    `select` = (keep (rows, k) uint8, labels (kv, n_mid), n, n_sink, window) is given)."""
    b, hq, q_len, d = q.shape
    kv = k.shape[1]
    g = hq // kv
    nb, bs = block_layout(q_len, block_size)
    rows = b * kv * nb
    interp = is_interpreted(_sparse_attention_kernel)
    block_r = max(16, min(64, _next_pow2(g * bs)))      # rows of one program (a tile of the
    n_rtiles = math.ceil(g * bs / block_r)                # block's group * bs query rows)
    block_d = max(16, _next_pow2(d))
    splits = n_ctx + (math.ceil(user_len / split_len) if chunked else 0)
    # partial outputs in float32 (float64 for float64 q): rounding each split's output to a
    # 16-bit type before the merge put the result past 2x PyTorch's own bf16 error on ~1-2% of
    # random decode inputs with many splits (interpreter, seed 2733144469)
    o = torch.empty(b, hq, q_len, splits, d, dtype=torch.promote_types(q.dtype, torch.float32),
                    device=q.device)
    lse = torch.empty(b, hq, q_len, splits, dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if select is None:
        keep, lab, n_keys, n_sink, window = cnt, cnt, 0, 0, 0   # unused pointers
    else:
        keep, lab, n_keys, n_sink, window = select
    _sparse_attention_kernel[(rows * n_rtiles, splits)](
        q, k, v, idx, cnt, o, lse,
        q_len, g, bs, nb, kv, d, split_len, float(scaling) * LOG2E,
        0 if causal_start is None else int(causal_start), n_rtiles, n_ctx, user_start, user_len,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0),
        keep, lab, n_keys, n_sink, window, keep.stride(0), lab.stride(0),
        o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        CAUSAL=causal_start is not None, CHUNKED=chunked, FP32_DOT=_fp32_dot(q, k, interp),
        FUSED=select is not None,
        SUB=min(SELECT_SUB, _next_pow2(split_len)) if select is not None else 16,
        BLOCK_R=block_r, BLOCK_N=tuning["block_n"], BLOCK_D=block_d,
        **_prefetch_meta(tuning, k, interp), num_warps=tuning["num_warps"],
        **({"INDEX_AHEAD": True} if tuning.get("index_ahead") else {}),
        **({"num_stages": tuning["num_stages"]} if "num_stages" in tuning else {}))
    if splits == 1:
        return o[:, :, :, 0].to(q.dtype), lse[..., 0]
    merged, lse = merge_attention_partials(o, lse, backend=backend)
    return merged.to(q.dtype), lse


def select_and_attend(q, k, v, keep, labels, n: int, n_sink: int, window: int,
                      block_size: int | None, scaling: float, *, causal_start: int | None = None,
                      user_start: int = 0, user_len: int = 0, chunk: int | None = None,
                      backend: str = "auto", tuning: dict | None = None):
    """`select_chunks` fused into `sparse_attention` (chunked mode): each context split first
    compacts the kept positions of its own chunk (sink and window always, cluster labels[p -
    n_sink] kept in keep[b, kv, block]) into its slot of an index scratch, then attends over
    them; the user tokens are further splits, as in `sparse_attention`. One launch + the merge
    instead of two launches + the merge, and the indices never make a round trip through a
    separate kernel. keep (b, kv, nb, k) bool; labels (kv, n - n_sink - window) int16/int32.
    Returns (o (b, hq, q_len, d), lse (b, hq, q_len), counts (b, kv, nb, n_chunks) int32)."""
    b, hq, q_len, d = q.shape
    kv = k.shape[1]
    nb, bs = block_layout(q_len, block_size)
    if keep.dtype != torch.bool or tuple(keep.shape[:3]) != (b, kv, nb) \
            or labels.shape != (kv, n - n_sink - window):
        raise WorkbenchError(f"select_and_attend: expected keep ({b}, {kv}, {nb}, k) bool and "
                             f"labels ({kv}, {n - n_sink - window}); got {keep.dtype} "
                             f"{tuple(keep.shape)} and {tuple(labels.shape)}.")
    # ~512 programs (about 4 per H200 SM): on the H200 at 128K, decode ran fastest at chunk
    # 8192 for 32 KV heads and 2048 for 8 (benchmarks/results/squeezed_nvidia_h200.json)
    chunk = chunk or chunk_size(n, b * kv * nb, target_programs=512)
    if chunk != _next_pow2(chunk) and chunk % SELECT_SUB:
        raise WorkbenchError(f"select_and_attend: chunk must be a power of two or a multiple of "
                             f"{SELECT_SUB}, got {chunk}.")
    which = pick_backend(backend, (q, k, v), _sparse_attention_kernel, op="select_and_attend",
                         supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        idx, cnt = select_chunks_reference(keep, labels, n, n_sink, window, chunk)
        o, lse = sparse_attention(q, k, v, idx, cnt, block_size, scaling,
                                  causal_start=causal_start, user_start=user_start,
                                  user_len=user_len, backend="torch")
        return o, lse, cnt
    rows = b * kv * nb
    n_chunks = math.ceil(n / chunk)
    idx = torch.empty(rows, n_chunks * chunk, dtype=torch.int32, device=q.device)
    cnt = torch.empty(rows, n_chunks, dtype=torch.int32, device=q.device)
    kp = keep.contiguous().view(torch.uint8).reshape(rows, keep.shape[-1])
    lab = labels if labels.dtype in (torch.int16, torch.int32) and labels.is_contiguous() \
        else labels.to(torch.int32).contiguous()
    tuning = {"block_n": 64, "num_warps": 4, **(tuning or {})}
    o, lse = _launch(q, k, v, idx, cnt, block_size, scaling, n_chunks, chunk, True,
                     causal_start, user_start, user_len, tuning, backend,
                     select=(kp, lab, n, n_sink, window))
    return o, lse, cnt.reshape(b, kv, nb, n_chunks)


def squeezed_context_attention(q, k, v, mask, block_size: int | None, scaling: float, *,
                               backend: str = "auto"):
    """Context part of squeezed attention: mask (b, kv, n_blocks, n) bool -> compaction ->
    sparse attention. Returns (o (b, hq, q_len, d), lse (b, hq, q_len))."""
    indices, counts = compact_mask(mask, backend=backend)
    return sparse_attention(q, k, v, indices, counts, block_size, scaling, backend=backend)
