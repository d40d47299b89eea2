"""Quantize-and-pack for tokens appended to a KVQuant cache (one pass over the new tokens).

Input rows are vectors of head_dim values, row r = ((b * H + h) * n + t) for n new tokens.
Two modes, as in `workbench.kvquant.quantize`:

- per-token (values): the row's range is the min/max of its inliers, elements outside the
  per-row thresholds [cut_lo, cut_hi] being outliers (pass -inf/inf for none); zero/scale are
  written per row in fp16.
- per-channel (pre-RoPE keys): ranges lo/hi (H, D) come from calibration; elements outside
  them (by more than RANGE_TOLERANCE of the half-range) are outliers when `outliers` is set
  (else clamped).

Either way: u = clamp((x - zero) / scale, -1, 1), code = index of the nearest level (count of
decision midpoints below u; `levels` and `table` are (K,) for every row, or (heads, K): one
table per KV head, h = (r // rows_per_head) % heads), packed into bit planes (rows, bits, D/8) uint8 in the layout of
`kernels.kvquant_layout` (32-bit words per plane and group of 32 channels); and a dense fp16
residual (rows, D) holding x - dequant(code) at the outliers and at the rows of sink positions
(position < n_sink), 0 elsewhere. The caller keeps the nonzero residuals as the sparse part.

Per-channel keys may be rounded with error feedback (`feedback`: (heads, D, D), the upper
Cholesky factor U of the damped inverse Fisher matrix of the layer's keys, per KV head): the
channels are rounded in order, and channel c's error e (its value minus its dequantized level;
0 at outliers and sinks, which are kept exactly) is subtracted from the later channels as
e / U[c, c] * U[c, c+1:] (GPTQ's update; `round_with_feedback`). The residual then holds the
error-fed value minus its level at the outliers and sinks.

Bytes: reads rows * D inputs once; writes bits/8 bytes per element, 4 bytes per row, and the
residual (2 bytes per element; a fused compaction would write only the ~1% nonzeros).
"""

from __future__ import annotations

import torch

from kernels.dispatch import HAS_TRITON, pick_backend, tl, triton
from kernels.kvquant_layout import pack_codes
from workbench.errors import WorkbenchError

RANGE_TOLERANCE = 1e-4  # a key within this fraction of its half-range outside the calibrated
#                         range is an inlier (clamped to the end level, error ~1e-4 of the range):
#                         the cache undoes RoPE in float32, and a layer-0 key of a frequent token
#                         that sits exactly on a calibrated quantile must not flip to an outlier
#                         by rounding. The reference quantizer (workbench.kvquant.quantize) and
#                         the calibration use this same constant.

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_codes(codes, bits)                                    # (rows, bits, D/8)


