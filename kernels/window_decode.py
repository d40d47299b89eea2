"""Decode attention of one query token over a short window of plain keys, as a mergeable partial.

window_attention(q, k, v, scaling) -> (o, lse)
    q (B, Hq, D) one query per sequence, k, v (B, H, r, D) with Hq a multiple of H (GQA); every
    key visible (the window lies before the query). Returns o (B, Hq, D) float32, the softmax-
    weighted values, and lse (B, Hq) float32, the log-sum-exp of the scaled scores (natural log):
    a partial result that `kernels.lse_merge` merges with attention over other keys.

KVQuant's recent window (`workbench.kvquant.attend`) is the user: its newest tokens stay
unquantized, and each decode step merges the packed cache's attention with this one. In
PyTorch that is ~10 small launches per layer and token (upcasts, two matmuls, logsumexp, exp);
the kernel is one: a program per (batch, KV head) holds the group's query rows (padded to 16 for
the tensor cores), streams the window in tiles of BLOCK_R keys with an online softmax, and
writes the float32 partial.
"""

from __future__ import annotations

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from workbench.errors import WorkbenchError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference (float32, float64 for float64 inputs): shapes in the module docstring."""
    b, hq, d = q.shape
    h = k.shape[1]
    ct = torch.promote_types(q.dtype, torch.float32)
    qg = q.view(b, h, hq // h, d).to(ct)                                # (B, H, G, D)
    scores = (qg @ k.to(ct).transpose(-1, -2)) * scaling                # (B, H, G, r)
    lse = torch.logsumexp(scores, dim=-1)                                # (B, H, G)
    out = torch.exp(scores - lse[..., None]) @ v.to(ct)                  # (B, H, G, D)
    return out.reshape(b, hq, d), lse.reshape(b, hq)


if HAS_TRITON:

    @triton.jit
    def _window_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, r, G, qk_scale,
                       sq_b, sq_h, sk_b, sk_h, sk_r, sv_b, sv_h, sv_r, H,
                       D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
                       FP32_DOT: tl.constexpr):
        bh = tl.program_id(0)                   # (batch, kv head)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = tl.arange(0, BLOCK_G)
        g_ok = rows < G
        hq = h * G + tl.minimum(rows, G - 1)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + hq[:, None] * sq_h + d[None, :])
        q = tl.where(g_ok[:, None], q, 0.0)
        if FP32_DOT:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        j0 = tl.arange(0, BLOCK_R)
        for r0 in range(0, r, BLOCK_R):
            j = r0 + j0
            ok = j < r
            kt = tl.load(k_ptr + b * sk_b + h * sk_h + j[:, None].to(tl.int64) * sk_r
                         + d[None, :], mask=ok[:, None], other=0.0)
            vt = tl.load(v_ptr + b * sv_b + h * sv_h + j[:, None].to(tl.int64) * sv_r
                         + d[None, :], mask=ok[:, None], other=0.0)
            if FP32_DOT:
                s = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt.to(q.dtype)))
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))        # log2 units
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if FP32_DOT:
                pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vt.dtype), vt)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        qrow = b * H * G + hq                   # rows of o (B*Hq, D) and lse (B*Hq,)
        tl.store(o_ptr + qrow[:, None] * D + d[None, :], acc / l_i[:, None],
                 mask=g_ok[:, None])
        tl.store(lse_ptr + qrow, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=g_ok)

else:
    _window_kernel = None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, Hq, D) float32, lse (B, Hq) float32): see the module docstring. backend:
    "auto" | "triton" | "torch" (`kernels.dispatch`)."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] \
            or q.shape[2] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise WorkbenchError(f"window_attention: expected q (B, Hq, D) and k, v (B, H, r, D) "
                             f"with Hq a multiple of H; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}.")
    if k.shape[2] == 0:
        raise WorkbenchError("window_attention: the window is empty.")
    which = pick_backend(backend, (q, k, v), _window_kernel, op="window_attention",
                         supported_dtypes=SUPPORTED_DTYPES)
    d = q.shape[-1]
    if which == "triton" and (d < 16 or d & (d - 1)):      # the kernel: D a power of two
        if backend == "triton":
            raise WorkbenchError(f"window_attention: the Triton kernel takes head_dim a power "
                                 f"of two >= 16, got {d}; use backend='torch' or 'auto'.")
        which = "torch"
    if which == "torch":
        return window_attention_reference(q, k, v, scaling)
    b, hq, _ = q.shape
    h, r = k.shape[1], k.shape[2]
    g = hq // h
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    o = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    interp = is_interpreted(_window_kernel)
    fp32 = interp or torch.float32 in (q.dtype, k.dtype, v.dtype)
    _window_kernel[(b * h,)](
        q, k, v, o, lse, r, g, float(scaling) * 1.4426950408889634,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), h,
        D=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_R=64 if interp else 32,
        FP32_DOT=fp32, num_warps=4)
    return o, lse
