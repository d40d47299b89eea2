"""Squeezed Attention's lookup kernels: centroid scoring with the estimated softmax denominator,
and mask-to-index compaction.

centroid_scores(q, centroids, log_sizes, scaling, block_size, indices=, counts=, extra_lse=)
    For each (batch, KV head, block of queries) and each centroid k of the head (or of the
    block's index list, for the hierarchical level):

        s_rk = q_r . c_k * scaling
        lse_r = log( sum_k N_k exp(s_rk) [+ exp(extra_lse_r)] )     the estimated denominator
        p_k  = mean over the block's rows r of exp(s_rk - lse_r)    estimated attention per key

    where the rows r are the block's queries of every query head of the KV head's group (GQA:
    they vote together). One program per (batch, KV head, block) loads its rows once and streams
    the centroids twice: pass 1 builds lse_r with an online log-sum-exp, pass 2 writes p_k.
    Bytes: centroids read twice (2 * k * d * 4) + queries once + p written once (4k).

select_indices_reference(keep, labels, n, n_sink, window) -> (indices, counts)
    The kept key positions of one flat list per row (the readable reference); the kernel that
    selects them on a GPU, chunk by chunk, is `kernels.squeezed_select.select_chunks`, which
    also computes the one-level keep flags in parallel. `centroid_scores` here serves the
    hierarchical lookup (gathered candidate lists with extra denominator mass).

compact_mask(mask) -> (indices, counts)
    mask (..., n) bool -> indices (..., n) int32 holding the True positions in increasing order,
    then -1; counts (...,) int32. One program per row scans it in tiles with a prefix sum.
    Full width, so the GPU never waits for the largest count.

Shapes: q (b, q_heads, q_len, d); centroids (kv, k, d); log_sizes (kv, k) (log of cluster sizes,
-inf for empty clusters); indices (b, kv, n_blocks, m) int32 with counts (b, kv, n_blocks);
extra_lse (b, kv, n_blocks, group * block) natural log (-inf: nothing extra). Output p
(b, kv, n_blocks, k or m) float32 (0 beyond counts).
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from workbench.errors import WorkbenchError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def block_layout(q_len: int, block_size: int | None) -> tuple[int, int]:
    """(n_blocks, queries per block): block_size None means one block for all q_len queries."""
    if block_size is None or block_size >= q_len:
        return 1, q_len
    return math.ceil(q_len / block_size), block_size


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def block_rows(q: torch.Tensor, kv: int, block_size: int | None):
    """q (b, hq, q_len, d) -> rows (b, kv, nb, group * bs, d) (zero-padded) and valid
    (nb, group * bs) bool. Row r of a block is query head r // bs of the group, query r % bs."""
    b, hq, q_len, d = q.shape
    g = hq // kv
    nb, bs = block_layout(q_len, block_size)
    x = torch.nn.functional.pad(q, (0, 0, 0, nb * bs - q_len)).reshape(b, kv, g, nb, bs, d)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, kv, nb, g * bs, d)
    valid = (torch.arange(nb * bs, device=q.device) < q_len).reshape(nb, 1, bs)
    return x, valid.expand(nb, g, bs).reshape(nb, g * bs)


def centroid_scores_reference(q, centroids, log_sizes, scaling, block_size=None, indices=None,
                              counts=None, extra_lse=None, vote: str = "mean"):
    """PyTorch reference of `centroid_scores` (computes in float32, float64 for float64 q)."""
    kv = centroids.shape[0]
    ct = torch.promote_types(q.dtype, torch.float32)
    x, valid = block_rows(q.to(ct), kv, block_size)                         # (b, kv, nb, r, d)
    b, _, nb, r, _ = x.shape
    if indices is None:
        c = centroids.to(ct)[None, :, None].expand(b, kv, nb, -1, -1)      # (b, kv, nb, k, d)
        ln = log_sizes.to(ct)[None, :, None].expand(b, kv, nb, -1)
        ok = torch.ones_like(ln, dtype=torch.bool)
    else:
        m = indices.shape[-1]
        ok = torch.arange(m, device=q.device) < counts[..., None]           # (b, kv, nb, m)
        safe = torch.where(ok, indices.long(), 0)
        heads = torch.arange(kv, device=q.device)[None, :, None, None]
        c = centroids.to(ct)[heads, safe]                                   # (b, kv, nb, m, d)
        ln = log_sizes.to(ct)[heads, safe]
    s = torch.einsum("bhnrd,bhnkd->bhnrk", x, c) * scaling                  # (b, kv, nb, r, k)
    terms = (s + ln[:, :, :, None]).masked_fill(~ok[:, :, :, None], -math.inf)
    lse = torch.logsumexp(terms, dim=-1)                                    # (b, kv, nb, r)
    if extra_lse is not None:
        lse = torch.logaddexp(lse, extra_lse.to(ct))
    p = torch.exp(s - lse[..., None]).masked_fill(~ok[:, :, :, None], 0.0)
    p = torch.nan_to_num(p, nan=0.0)
    w = valid.to(ct)[None, None, :, :, None]
    if vote == "max":
        return (p * w).amax(3)
    return (p * w).sum(3) / w.sum(3).clamp_min(1.0)


