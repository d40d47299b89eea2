"""Squeezed Attention's parallel lookup: which centroids pass the threshold, and which key
positions that keeps, split into chunks so that the whole GPU works on one query.

centroid_keep(q, centroids, log_sizes, scaling, block_size, threshold) -> keep
    keep (b, kv, n_blocks, k) bool: p_k >= threshold, with p_k the estimated per-key attention of
    `kernels.squeezed_lookup.centroid_scores` (softmax over the centroids weighted by their
    sizes, averaged over the block's rows: the query heads of a KV head's group vote together).
    Three launches; the first and last over (batch, KV head) x tiles of BLOCK_K centroids (a
    decode step spreads over hundreds of programs instead of one per KV head; each program
    loads its centroid tile once and visits every block of queries, so prefill does not re-read
    the centroids once per block):
      1. partial log-sum-exp (max, sum) of every row over the tile (and, for few rows, the
         logits themselves, so the centroids are read once);
      2. merge each row's partials into lse_r (once per row, not once per tile);
      3. p_k = mean_r exp(s_rk - lse_r) (vote="max": max_r), keep = p_k >= threshold.
    Bytes: centroids once (at most 16 query rows per KV head: the logits are kept) or twice
    (prefill, where storing the logits of every row would cost more), + 2 partials per row and
    tile (stored tile-major, so that a tile's rows are written together) + 1 byte per centroid
    and row of blocks.

select_chunks(keep, labels, n, n_sink, window, chunk) -> (indices, counts)
    Kept key positions, compacted chunk by chunk: position p of the context is kept when
    p < n_sink or p >= n - window, or when its cluster labels[p - n_sink] is kept. Chunk c holds
    positions [c * chunk, (c + 1) * chunk); its kept positions are written, ascending, at the
    start of its own slot indices[..., c * chunk:], and counts[..., c] says how many. No global
    prefix sum, so chunks run in parallel, and the attention kernel takes one chunk per split.
    Reads 2 bytes of label per key (+ the 1-byte keep flag of its cluster, cached).

Shapes: q (b, hq, q_len, d); centroids (kv, k, d); log_sizes (kv, k); keep (b, kv, nb, k) bool;
labels (kv, n - n_sink - window) int16/int32; indices (b, kv, nb, n_chunks * chunk) int32
(entries past a chunk's count are unspecified); counts (b, kv, nb, n_chunks) int32.
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from kernels.squeezed_lookup import (
    SUPPORTED_DTYPES,
    _check_vote,
    _fp32_dot,
    _next_pow2,
    block_layout,
    centroid_scores_reference,
)
from workbench.errors import WorkbenchError

SUB = 2048          # positions one select step scans with a prefix sum


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def centroid_keep_reference(q, centroids, log_sizes, scaling, block_size, threshold,
                            vote: str = "mean"):
    """keep (b, kv, nb, k) bool = centroid_scores_reference(...) >= threshold."""
    return centroid_scores_reference(q, centroids, log_sizes, scaling, block_size,
                                     vote=vote) >= threshold


def select_chunks_reference(keep, labels, n, n_sink, window, chunk):
    """PyTorch reference of `select_chunks` (entries past each count are -1)."""
    b, kv, nb, _ = keep.shape
    mid = torch.gather(keep, 3, labels.long()[None, :, None, :].expand(b, kv, nb, -1))
    ones_s, ones_w = keep.new_ones(b, kv, nb, n_sink), keep.new_ones(b, kv, nb, window)
    mask = torch.cat([ones_s, mid, ones_w], dim=3)                           # (b, kv, nb, n)
    n_chunks = math.ceil(n / chunk)
    mask = torch.nn.functional.pad(mask, (0, n_chunks * chunk - n))
    mask = mask.reshape(b, kv, nb, n_chunks, chunk)
    counts = mask.sum(-1).to(torch.int32)                                    # (b, kv, nb, nc)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # kept first
    pos = order + torch.arange(n_chunks, device=keep.device)[:, None] * chunk
    ok = torch.arange(chunk, device=keep.device) < counts[..., None]
    idx = torch.where(ok, pos, -1).to(torch.int32)
    return idx.reshape(b, kv, nb, n_chunks * chunk), counts


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _block_queries(q_ptr, b, h, blk, r0, q_len, group, bs, head_dim, sq_b, sq_h, sq_t,
                       FP32_DOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows r0.. of a block: (query head of the group, query) -> (BLOCK_R, BLOCK_D), mask."""
        r = r0 + tl.arange(0, BLOCK_R)
        t = blk * bs + r % bs
        hq = h * group + r // bs
        row_ok = (r < group * bs) & (t < q_len)
        d = tl.arange(0, BLOCK_D)
        x = tl.load(q_ptr + b.to(tl.int64) * sq_b + hq[:, None].to(tl.int64) * sq_h
                    + t[:, None] * sq_t + d[None, :],
                    mask=row_ok[:, None] & (d < head_dim)[None, :], other=0.0)
        if FP32_DOT:
            x = x.to(tl.float32)
        return x, r, row_ok

    @triton.jit
    def _centroid_tile(c_ptr, ln_ptr, h, kk, n_cent, head_dim, sc_h, sc_k, sl_h,
                       BLOCK_D: tl.constexpr):
        """A tile of centroids kk of KV head h: (BLOCK_K, BLOCK_D) and log sizes (BLOCK_K,)."""
        d = tl.arange(0, BLOCK_D)
        ok = kk < n_cent
        c = tl.load(c_ptr + h * sc_h + kk[:, None].to(tl.int64) * sc_k + d[None, :],
                    mask=ok[:, None] & (d < head_dim)[None, :], other=0.0)
        ln = tl.load(ln_ptr + h * sl_h + kk, mask=ok, other=float("-inf"))
        return c, ln

    @triton.jit
    def _tile_logits(x, c, ln, kk, n_cent, scaling, FP32_DOT: tl.constexpr):
        """s_rk + log N_k for the tile: (BLOCK_R, BLOCK_K), -inf past n_cent."""
        if FP32_DOT:
            s = tl.dot(x, tl.trans(c.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(x, tl.trans(c.to(x.dtype)))
        return tl.where((kk < n_cent)[None, :], s * scaling + ln[None, :], float("-inf"))

    @triton.jit
    def _keep_partial_kernel(
        q_ptr, c_ptr, ln_ptr, m_ptr, l_ptr, s_ptr,
        q_len, n_cent, group, bs, n_blocks, kv_heads, head_dim, scaling, n_rows_pad, n_tiles,
        sq_b, sq_h, sq_t, sc_h, sc_k, sl_h,
        STORE: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)                   # (batch, kv head): every block of queries
        kt = tl.program_id(1)                   # tile of centroids, loaded once
        h = bh % kv_heads
        b = bh // kv_heads
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        c, ln = _centroid_tile(c_ptr, ln_ptr, h, kk, n_cent, head_dim, sc_h, sc_k, sl_h,
                               BLOCK_D)
        for blk in range(0, n_blocks):
            pid = bh * n_blocks + blk           # the (batch, kv head, block) row
            for r0 in range(0, group * bs, BLOCK_R):
                x, r, row_ok = _block_queries(q_ptr, b, h, blk, r0, q_len, group, bs,
                                              head_dim, sq_b, sq_h, sq_t, FP32_DOT, BLOCK_R,
                                              BLOCK_D)
                s = _tile_logits(x, c, ln, kk, n_cent, scaling, FP32_DOT)
                m = tl.max(s, axis=1)
                l_sum = tl.sum(tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]),
                               axis=1)
                row = pid.to(tl.int64) * n_rows_pad + r
                part = (pid.to(tl.int64) * n_tiles + kt) * n_rows_pad + r   # tile-major
                tl.store(m_ptr + part, m, mask=r < n_rows_pad)
                tl.store(l_ptr + part, l_sum, mask=r < n_rows_pad)
                if STORE:
                    tl.store(s_ptr + row[:, None] * n_cent + kk[None, :], s,
                             mask=row_ok[:, None] & (kk < n_cent)[None, :])

    @triton.jit
    def _row_lse(m_ptr, l_ptr, pid, r, n_rows_pad, n_tiles, BLOCK_R: tl.constexpr,
                 BLOCK_T: tl.constexpr):
        """lse (BLOCK_R,) of rows r of (batch, kv head, block) pid from the (max, sum)
        partials of every centroid tile (stored tile-major); -inf for a row without mass."""
        base = pid.to(tl.int64) * n_tiles * n_rows_pad + r
        tt0 = tl.arange(0, BLOCK_T)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for t0 in range(0, n_tiles, BLOCK_T):
            tt = t0 + tt0
            ok = (r < n_rows_pad)[:, None] & (tt < n_tiles)[None, :]
            part = base[:, None] + tt[None, :].to(tl.int64) * n_rows_pad
            m = tl.load(m_ptr + part, mask=ok, other=float("-inf"))
            l_t = tl.load(l_ptr + part, mask=ok, other=0.0)
            m_new = tl.maximum(m_i, tl.max(m, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - shift) + tl.sum(l_t * tl.exp(m - shift[:, None]), axis=1)
            m_i = m_new
        return tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))

    @triton.jit
    def _keep_lse_kernel(m_ptr, l_ptr, lse_ptr, n_rows_pad, n_tiles,
                         BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        """lse of each row from the (max, sum) partials of every centroid tile."""
        pid = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        lse = _row_lse(m_ptr, l_ptr, pid, r, n_rows_pad, n_tiles, BLOCK_R, BLOCK_T)
        tl.store(lse_ptr + pid.to(tl.int64) * n_rows_pad + r, lse, mask=r < n_rows_pad)

    @triton.jit
    def _keep_final_kernel(
        q_ptr, c_ptr, ln_ptr, lse_ptr, s_ptr, keep_ptr, threshold,
        q_len, n_cent, group, bs, n_blocks, kv_heads, head_dim, scaling, n_rows_pad, n_tiles,
        sq_b, sq_h, sq_t, sc_h, sc_k, sl_h,
        STORE: tl.constexpr, FP32_DOT: tl.constexpr, P_OUT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        m_ptr=None, l_ptr=None, FUSE_LSE: tl.constexpr = False, BLOCK_T: tl.constexpr = 16,
        VOTE_MAX: tl.constexpr = False,
    ):
        bh = tl.program_id(0)
        kt = tl.program_id(1)
        h = bh % kv_heads
        b = bh // kv_heads
        kk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        c, ln = _centroid_tile(c_ptr, ln_ptr, h, kk, n_cent, head_dim, sc_h, sc_k, sl_h,
                               BLOCK_D)
        for blk in range(0, n_blocks):
            pid = bh * n_blocks + blk
            n_valid = tl.minimum(bs, q_len - blk * bs) * group
            p = tl.zeros([BLOCK_K], tl.float32)
            for r0 in range(0, group * bs, BLOCK_R):
                x, r, row_ok = _block_queries(q_ptr, b, h, blk, r0, q_len, group, bs,
                                              head_dim, sq_b, sq_h, sq_t, FP32_DOT, BLOCK_R,
                                              BLOCK_D)
                row = pid.to(tl.int64) * n_rows_pad + r
                if FUSE_LSE:     # every tile's program merges its rows' partials itself
                    lse = _row_lse(m_ptr, l_ptr, pid, r, n_rows_pad, n_tiles, BLOCK_R, BLOCK_T)
                else:
                    lse = tl.load(lse_ptr + row, mask=r < n_rows_pad, other=float("-inf"))
                if STORE:
                    s = tl.load(s_ptr + row[:, None] * n_cent + kk[None, :],
                                mask=row_ok[:, None] & (kk < n_cent)[None, :],
                                other=float("-inf"))
                else:
                    s = _tile_logits(x, c, ln, kk, n_cent, scaling, FP32_DOT)
                use = row_ok[:, None] & ((kk < n_cent) & (ln != float("-inf")))[None, :] \
                    & (lse != float("-inf"))[:, None]
                lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
                # s holds s_rk + log N_k: the per-key estimate is exp(s_rk - lse_r)
                ln_safe = tl.where(ln == float("-inf"), 0.0, ln)
                e = tl.where(use, tl.exp(s - ln_safe[None, :] - lse_safe[:, None]), 0.0)
                if VOTE_MAX:
                    p = tl.maximum(p, tl.max(e, axis=0))
                else:
                    p += tl.sum(e, axis=0)
            if not VOTE_MAX:
                p = p / n_valid
            if P_OUT:                           # the estimates themselves (float32)
                tl.store(keep_ptr + pid.to(tl.int64) * n_cent + kk, p, mask=kk < n_cent)
            else:
                keep = p >= threshold
                tl.store(keep_ptr + pid.to(tl.int64) * n_cent + kk, keep.to(tl.int8),
                         mask=kk < n_cent)

    @triton.jit
    def compact_chunk(out_ptr, keep_row_ptr, lab_head_ptr, start, length, n, n_sink, window,
                      SUB: tl.constexpr):
        """Kept positions of [start, start + length) written ascending at out_ptr; returns how
        many. Kept: the sink (< n_sink), the window (>= n - window), and positions p whose
        cluster lab_head_ptr[p - n_sink] has a nonzero flag in keep_row_ptr. Shared by
        `_select_chunks_kernel` and the fused attention (`select_and_attend`)."""
        total = tl.sum(tl.zeros([SUB], tl.int32), axis=0)
        for s0 in range(0, length, SUB):
            offs = start + s0 + tl.arange(0, SUB)
            inb = offs < n
            fixed = (offs < n_sink) | (offs >= n - window)
            mid = inb & ~fixed
            lab = tl.load(lab_head_ptr + (offs - n_sink), mask=mid, other=0)
            kept = tl.load(keep_row_ptr + lab, mask=mid, other=0) != 0
            m = ((inb & fixed) | (mid & kept)).to(tl.int32)
            tl.store(out_ptr + total + tl.cumsum(m, axis=0) - 1, offs.to(tl.int32), mask=m != 0)
            total += tl.sum(m, axis=0)
        return total

    @triton.jit
    def _select_chunks_kernel(keep_ptr, lab_ptr, idx_ptr, cnt_ptr, n, n_sink, window, n_blocks,
                              kv_heads, n_chunks, chunk, sk_row, sl_h, SUB: tl.constexpr):
        row = tl.program_id(0)                  # (batch, kv head, block)
        c = tl.program_id(1)                    # chunk of positions
        h = (row // n_blocks) % kv_heads
        row64 = row.to(tl.int64)
        total = compact_chunk(idx_ptr + (row64 * n_chunks + c) * chunk, keep_ptr + row64 * sk_row,
                              lab_ptr + h * sl_h, c * chunk, chunk, n, n_sink, window, SUB)
        tl.store(cnt_ptr + row64 * n_chunks + c, total)

else:
    _keep_partial_kernel = _keep_lse_kernel = _keep_final_kernel = _row_lse = None
    _select_chunks_kernel = compact_chunk = None


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def centroid_keep(q, centroids, log_sizes, scaling: float, block_size: int | None,
                  threshold: float | None, *, backend: str = "auto",
                  fuse_lse: bool = False, block_k: int | None = None,
                  num_warps: int = 4, vote: str = "mean") -> torch.Tensor:
    """keep (b, kv, n_blocks, k) bool: centroids whose estimated attention per key passes
    `threshold` (module docstring). threshold None: the estimates p (b, kv, n_blocks, k)
    float32 themselves, for allocations that rank them (see `workbench.squeezed.fastpath`).
    fuse_lse: two launches instead of three, each program of the last kernel merging its rows'
    partials itself (every tile's program re-reads n_tiles partials per row from L2, instead of
    a launch that does it once). vote: how the rows of a block (the query heads of a KV head's group x its queries) combine their estimates, "mean" (the paper's) or "max" (a key that one row needs is kept). block_k (centroids per program,
    a power of two >= 16; default 128 for <= 16 rows, else 64) and num_warps: launch settings
    for benchmarks."""
    if q.dim() != 4 or centroids.dim() != 3 or q.shape[-1] != centroids.shape[-1] \
            or q.shape[1] % centroids.shape[0]:
        raise WorkbenchError(f"centroid_keep: expected q (b, hq, q_len, d) and centroids "
                             f"(kv, k, d) with hq a multiple of kv; got {tuple(q.shape)} and "
                             f"{tuple(centroids.shape)}.")
    _check_vote(vote)
    which = pick_backend(backend, (q, centroids, log_sizes), _keep_partial_kernel,
                         op="centroid_keep", supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        if threshold is None:
            return centroid_scores_reference(q, centroids, log_sizes, scaling, block_size,
                                             vote=vote)
        return centroid_keep_reference(q, centroids, log_sizes, scaling, block_size, threshold,
                                       vote)
    b, hq, q_len, d = q.shape
    kv, k = centroids.shape[:2]
    g = hq // kv
    nb, bs = block_layout(q_len, block_size)
    rows = b * kv * nb
    p_out = threshold is None
    keep = torch.zeros(b, kv, nb, k, dtype=torch.float32 if p_out else torch.bool,
                       device=q.device)
    if rows == 0 or k == 0:
        return keep
    q = q if q.stride(-1) == 1 else q.contiguous()
    c = centroids.contiguous()
    ln = log_sizes.float().contiguous()
    interp = is_interpreted(_keep_partial_kernel)
    block_r = max(16, min(64, _next_pow2(g * bs)))
    block_k = 64 if interp else block_k or (64 if block_r > 16 else 128)
    if block_k < 16 or block_k != _next_pow2(block_k):
        raise WorkbenchError(f"centroid_keep: block_k must be a power of two >= 16, not "
                             f"{block_k}.")
    n_tiles = math.ceil(k / block_k)
    n_rows_pad = math.ceil(g * bs / block_r) * block_r
    # few rows per KV head (decode): keep the logits, read the centroids once; more rows
    # (prefill): recompute them (writing and re-reading 4 bytes per row and centroid cost
    # more than the tensor-core dot of a second pass)
    store = g * bs * nb <= 16
    m = torch.empty(rows, n_tiles, n_rows_pad, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    s = torch.empty(rows, n_rows_pad, k if store else 1, dtype=torch.float32, device=q.device)
    args = (q_len, k, g, bs, nb, kv, d, float(scaling), n_rows_pad, n_tiles,
            q.stride(0), q.stride(1), q.stride(2), c.stride(0), c.stride(1), ln.stride(0))
    meta = dict(STORE=store, FP32_DOT=_fp32_dot(q, c, interp), BLOCK_R=block_r,
                BLOCK_K=block_k, BLOCK_D=max(16, _next_pow2(d)), num_warps=num_warps)
    _keep_partial_kernel[(b * kv, n_tiles)](q, c, ln, m, l_sum, s, *args, **meta)
    block_t = min(64, max(16, _next_pow2(n_tiles)))
    if fuse_lse:
        lse, fuse = m, dict(m_ptr=m, l_ptr=l_sum, FUSE_LSE=True, BLOCK_T=block_t)
    else:
        lse, fuse = torch.empty(rows, n_rows_pad, dtype=torch.float32, device=q.device), {}
        _keep_lse_kernel[(rows, n_rows_pad // block_r)](m, l_sum, lse, n_rows_pad, n_tiles,
                                                        BLOCK_R=block_r, BLOCK_T=block_t)
    _keep_final_kernel[(b * kv, n_tiles)](q, c, ln, lse, s,
                                        keep if p_out else keep.view(torch.int8),
                                        0.0 if p_out else float(threshold), *args, **meta,
                                        P_OUT=p_out, VOTE_MAX=vote == "max", **fuse)
    return keep


def chunk_size(n: int, rows: int, target_programs: int = 8192) -> int:
    """Positions per chunk: about `target_programs` (batch, KV head, block, chunk) programs (an
    H200 has 132 SMs), at least SUB positions, a multiple of SUB."""
    want = math.ceil(n * rows / target_programs)
    return max(SUB, min(_next_pow2(max(n, 1)), _next_pow2(want)))


def select_chunks(keep: torch.Tensor, labels: torch.Tensor, n: int, n_sink: int, window: int,
                  chunk: int | None = None, *, backend: str = "auto"):
    """Kept key positions chunk by chunk (module docstring). Returns (indices (b, kv, nb,
    n_chunks * chunk) int32, counts (b, kv, nb, n_chunks) int32, chunk)."""
    if keep.dtype != torch.bool or keep.dim() != 4 or labels.shape != (keep.shape[1],
                                                                      n - n_sink - window):
        raise WorkbenchError(f"select_chunks: expected keep (b, kv, nb, k) bool and labels "
                             f"(kv, {n - n_sink - window}); got {keep.dtype} "
                             f"{tuple(keep.shape)} and {tuple(labels.shape)}.")
    b, kv, nb, k = keep.shape
    chunk = chunk or chunk_size(n, b * kv * nb)
    if (chunk > SUB and chunk % SUB) or (chunk < SUB and chunk != _next_pow2(chunk)):
        raise WorkbenchError(f"select_chunks: chunk must be a power of two up to {SUB} or a "
                             f"multiple of {SUB}, got {chunk}.")
    which = pick_backend(backend, (keep, labels), _select_chunks_kernel, op="select_chunks")
    if which == "torch":
        return (*select_chunks_reference(keep, labels, n, n_sink, window, chunk), chunk)
    n_chunks = math.ceil(n / chunk)
    kp = keep.contiguous().view(torch.uint8).reshape(b * kv * nb, k)
    lab = labels if labels.dtype in (torch.int16, torch.int32) and labels.is_contiguous() \
        else labels.to(torch.int32).contiguous()
    idx = torch.empty(b, kv, nb, n_chunks * chunk, dtype=torch.int32, device=keep.device)
    cnt = torch.empty(b, kv, nb, n_chunks, dtype=torch.int32, device=keep.device)
    sub = min(SUB, chunk)
    _select_chunks_kernel[(b * kv * nb, n_chunks)](kp, lab, idx, cnt, n, n_sink, window, nb, kv,
                                                  n_chunks, chunk, kp.stride(0), lab.stride(0),
                                                  SUB=sub)
    return idx, cnt, chunk
