"""Squeezed Attention's prefill path, shaped for tensor cores: query rows stay in the program,
centroids and kept keys stream past them (the FlashAttention loop), 64 rows per program (the
H200's fastest, `ATTN_TUNING` / `KEEP_TUNING`).

Measured on the H200 (benchmarks/results/squeezed_nvidia_h200.json, 128K context, budget 1/8,
512 user tokens, CUDA graphs, max vote): one key set per KV head, lookup included, 0.752 ms vs
dense SDPA 3.756 ms (5.0x, Llama-2-7B shape) and 0.700 vs 3.741 ms (5.3x, Llama-3-8B shape);
the context attention alone runs at ~280 TFLOP/s (137 GFLOP in 0.49 ms), about dense SDPA's
rate.

prefill_keep(q, centroids, log_sizes, scaling, block_size, threshold) -> keep
    The same flags as `kernels.squeezed_select.centroid_keep` (p_k = mean, or with vote="max"
    max, over a block's rows of exp(s_rk - lse_r), lse_r = log sum_j N_j exp(s_rj); keep =
    p_k >= threshold), computed by
    one launch over (batch, KV head, tile of BLOCK_M query rows): pass 1 streams every centroid
    tile for the rows' lse (online, as FlashAttention does), pass 2 streams them again and sums
    exp(s_rk - lse_r) over the tile's rows, segment by segment when a tile holds several blocks
    of queries. No partial (max, sum) round trip through memory and no per-row launch; the dot is
    BLOCK_M x BLOCK_K x d (pass 2 as c x^T, so that the sum over query rows stays inside a warp:
    0.26 vs 0.30 ms). The per-tile column sums (scaled by 1 / rows of their block) are then
    added per block and compared with the threshold (two small PyTorch ops; none when a block
    fits one tile). Centroids of size 0 get estimate 0, as in `centroid_keep`.

select_flat(keep, labels, n, n_sink, window) -> (indices, counts)
    Kept key positions as ONE ascending list per (batch, KV head, block): `select_chunks`
    compacts chunks of the context in parallel (launch 1), then each chunk's kept positions are
    copied to the sum of the earlier chunks' counts (launch 2, reads only kept entries). The
    attention kernel can then cut the list into as few splits as it likes (one, for 128-row
    tiles), instead of one split per chunk.

sparse_prefill(q, k, v, indices, counts, block_size, scaling, causal_start, user_start, user_len)
    Gathered FlashAttention: a program holds BLOCK_M query rows of one (batch, KV head, block)
    (the query heads of a GQA group stacked into M, so a K/V row loaded once serves them all),
    streams the block's kept context keys (index tile loaded with its K/V tile; the loop is
    software-pipelined by Triton), then, in the last split, the user tokens k[user_start:]
    contiguously with the causal mask: one launch for context and user part, and no merge when
    there is one split (the default when the tiles alone fill the GPU). Blocks of fewer than 64
    query rows (Llama-2 with blocks of 16) waste most of each tile; the fast path sends them to
    the chunked kernel of `kernels.squeezed_attention`.

Shapes as in `kernels.squeezed_attention`: q (b, hq, q_len, d); k, v (b, kv, n_total, d);
indices (b, kv, nb, L) int32 (entries past counts unspecified), counts (b, kv, nb) int32.
Outputs (o (b, hq, q_len, d) in q.dtype, lse (b, hq, q_len) float32, natural log).
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from kernels.lse_merge import merge_attention_partials
from kernels.squeezed_attention import (
    _attend_tile,
    _store_rows,
    check_qkv,
    chunked_to_flat,
    sparse_attention_reference,
)
from kernels.squeezed_lookup import (
    SUPPORTED_DTYPES,
    _check_vote,
    _fp32_dot,
    _next_pow2,
    block_layout,
    centroid_scores_reference,
    select_indices_reference,
)
from kernels.squeezed_select import centroid_keep_reference, select_chunks
from workbench.errors import WorkbenchError

LOG2E = 1.4426950408889634
# launch settings (H200, bf16, d 128): tuned by benchmarks/bench_squeezed.py --tune
# (attention: the fastest or within 4% of it among 8 settings, both shapes; keep flags: the
# fastest of 6 (0.235 / 0.207 ms vs 0.303 / 0.278 for trans False), at 128K, one set, H200)
ATTN_TUNING = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
KEEP_TUNING = {"block_m": 64, "block_k": 64, "num_warps": 4, "num_stages": 3, "trans": True}


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def prefill_keep_reference(q, centroids, log_sizes, scaling, block_size, threshold,
                           vote: str = "mean"):
    """keep flags (threshold given) or estimates (threshold None), as `centroid_keep`'s."""
    if threshold is None:
        p = centroid_scores_reference(q, centroids, log_sizes, scaling, block_size, vote=vote)
        return torch.where(torch.isinf(log_sizes)[None, :, None, :], 0.0, p)
    return centroid_keep_reference(q, centroids, log_sizes, scaling, block_size, threshold,
                                   vote=vote)