def compact_mask_reference(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (..., n) bool -> (indices (..., n) int32: True positions ascending, then -1;
    counts (...,) int32)."""
    n = mask.shape[-1]
    counts = mask.sum(dim=-1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    valid = torch.arange(n, device=mask.device) < counts[..., None]
    return torch.where(valid, order, -1).to(torch.int32), counts.to(torch.int32)


def select_indices_reference(keep, labels, n, n_sink, window):
    """keep (b, kv, nb, k) bool, labels (kv, n_mid) -> (indices (b, kv, nb, n) int32, counts)."""
    b, kv, nb, _ = keep.shape
    mid = torch.gather(keep, 3, labels.long()[None, :, None, :].expand(b, kv, nb, -1))
    ones = keep.new_ones(b, kv, nb, n_sink), keep.new_ones(b, kv, nb, window)
    return compact_mask_reference(torch.cat([ones[0], mid, ones[1]], dim=3))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _centroid_scores_kernel(
        q_ptr, c_ptr, ln_ptr, idx_ptr, cnt_ptr, extra_ptr, out_ptr,
        q_len, n_cent, group, bs, n_blocks, kv_heads, head_dim, scaling,
        sq_b, sq_h, sq_t,                      # q (b, hq, q_len, d), d contiguous
        sc_h, sc_k,                            # centroids (kv, k, d), d contiguous
        sl_h,                                  # log sizes (kv, k)
        si_row,                                # indices (rows = b*kv*nb, m)
        se_row,                                # extra_lse (rows, group*bs)
        so_row,                                # out (rows, k or m)
        HAS_IDX: tl.constexpr, HAS_EXTRA: tl.constexpr, FP32_DOT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        VOTE_MAX: tl.constexpr = False,
    ):
        pid = tl.program_id(0)                  # one (batch, kv head, block) per program
        blk = pid % n_blocks
        h = (pid // n_blocks) % kv_heads
        b = pid // (n_blocks * kv_heads)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        if HAS_IDX:
            count = tl.load(cnt_ptr + pid)
        else:
            count = n_cent
        kk0 = tl.arange(0, BLOCK_K)
        n_rows = group * bs
        n_valid = tl.minimum(bs, q_len - blk * bs) * group     # real queries of this block
        # The block's rows (query heads of the group x queries) in tiles of BLOCK_R; each tile's
        # p is added into the output row, which this program alone writes.
        for r0 in range(0, n_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            t = blk * bs + r % bs               # query position of row r
            hq = h * group + r // bs            # query head of row r
            row_ok = (r < n_rows) & (t < q_len)
            q = tl.load(q_ptr + b.to(tl.int64) * sq_b + hq[:, None].to(tl.int64) * sq_h
                        + t[:, None] * sq_t + d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_D)
            if FP32_DOT:
                q = q.to(tl.float32)
            # pass 1: lse_r = log sum_k N_k exp(s_rk), online over tiles of centroids
            m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_R], tl.float32)
            for k0 in range(0, count, BLOCK_K):
                kk = k0 + kk0
                ok = kk < count
                if HAS_IDX:
                    cid = tl.load(idx_ptr + pid.to(tl.int64) * si_row + kk, mask=ok, other=0)
                else:
                    cid = kk
                c = tl.load(c_ptr + h * sc_h + cid[:, None].to(tl.int64) * sc_k + d[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
                if FP32_DOT:
                    s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee") * scaling
                else:
                    s = tl.dot(q, tl.trans(c.to(q.dtype))) * scaling
                ln = tl.load(ln_ptr + h * sl_h + cid, mask=ok, other=float("-inf"))
                x = tl.where(ok[None, :], s + ln[None, :], float("-inf"))
                m_new = tl.maximum(m_i, tl.max(x, axis=1))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
                m_i = m_new
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            if HAS_EXTRA:
                e = tl.load(extra_ptr + pid.to(tl.int64) * se_row + r, mask=r < n_rows,
                            other=float("-inf"))
                hi = tl.maximum(lse, e)
                hs = tl.where(hi == float("-inf"), 0.0, hi)
                lse = tl.where(hi == float("-inf"), hi,
                               hs + tl.log(tl.exp(lse - hs) + tl.exp(e - hs)))
            lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
            # pass 2: p_k += sum_r exp(s_rk - lse_r) / n_valid (VOTE_MAX: max_r)
            for k0 in range(0, count, BLOCK_K):
                kk = k0 + kk0
                ok = kk < count
                if HAS_IDX:
                    cid = tl.load(idx_ptr + pid.to(tl.int64) * si_row + kk, mask=ok, other=0)
                else:
                    cid = kk
                c = tl.load(c_ptr + h * sc_h + cid[:, None].to(tl.int64) * sc_k + d[None, :],
                            mask=ok[:, None] & d_ok[None, :], other=0.0)
                if FP32_DOT:
                    s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee") * scaling
                else:
                    s = tl.dot(q, tl.trans(c.to(q.dtype))) * scaling
                keep = row_ok[:, None] & ok[None, :] & (lse != float("-inf"))[:, None]
                est = tl.where(keep, tl.exp(s - lse_safe[:, None]), 0.0)
                out = out_ptr + pid.to(tl.int64) * so_row + kk
                if VOTE_MAX:
                    p = tl.max(est, axis=0)
                    if r0 > 0:
                        p = tl.maximum(p, tl.load(out, mask=ok, other=0.0))
                else:
                    p = tl.sum(est, axis=0)
                    if r0 > 0:
                        p += tl.load(out, mask=ok, other=0.0)
                tl.store(out, p, mask=ok)
        if not VOTE_MAX:
            # scale the sums to means (a second sweep over this program's own output row)
            for k0 in range(0, count, BLOCK_K):
                kk = k0 + kk0
                out = out_ptr + pid.to(tl.int64) * so_row + kk
                tl.store(out, tl.load(out, mask=kk < count, other=0.0) / n_valid,
                         mask=kk < count)

    @triton.jit
    def _compact_kernel(mask_ptr, idx_ptr, cnt_ptr, n, sm_row, si_row, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs0 = tl.arange(0, BLOCK)
        total = tl.sum(tl.zeros([BLOCK], tl.int32), axis=0)
        for s0 in range(0, n, BLOCK):
            offs = s0 + offs0
            inb = offs < n
            m = tl.load(mask_ptr + row * sm_row + offs, mask=inb, other=0).to(tl.int32)
            pos = total + tl.cumsum(m, axis=0) - 1
            tl.store(idx_ptr + row * si_row + pos, offs.to(tl.int32), mask=inb & (m != 0))
            total += tl.sum(m, axis=0)
        for s0 in range(0, n, BLOCK):                       # pad: -1 after the last index
            offs = s0 + offs0
            tl.store(idx_ptr + row * si_row + offs, tl.full([BLOCK], -1, tl.int32),
                     mask=(offs < n) & (offs >= total))
        tl.store(cnt_ptr + row, total)

else:
    _centroid_scores_kernel = None
    _compact_kernel = None


def _fp32_dot(q: torch.Tensor, other: torch.Tensor, interpreted: bool) -> bool:
    """Upcast dot operands to float32 (IEEE) in the kernel: for float32 inputs (no TF32), and
    under Triton's interpreter for 16-bit ones, whose bfloat16 tl.dot is wrong there (triton
    3.9: errors of ~1e10). A bfloat16 product is exact in float32, so the upcast computes what
    the GPU's bf16 dot with float32 accumulation computes, up to summation order."""
    return interpreted or q.dtype == torch.float32 or other.dtype == torch.float32