def round_with_feedback(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                        keep: torch.Tensor, levels: torch.Tensor, table: torch.Tensor,
                        factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level rounding of per-channel keys, channel by channel, with error feedback.

    x, keep (H, M, D): M key vectors per KV head and the elements kept exactly (outliers,
    sinks); zero, scale broadcastable to x; levels, table (K,) or (H, K); factor (H, D, D): U,
    the upper Cholesky factor of the damped inverse Fisher matrix of the keys. Channel c is
    rounded after the errors of channels < c were fed into it; its error err = value - level
    (0 where kept) is spread as w[c+1:] -= err / U[c, c] * U[c, c+1:], which lowers the
    Fisher-weighted error err^T F err of the whole vector (GPTQ, Frantar et al. 2022, with F in
    place of the weight Hessian). Returns codes (H, M, D) int64 and the error-fed values w
    (H, M, D) float32 (the sparse part stores w - level where kept)."""
    w = x.float().clone()
    h, m, d = w.shape
    zero, scale = zero.float().expand(h, m, d), scale.float().expand(h, m, d)
    lv, tb = levels.float().to(x.device), table.float().to(x.device)
    mids = (lv[..., 1:] + lv[..., :-1]) / 2                           # (K-1,) | (H, K-1)
    mids = mids[:, None, :] if mids.dim() == 2 else mids              # (H, 1, K-1) per head
    heads = torch.arange(h, device=x.device)[:, None]                 # (H, 1)
    factor = factor.float().to(x.device)
    codes = torch.empty(h, m, d, dtype=torch.long, device=x.device)
    for c in range(d):
        col, z, s = w[..., c], zero[..., c], scale[..., c]             # (H, M)
        code = (((col - z) / s).clamp(-1.0, 1.0)[..., None] > mids).sum(-1)
        codes[..., c] = code
        if c + 1 < d:
            level = (tb[heads, code] if tb.dim() == 2 else tb[code]) * s + z
            err = torch.where(keep[..., c], 0.0, col - level) / factor[:, c, c][:, None]
            w[..., c + 1:] -= err[..., None] * factor[:, None, c, c + 1:]
    return codes, w


def quantize_pack_reference(x, levels, table, bits, *, cut_lo=None, cut_hi=None, lo=None,
                            hi=None, heads=1, rows_per_head=1, pos0=0, n_sink=0,
                            outliers=True, feedback=None):
    """PyTorch reference. x (rows, D). Per-token mode: cut_lo/cut_hi (rows,). Per-channel mode:
    lo/hi (heads, D), optionally `feedback` (heads, D, D). levels, table: (K,) or (heads, K).
    Returns planes (rows, bits, D/8) uint8, zero (rows,) fp16 | None, scale (rows,) fp16 |
    None, residual (rows, D) fp16."""
    xf = x.float()
    rows, d = xf.shape
    r = torch.arange(rows, device=x.device)
    h = (r // rows_per_head) % heads                                  # (rows,) KV head
    if lo is None:                                                    # per token
        out = (xf < cut_lo.float()[:, None]) | (xf > cut_hi.float()[:, None])
        inf = torch.tensor(float("inf"), device=x.device)
        rlo = torch.where(out, inf, xf).amin(1)
        rhi = torch.where(out, -inf, xf).amax(1)
        rlo, rhi = torch.where(torch.isfinite(rlo), rlo, 0), torch.where(torch.isfinite(rhi), rhi, 0)
        zero16, scale16 = ((rhi + rlo) / 2).half(), ((rhi - rlo) / 2).clamp_min(1e-4).half()
        z, s = zero16.float()[:, None], scale16.float()[:, None]
    else:                                                             # per channel
        clo, chi = lo.float()[h], hi.float()[h]                       # (rows, D)
        z, s = (chi + clo) / 2, ((chi - clo) / 2).clamp_min(1e-6)
        out = ((xf - z).abs() > s * (1 + RANGE_TOLERANCE)) if outliers \
            else torch.zeros_like(xf, dtype=torch.bool)
        zero16 = scale16 = None
    sink = (pos0 + r % rows_per_head) < n_sink
    keep = out | sink[:, None]
    if feedback is not None:                                          # the rows of each head
        codes = torch.empty(rows, d, dtype=torch.long, device=x.device)
        xf = xf.clone()
        for j in range(heads):
            sel = h == j
            def pick(t, j=j):
                return t[j] if t.dim() == 2 else t
            cj, wj = round_with_feedback(xf[sel][None], z[sel][None], s[sel][None],
                                         keep[sel][None], pick(levels), pick(table),
                                         feedback[j:j + 1])
            codes[sel], xf[sel] = cj[0], wj[0]
    else:
        u = ((xf - z) / s).clamp(-1.0, 1.0)
        lv = levels.float().to(x.device)
        mids = (lv[..., 1:] + lv[..., :-1]) / 2                       # (K-1,) | (heads, K-1)
        mids = mids[h][:, None, :] if mids.dim() == 2 else mids       # (rows, 1, K-1) per head
        codes = (u[..., None] > mids).sum(-1)                         # (rows, D)
    tb = table.float().to(x.device)
    deq = (tb[h[:, None], codes] if tb.dim() == 2 else tb[codes]) * s + z
    residual = torch.where(keep, xf - deq, 0.0).half()
    return _pack_planes(codes, bits), zero16, scale16, residual


if HAS_TRITON:

    @triton.jit
    def _kvq_pack_kernel(
        x_ptr, planes_ptr, zero_ptr, scale_ptr, res_ptr,
        cutlo_ptr, cuthi_ptr, lo_ptr, hi_ptr, mids_ptr, table_ptr, fb_ptr,
        rows, heads, rows_per_head, pos0, n_sink, table_stride, mid_stride,
        D: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, BLOCK_R: tl.constexpr,
        PER_CHANNEL: tl.constexpr, OUTLIERS: tl.constexpr, TOL: tl.constexpr,
        FEEDBACK: tl.constexpr,
    ):
        # table_stride, mid_stride: K, K - 1 for one level table per KV head; 0, 0 for one
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < rows
        d = tl.arange(0, D)
        r64 = r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
        x = x.to(tl.float32)                                           # (BLOCK_R, D)
        h = (r // rows_per_head) % heads
        if PER_CHANNEL:
            clo = tl.load(lo_ptr + h[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
            chi = tl.load(hi_ptr + h[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
            z = (chi + clo) / 2
            s = tl.maximum((chi - clo) / 2, 1e-6)
            if OUTLIERS:
                out = tl.abs(x - z) > s * (1.0 + TOL)
            else:
                out = x != x                                           # all False
        else:
            tlo = tl.load(cutlo_ptr + r, mask=r_ok, other=0.0)
            thi = tl.load(cuthi_ptr + r, mask=r_ok, other=0.0)
            out = (x < tlo[:, None]) | (x > thi[:, None])
            rlo = tl.min(tl.where(out, float("inf"), x), axis=1)
            rhi = tl.max(tl.where(out, float("-inf"), x), axis=1)
            rlo = tl.where(rlo == float("inf"), 0.0, rlo)
            rhi = tl.where(rhi == float("-inf"), 0.0, rhi)
            z16 = ((rhi + rlo) / 2).to(tl.float16)
            s16 = tl.maximum((rhi - rlo) / 2, 1e-4).to(tl.float16)
            tl.store(zero_ptr + r, z16, mask=r_ok)
            tl.store(scale_ptr + r, s16, mask=r_ok)
            z = z16.to(tl.float32)[:, None]
            s = s16.to(tl.float32)[:, None]
        pos = pos0 + r % rows_per_head
        keep = out | (pos < n_sink)[:, None]
        mid_row = mids_ptr + h * mid_stride                                # (BLOCK_R,)
        code = tl.zeros([BLOCK_R, D], dtype=tl.int32)
        if FEEDBACK:                   # channel by channel, errors fed forward (module doc)
            w = x
            zb = z + tl.zeros([BLOCK_R, D], dtype=tl.float32)
            sb = s + tl.zeros([BLOCK_R, D], dtype=tl.float32)
            for c in range(D):
                sel = (d == c)[None, :]
                col = tl.sum(tl.where(sel, w, 0.0), axis=1)                # (BLOCK_R,)
                zc = tl.sum(tl.where(sel, zb, 0.0), axis=1)
                sc = tl.sum(tl.where(sel, sb, 0.0), axis=1)
                kc = tl.sum(tl.where(sel, keep.to(tl.int32), 0), axis=1) > 0
                uc = tl.minimum(tl.maximum((col - zc) / sc, -1.0), 1.0)
                cc = tl.zeros([BLOCK_R], dtype=tl.int32)
                for k in tl.static_range(K - 1):
                    cc += (uc > tl.load(mid_row + k, mask=r_ok, other=0.0)).to(tl.int32)
                level = tl.load(table_ptr + h * table_stride + cc) * sc + zc
                code = tl.where(sel, cc[:, None], code)
                x = tl.where(sel, col[:, None], x)                         # error-fed values
                err = tl.where(kc, 0.0, col - level) / tl.load(
                    fb_ptr + h * (D * D) + c * (D + 1), mask=r_ok, other=1.0)
                u_row = tl.load(fb_ptr + h[:, None] * (D * D) + c * D + d[None, :],
                                mask=r_ok[:, None] & (d > c)[None, :], other=0.0)
                w = w - err[:, None] * u_row
        else:
            u = tl.minimum(tl.maximum((x - z) / s, -1.0), 1.0)
            for k in tl.static_range(K - 1):
                code += (u > tl.load(mid_row + k, mask=r_ok, other=0.0)[:, None]).to(tl.int32)
        deq = tl.load(table_ptr + (h * table_stride)[:, None] + code) * s + z
        res = tl.where(keep, x - deq, 0.0)
        tl.store(res_ptr + r64[:, None] * D + d[None, :], res.to(tl.float16), mask=r_ok[:, None])
        # bit planes (kernels.kvquant_layout): word w of plane j holds bit j of the codes of
        # channel h * D/2 + 16 w + 8 l1 + k at bit (4 k + 2 h + l1 + j) mod 32
        NG: tl.constexpr = D // 32
        c5 = tl.reshape(code, [BLOCK_R, 2, NG, 2, 8])                  # (r, h, w, l1, k)
        hh = tl.arange(0, 2)[:, None, None, None]
        l1 = tl.arange(0, 2)[None, None, :, None]
        kk = tl.arange(0, 8)[None, None, None, :]
        offs_w = tl.arange(0, NG)
        for j in tl.static_range(BITS):
            sh = (4 * kk + 2 * hh + l1 + j) % 32                       # (2, 1, 2, 8)
            b = ((c5 >> j) & 1) << sh[None, :, :, :, :]
            word = tl.sum(tl.sum(tl.sum(b, axis=4), axis=3), axis=1)   # (BLOCK_R, NG): disjoint bits
            tl.store(planes_ptr + r64[:, None] * (BITS * NG) + j * NG + offs_w[None, :],
                     word, mask=r_ok[:, None])

else:
    _kvq_pack_kernel = None


def quantize_pack(x, levels, table, bits, *, cut_lo=None, cut_hi=None, lo=None, hi=None,
                  heads=1, rows_per_head=1, pos0=0, n_sink=0, outliers=True, feedback=None,
                  backend: str = "auto"):
    """Quantize and pack rows of appended tokens (module docstring); same returns as
    `quantize_pack_reference`. backend: "auto" | "triton" | "torch"."""
    rows, d = x.shape
    if d % 32 or d & (d - 1):
        raise WorkbenchError(f"quantize_pack: head_dim must be a power of two >= 32, got {d}.")
    if (lo is None) == (cut_lo is None):
        raise WorkbenchError("quantize_pack: give cut_lo/cut_hi (per-token) or lo/hi "
                             "(per-channel), not both or neither.")
    if levels.dim() == 2 and (levels.shape[0] != heads or table.shape != levels.shape):
        raise WorkbenchError(f"quantize_pack: level tables {tuple(levels.shape)} and "
                             f"{tuple(table.shape)} for {heads} heads: give (K,) or (heads, K).")
    if feedback is not None and (lo is None or tuple(feedback.shape) != (heads, d, d)):
        raise WorkbenchError(f"quantize_pack: error feedback is for per-channel keys and needs "
                             f"(heads, D, D) = ({heads}, {d}, {d}) factors, got "
                             f"{None if feedback is None else tuple(feedback.shape)}"
                             f"{' without lo/hi' if lo is None else ''}.")
    which = pick_backend(backend, (x,), _kvq_pack_kernel, op="quantize_pack",
                         supported_dtypes=SUPPORTED_DTYPES)
    kw = dict(cut_lo=cut_lo, cut_hi=cut_hi, lo=lo, hi=hi, heads=heads,
              rows_per_head=rows_per_head, pos0=pos0, n_sink=n_sink, outliers=outliers,
              feedback=feedback)
    if which == "torch":
        return quantize_pack_reference(x, levels, table, bits, **kw)
    dev = x.device
    planes = torch.empty(rows, bits, d // 8, dtype=torch.uint8, device=dev)
    residual = torch.empty(rows, d, dtype=torch.float16, device=dev)
    per_channel = lo is not None
    zero = scale = None
    if not per_channel:
        zero = torch.empty(rows, dtype=torch.float16, device=dev)
        scale = torch.empty(rows, dtype=torch.float16, device=dev)
    lv = levels.float().to(dev)
    mids = ((lv[..., 1:] + lv[..., :-1]) / 2).contiguous()          # (K-1,) | (heads, K-1)
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    block_r = 16
    if rows:
        _kvq_pack_kernel[(triton.cdiv(rows, block_r),)](
            x.contiguous(), planes.view(torch.int32), zero if zero is not None else residual,
            scale if scale is not None else residual, residual,
            cut_lo.float().contiguous() if cut_lo is not None else dummy,
            cut_hi.float().contiguous() if cut_hi is not None else dummy,
            lo.float().contiguous() if per_channel else dummy,
            hi.float().contiguous() if per_channel else dummy,
            mids, table.float().to(dev).contiguous(),
            feedback.float().to(dev).contiguous() if feedback is not None else dummy,
            rows, heads, rows_per_head, pos0, n_sink, *((lv.shape[-1], lv.shape[-1] - 1)
                                                          if lv.dim() == 2 else (0, 0)),
            D=d, BITS=bits, K=lv.shape[-1], BLOCK_R=block_r, PER_CHANNEL=per_channel,
            OUTLIERS=bool(outliers), TOL=RANGE_TOLERANCE, FEEDBACK=feedback is not None,
        )
    return planes, zero, scale, residual