def sparse_prefill_reference(q, k, v, indices, counts, block_size, scaling, causal_start=None,
                             user_start=0, user_len=0):
    """Context lists plus the user tokens (causal), through `sparse_attention_reference`."""
    if user_len:
        indices, counts = chunked_to_flat(indices, counts[..., None], q.shape[2], block_size,
                                          user_start, user_len)
    return sparse_attention_reference(q, k, v, indices, counts, block_size, scaling,
                                      causal_start if user_len else None)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _prefill_keep_kernel(
        q_ptr, c_ptr, ln_ptr, part_ptr,
        q_len, n_cent, group, bs, n_blocks, kv_heads, head_dim, scaling2, rows_pad, n_rtiles,
        sq_b, sq_h, sq_t, sc_h, sc_k, sl_h,
        NSEG: tl.constexpr, FP32_DOT: tl.constexpr, TRANS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        VOTE_MAX: tl.constexpr = False,
    ):
        prog = tl.program_id(0)                 # (batch, kv head, tile of padded rows)
        tile = prog % n_rtiles
        bh = prog // n_rtiles
        h = bh % kv_heads
        b = (bh // kv_heads).to(tl.int64)
        rr = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        blk = rr // rows_pad                    # each block owns rows_pad (padded) rows
        r = rr % rows_pad
        t = blk * bs + r % bs
        hq = (h * group + r // bs).to(tl.int64)
        row_ok = (r < group * bs) & (blk < n_blocks) & (t < q_len)
        n_valid = (tl.minimum(bs, q_len - blk * bs) * group).to(tl.float32)
        if VOTE_MAX:                            # max over the rows: weight 1, padding 0
            w = tl.where(row_ok, 1.0, 0.0)
        else:                                   # mean: 1 / rows of the block
            w = tl.where(row_ok, 1.0 / tl.where(row_ok, n_valid, 1.0), 0.0)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        x = tl.load(q_ptr + b * sq_b + hq[:, None] * sq_h + t[:, None].to(tl.int64) * sq_t
                    + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            x = x.to(tl.float32)
        c_base = c_ptr + h.to(tl.int64) * sc_h
        k0 = tl.arange(0, BLOCK_K)
        # pass 1: lse_r (log2 units) of s_rk + log N_k over all centroids, online
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, n_cent, BLOCK_K):
            kk = c0 + k0
            ok = kk < n_cent
            c = tl.load(c_base + kk[:, None].to(tl.int64) * sc_k + d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            ln = tl.load(ln_ptr + h * sl_h + kk, mask=ok, other=float("-inf"))
            if FP32_DOT:
                s = tl.dot(x, tl.trans(c.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(x, tl.trans(c))
            s = s * scaling2 + (ln * 1.4426950408889634)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - shift) + tl.sum(tl.exp2(s - shift[:, None]), axis=1)
            m_i = m_new
        has = l_i > 0
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), 0.0)
        w = tl.where(has, w, 0.0)
        # pass 2: sum_r w_r exp(s_rk - lse_r) per segment (block) of the tile (VOTE_MAX: max_r;
        # p >= 0, so the padding rows' 0 never wins)
        out = part_ptr + prog.to(tl.int64) * NSEG * n_cent
        if TRANS:
            # centroids as the rows of the dot (c x^T): the sum over query rows runs along the
            # accumulator's columns, inside each warp, instead of across warps
            xt = tl.trans(x)
        for c0 in range(0, n_cent, BLOCK_K):
            kk = c0 + k0
            ok = kk < n_cent
            c = tl.load(c_base + kk[:, None].to(tl.int64) * sc_k + d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0)
            ln = tl.load(ln_ptr + h * sl_h + kk, mask=ok, other=float("-inf"))
            use = ok & (ln != float("-inf"))
            if TRANS:
                if FP32_DOT:
                    st = tl.dot(c.to(tl.float32), xt, input_precision="ieee")
                else:
                    st = tl.dot(c, xt)                                  # (BLOCK_K, BLOCK_M)
                p = tl.where(use[:, None], tl.exp2(st * scaling2 - lse[None, :]), 0.0) \
                    * w[None, :]
                if NSEG == 1:
                    if VOTE_MAX:
                        tl.store(out + kk, tl.max(p, axis=1), mask=ok)
                    else:
                        tl.store(out + kk, tl.sum(p, axis=1), mask=ok)
                else:
                    if VOTE_MAX:
                        ps = tl.max(tl.reshape(p, (BLOCK_K, NSEG, BLOCK_M // NSEG)), axis=2)
                    else:
                        ps = tl.sum(tl.reshape(p, (BLOCK_K, NSEG, BLOCK_M // NSEG)), axis=2)
                    seg = tl.arange(0, NSEG)
                    tl.store(out + seg[None, :] * n_cent + kk[:, None], ps, mask=ok[:, None])
            else:
                if FP32_DOT:
                    s = tl.dot(x, tl.trans(c.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(x, tl.trans(c))
                p = tl.where(use[None, :], tl.exp2(s * scaling2 - lse[:, None]), 0.0) \
                    * w[:, None]
                if NSEG == 1:
                    if VOTE_MAX:
                        tl.store(out + kk, tl.max(p, axis=0), mask=ok)
                    else:
                        tl.store(out + kk, tl.sum(p, axis=0), mask=ok)
                else:
                    if VOTE_MAX:
                        ps = tl.max(tl.reshape(p, (NSEG, BLOCK_M // NSEG, BLOCK_K)), axis=1)
                    else:
                        ps = tl.sum(tl.reshape(p, (NSEG, BLOCK_M // NSEG, BLOCK_K)), axis=1)
                    seg = tl.arange(0, NSEG)
                    tl.store(out + seg[:, None] * n_cent + kk[None, :], ps, mask=ok[None, :])

    @triton.jit
    def _pack_chunks_kernel(cidx_ptr, ccnt_ptr, idx_ptr, cnt_ptr, n_chunks, chunk, si_row,
                            BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Copy chunk c's kept positions (the start of its slot in the chunked lists) to the
        flat list at the sum of the earlier chunks' counts."""
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        cc = tl.arange(0, BLOCK_C)
        counts = tl.load(ccnt_ptr + row * n_chunks + cc, mask=cc < n_chunks, other=0)
        offset = tl.sum(tl.where(cc < c, counts, 0), axis=0)
        mine = tl.sum(tl.where(cc == c, counts, 0), axis=0)
        src = cidx_ptr + (row * n_chunks + c) * chunk
        dst = idx_ptr + row * si_row + offset
        for j0 in range(0, mine, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            tl.store(dst + j, tl.load(src + j, mask=j < mine), mask=j < mine)
        tl.store(cnt_ptr + row, tl.sum(counts, axis=0), mask=c == 0)

    @triton.jit
    def _prefill_attention_kernel(
        q_ptr, k_ptr, v_ptr, idx_ptr, cnt_ptr, o_ptr, lse_ptr,
        q_len, group, bs, n_blocks, kv_heads, head_dim, qk_scale, n_rtiles,
        causal_start, user_start, user_len,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, si_row,
        so_b, so_h, so_t, so_s, sl_b, sl_h, sl_t,
        FP32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        prog = tl.program_id(0)             # (batch, kv head, block, tile of rows)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        rtile = prog % n_rtiles
        pid = prog // n_rtiles
        blk = pid % n_blocks
        h = ((pid // n_blocks) % kv_heads).to(tl.int64)
        b = (pid // (n_blocks * kv_heads)).to(tl.int64)
        r = rtile * BLOCK_M + tl.arange(0, BLOCK_M)
        t = blk * bs + r % bs
        hq = h * group + (r // bs).to(tl.int64)
        row_ok = (r < group * bs) & (t < q_len)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(q_ptr + b * sq_b + hq[:, None] * sq_h + t[:, None].to(tl.int64) * sq_t
                    + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if FP32_DOT:
            q = q.to(tl.float32)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sv_b + h * sv_h
        idx_row = idx_ptr + pid.to(tl.int64) * si_row
        count = tl.load(cnt_ptr + pid)
        split_len = tl.cdiv(tl.cdiv(count, n_splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, count)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n0 = tl.arange(0, BLOCK_N)
        for j0 in range(start, end, BLOCK_N):          # kept context keys, gathered
            j = j0 + n0
            ok = j < end
            kid = tl.load(idx_row + j, mask=ok, other=0).to(tl.int64)
            kt = tl.load(k_base + kid[:, None] * sk_n + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_base + kid[:, None] * sv_n + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = _attend_tile(q, kt, vt, ok[None, :], m_i, l_i, acc, qk_scale,
                                         FP32_DOT)
        # the user tokens (last split only), contiguous, causal: key user_start + j is seen by
        # query t when user_start + j <= causal_start + t
        t_max = tl.max(tl.where(row_ok, t, 0), axis=0)
        u_end = tl.minimum(user_len, causal_start - user_start + t_max + 1)
        u_end = tl.where(split == n_splits - 1, u_end, 0)
        for j0 in range(0, u_end, BLOCK_N):
            j = j0 + n0
            ok = j < u_end
            pos = (user_start + j).to(tl.int64)
            kt = tl.load(k_base + pos[:, None] * sk_n + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0)
            vt = tl.load(v_base + pos[:, None] * sv_n + d[None, :],
                         mask=ok[:, None] & d_ok[None, :], other=0.0)
            vis = ok[None, :] & (pos[None, :] <= causal_start + t[:, None])
            m_i, l_i, acc = _attend_tile(q, kt, vt, vis, m_i, l_i, acc, qk_scale, FP32_DOT)
        _store_rows(o_ptr, lse_ptr, acc, l_i, m_i, b, hq, t, split, d, row_ok, d_ok,
                    so_b, so_h, so_t, so_s, sl_b, sl_h, sl_t)

else:
    _prefill_keep_kernel = _pack_chunks_kernel = None
    _prefill_attention_kernel = None


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def keep_row_layout(group: int, bs: int, nb: int, block_m: int):
    """(rows_pad, n_seg, n_rtiles): each block of queries owns rows_pad rows of the padded row
    space (a power of two when it fits a tile, so a tile holds n_seg whole blocks; else a
    multiple of block_m, and a block spans rows_pad // block_m tiles)."""
    rows = group * bs
    if rows <= block_m:
        rows_pad = _next_pow2(rows)
        return rows_pad, block_m // rows_pad, math.ceil(nb * rows_pad / block_m)
    rows_pad = math.ceil(rows / block_m) * block_m
    return rows_pad, 1, nb * rows_pad // block_m


def prefill_keep(q, centroids, log_sizes, scaling: float, block_size: int | None,
                 threshold: float | None, *, backend: str = "auto",
                 tuning: dict | None = None, vote: str = "mean") -> torch.Tensor:
    """keep (b, kv, nb, k) bool (or the estimates, float32, for threshold None): see the
    module docstring; the same function as `centroid_keep` (vote "mean" or "max" over a
    block's query rows)."""
    if q.dim() != 4 or centroids.dim() != 3 or q.shape[-1] != centroids.shape[-1] \
            or q.shape[1] % centroids.shape[0]:
        raise WorkbenchError(f"prefill_keep: expected q (b, hq, q_len, d) and centroids "
                             f"(kv, k, d) with hq a multiple of kv; got {tuple(q.shape)} and "
                             f"{tuple(centroids.shape)}.")
    which = pick_backend(backend, (q, centroids, log_sizes), _prefill_keep_kernel,
                         op="prefill_keep", supported_dtypes=SUPPORTED_DTYPES)
    _check_vote(vote)
    if which == "torch":
        return prefill_keep_reference(q, centroids, log_sizes, scaling, block_size, threshold,
                                      vote)
    b, hq, q_len, d = q.shape
    kv, k = centroids.shape[:2]
    g = hq // kv
    nb, bs = block_layout(q_len, block_size)
    interp = is_interpreted(_prefill_keep_kernel)
    tuning = {**KEEP_TUNING, **(tuning or {})}
    block_m = 16 if interp else tuning["block_m"]
    block_k = 16 if interp else tuning["block_k"]
    if centroids.dtype == torch.float32 and not interp:       # 4-byte tiles: shared memory
        block_k = min(block_k, 64)
    rows_pad, n_seg, n_rtiles = keep_row_layout(g, bs, nb, block_m)
    if k == 0 or b * kv * nb == 0:
        return torch.zeros(b, kv, nb, k, dtype=torch.float32 if threshold is None
                           else torch.bool, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    c = centroids.contiguous()
    ln = log_sizes.float().contiguous()
    part = torch.empty(b * kv * n_rtiles, n_seg, k, dtype=torch.float32, device=q.device)
    extra = {} if interp else {"num_warps": tuning["num_warps"],
                               "num_stages": tuning["num_stages"]}
    _prefill_keep_kernel[(b * kv * n_rtiles,)](
        q, c, ln, part, q_len, k, g, bs, nb, kv, d, float(scaling) * LOG2E, rows_pad, n_rtiles,
        q.stride(0), q.stride(1), q.stride(2), c.stride(0), c.stride(1), ln.stride(0),
        NSEG=n_seg, FP32_DOT=_fp32_dot(q, c, interp), TRANS=bool(tuning["trans"]),
        VOTE_MAX=vote == "max", BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_D=max(16, _next_pow2(d)), **extra)
    if n_seg > 1 or rows_pad == block_m:       # one (tile, segment) per block
        p = part.view(b, kv, n_rtiles * n_seg, k)[:, :, :nb]
    else:                                      # a block spans several tiles
        tiles = part.view(b, kv, nb, rows_pad // block_m, k)
        p = tiles.amax(3) if vote == "max" else tiles.sum(3)
    return p if threshold is None else p >= threshold


def select_flat(keep: torch.Tensor, labels: torch.Tensor, n: int, n_sink: int, window: int,
                chunk: int | None = None, *, backend: str = "auto"):
    """Kept positions as one ascending list per row (module docstring). keep (b, kv, nb, k)
    bool, labels (kv, n - n_sink - window) int16/int32. Returns (indices (b, kv, nb, n) int32,
    entries past counts unspecified; counts (b, kv, nb) int32)."""
    if keep.dtype != torch.bool or keep.dim() != 4 or labels.shape != (keep.shape[1],
                                                                      n - n_sink - window):
        raise WorkbenchError(f"select_flat: expected keep (b, kv, nb, k) bool and labels "
                             f"(kv, {n - n_sink - window}); got {keep.dtype} "
                             f"{tuple(keep.shape)} and {tuple(labels.shape)}.")
    which = pick_backend(backend, (keep, labels), _pack_chunks_kernel, op="select_flat")
    if which == "torch":
        return select_indices_reference(keep, labels, n, n_sink, window)
    b, kv, nb, _ = keep.shape
    rows = b * kv * nb
    cidx, ccnt, chunk = select_chunks(keep, labels, n, n_sink, window, chunk, backend=backend)
    n_chunks = ccnt.shape[-1]
    idx = torch.empty(b, kv, nb, n, dtype=torch.int32, device=keep.device)
    cnt = torch.empty(b, kv, nb, dtype=torch.int32, device=keep.device)
    _pack_chunks_kernel[(rows, n_chunks)](cidx, ccnt, idx, cnt, n_chunks, chunk, n,
                                          BLOCK=min(1024, _next_pow2(chunk)),
                                          BLOCK_C=max(16, _next_pow2(n_chunks)))
    return idx, cnt


def prefill_splits(tiles: int, target_programs: int = 120, max_splits: int = 8) -> int:
    """Split-KV parts so that tiles * splits fills an H200 (132 SMs, one 128-row program each);
    one (no partials, no merge) when the tiles alone do."""
    return max(1, min(max_splits, math.ceil(target_programs / max(tiles, 1))))


def sparse_prefill(q, k, v, indices, counts, block_size: int | None, scaling: float, *,
                   causal_start: int = 0, user_start: int = 0, user_len: int = 0,
                   n_splits: int | None = None, backend: str = "auto",
                   tuning: dict | None = None):
    """Attention of each query block over its kept context keys (flat lists: `select_flat`)
    plus, with user_len > 0, the user tokens k[:, :, user_start:user_start + user_len], key
    user_start + j visible to query t when user_start + j <= causal_start + t. Returns
    (o (b, hq, q_len, d) in q.dtype, lse (b, hq, q_len) float32). tuning: block_m, block_n,
    num_warps, num_stages (benchmarks)."""
    check_qkv("sparse_prefill", q, k, v)
    b, hq, q_len, d = q.shape
    kv = k.shape[1]
    nb, bs = block_layout(q_len, block_size)
    if hq % kv or tuple(indices.shape[:3]) != (b, kv, nb) or tuple(counts.shape) != (b, kv, nb):
        raise WorkbenchError(f"sparse_prefill: indices must be (b, kv, n_blocks, L) = "
                             f"({b}, {kv}, {nb}, L) and counts ({b}, {kv}, {nb}); got "
                             f"{tuple(indices.shape)} and {tuple(counts.shape)}.")
    which = pick_backend(backend, (q, k, v), _prefill_attention_kernel, op="sparse_prefill",
                         supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        return sparse_prefill_reference(q, k, v, indices, counts, block_size, scaling,
                                        causal_start, user_start, user_len)
    g = hq // kv
    interp = is_interpreted(_prefill_attention_kernel)
    tuning = {**ATTN_TUNING, **(tuning or {})}
    block_m = min(tuning["block_m"], max(16, _next_pow2(g * bs)))
    block_n = 16 if interp else tuning["block_n"]
    if interp:
        block_m = min(block_m, 32)
    rows = b * kv * nb
    n_rtiles = math.ceil(g * bs / block_m)
    splits = n_splits or prefill_splits(rows * n_rtiles)
    o = torch.empty(b, hq, q_len, splits, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, q_len, splits, dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    idx = indices.reshape(rows, indices.shape[-1])
    idx = idx if idx.dtype == torch.int32 and idx.stride(-1) == 1 else \
        idx.to(torch.int32).contiguous()
    cnt = counts.reshape(rows).to(torch.int32).contiguous()
    if q.dtype == torch.float32 or k.dtype == torch.float32:   # 4-byte tiles: shared memory
        block_n, tuning["num_stages"] = min(block_n, 32), min(2, tuning["num_stages"])
    # fewer rows than 128 (small blocks of queries): one warpgroup
    extra = {} if interp else {"num_warps": tuning["num_warps"] if block_m >= 128
                               else min(4, tuning["num_warps"]),
                               "num_stages": tuning["num_stages"]}
    _prefill_attention_kernel[(rows * n_rtiles, splits)](
        q, k, v, idx, cnt, o, lse,
        q_len, g, bs, nb, kv, d, float(scaling) * LOG2E, n_rtiles,
        int(causal_start), int(user_start), int(user_len),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0),
        o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        FP32_DOT=_fp32_dot(q, k, interp), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, _next_pow2(d)), **extra)
    if splits == 1:
        return o[:, :, :, 0], lse[..., 0]
    return merge_attention_partials(o, lse, backend=backend)