def _check_vote(vote: str) -> None:
    if vote not in ("mean", "max"):
        raise WorkbenchError(f"vote must be 'mean' or 'max', got {vote!r}.")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def centroid_scores(q, centroids, log_sizes, scaling: float, block_size: int | None = None, *,
                    indices=None, counts=None, extra_lse=None, backend: str = "auto",
                    vote: str = "mean"):
    """Estimated per-key attention of each centroid, per (batch, KV head, block of queries).
    See the module docstring for shapes. Returns p (b, kv, n_blocks, k or m) float32.
    vote: how the rows of a block (the query heads of a KV head's group x its queries) combine their estimates, "mean" (the paper's) or "max" (a key that one row needs is kept)."""
    _check_vote(vote)
    if q.dim() != 4 or centroids.dim() != 3 or q.shape[-1] != centroids.shape[-1]:
        raise WorkbenchError(f"centroid_scores: expected q (b, hq, q_len, d) and centroids "
                             f"(kv, k, d); got {tuple(q.shape)} and {tuple(centroids.shape)}.")
    kv = centroids.shape[0]
    if q.shape[1] % kv:
        raise WorkbenchError(f"centroid_scores: {q.shape[1]} query heads are not a multiple of "
                             f"{kv} KV heads.")
    if (indices is None) != (counts is None):
        raise WorkbenchError("centroid_scores: give indices and counts together.")
    which = pick_backend(backend, (q, centroids, log_sizes, extra_lse), _centroid_scores_kernel,
                         op="centroid_scores", supported_dtypes=SUPPORTED_DTYPES)
    if which == "torch":
        return centroid_scores_reference(q, centroids, log_sizes, scaling, block_size, indices,
                                         counts, extra_lse, vote)
    b, hq, q_len, d = q.shape
    g = hq // kv
    nb, bs = block_layout(q_len, block_size)
    rows = b * kv * nb
    width = centroids.shape[1] if indices is None else indices.shape[-1]
    out = torch.empty(b, kv, nb, width, dtype=torch.float32, device=q.device)
    if rows == 0 or width == 0:
        return out.zero_()
    if indices is not None:
        out.zero_()                                         # beyond counts: 0
    q = q if q.stride(-1) == 1 else q.contiguous()
    c = centroids.contiguous()
    ln = log_sizes.float().contiguous()
    idx = indices.reshape(rows, -1).to(torch.int32).contiguous() if indices is not None else ln
    cnt = counts.reshape(rows).to(torch.int32).contiguous() if counts is not None else ln
    ext = extra_lse.reshape(rows, g * bs).float().contiguous() if extra_lse is not None else ln
    interp = is_interpreted(_centroid_scores_kernel)
    block_r = max(16, min(64, _next_pow2(g * bs)))
    block_k = 64 if interp else max(16, min(128, 8192 // block_r))
    _centroid_scores_kernel[(rows,)](
        q, c, ln, idx, cnt, ext, out,
        q_len, centroids.shape[1], g, bs, nb, kv, d, float(scaling),
        q.stride(0), q.stride(1), q.stride(2), c.stride(0), c.stride(1), ln.stride(0),
        idx.stride(0) if indices is not None else 0,
        ext.stride(0) if extra_lse is not None else 0, out.stride(2),
        HAS_IDX=indices is not None, HAS_EXTRA=extra_lse is not None,
        FP32_DOT=_fp32_dot(q, c, interp), VOTE_MAX=vote == "max",
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=max(16, _next_pow2(d)), num_warps=4)
    return out


def compact_mask(mask: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-to-index compaction: mask (..., n) bool -> (indices (..., n) int32, True positions
    ascending then -1; counts (...,) int32)."""
    if mask.dtype != torch.bool or mask.dim() < 1:
        raise WorkbenchError(f"compact_mask: mask must be a bool tensor (..., n), got "
                             f"{mask.dtype} {tuple(mask.shape)}.")
    which = pick_backend(backend, (mask,), _compact_kernel, op="compact_mask")
    if which == "torch":
        return compact_mask_reference(mask)
    n = mask.shape[-1]
    m2 = mask.reshape(-1, n).contiguous().view(torch.uint8)
    idx = torch.empty(m2.shape, dtype=torch.int32, device=mask.device)
    cnt = torch.empty(m2.shape[0], dtype=torch.int32, device=mask.device)
    if m2.shape[0] and n:
        block = 4096 if is_interpreted(_compact_kernel) else min(1024, _next_pow2(n))
        _compact_kernel[(m2.shape[0],)](m2, idx, cnt, n, m2.stride(0), idx.stride(0),
                                        BLOCK=block)
    else:
        cnt.zero_()
    return idx.view(mask.shape), cnt.view(mask.shape[:-1])
