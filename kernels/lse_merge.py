"""Merge partial attention results by their log-sum-exp (one fused pass over the partials).

Attention over a key set K that is cut into parts K_1..K_n (split-KV decode; a fixed context plus
the user's tokens; the kept blocks of a sparse method; the groups of a quantized cache) can be
computed part by part. Part i gives, for each query,

    o_i   = softmax(s_i) @ V_i          the attention output over K_i alone      (head_dim,)
    lse_i = log(sum_j exp(s_ij))        the log-sum-exp of its scaled scores     ()

and the attention over all of K is the lse-weighted mix of the parts:

    lse = log(sum_i exp(lse_i))          o = sum_i exp(lse_i - lse) * o_i

A part with no keys (all masked, or nothing selected) has lse_i = -inf: weight 0, and its output
is ignored (masked out, never multiplied in), so it may hold anything, NaN included. If every part is empty the merged output
is 0 and the merged lse is -inf (the convention of flash-attention for fully masked rows).

Layout. `outputs` is (..., n_partials, head_dim) and `lses` is (..., n_partials) for any leading
dims: (batch, heads, n_splits, head_dim) for split-KV decode, (batch, heads, q_len, n_partials,
head_dim) for prefill. The leading dims are flattened into rows, so a layout whose partial axis
sits elsewhere works after `.movedim(axis, -2)` (a view; the launcher passes strides, and copies
only when the leading dims cannot be flattened without one). lse is in natural-log units of the
*scaled* scores (kernels that keep log2 units: multiply by ln 2 first).

Bytes moved per row (the kernel reads each input once and writes each output once):
n * head_dim * itemsize (outputs) + 4n (lses) + head_dim * itemsize (merged) + 4 (merged lse).
Eager PyTorch runs about ten kernels, each reading and writing a (rows, n, head_dim) or
(rows, n) tensor in fp32, so it moves several times those bytes; the fused kernel moves them once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from kernels.dispatch import HAS_TRITON, is_interpreted, pick_backend, tl, triton
from workbench.errors import WorkbenchError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Reference: plain PyTorch, the teaching path
# ----------------------------------------------------------------------------------------------


def merge_attention_partials_reference(
    outputs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention outputs by log-sum-exp, in plain PyTorch.

    outputs: (..., n, head_dim); lses: (..., n), natural log. Computes in float32 (float64 for
    float64 inputs). Returns (merged (..., head_dim) in outputs.dtype, lse (...) in float32 or
    float64).
    """
    compute = torch.promote_types(outputs.dtype, torch.float32)
    lse = lses.to(compute)                                    # (..., n)
    empty = torch.isneginf(lse)                               # (..., n) parts that saw no keys
    m = lse.amax(dim=-1, keepdim=True)                        # (..., 1) largest lse
    m = torch.where(torch.isneginf(m), 0.0, m)                # all parts empty: shift by 0 instead
    w = torch.exp(lse - m)                                    # (..., n) in [0, 1], 0 where empty
    s = w.sum(dim=-1, keepdim=True)                           # (..., 1) >= 1 unless all empty
    o = outputs.to(compute).masked_fill(empty[..., None], 0)  # (..., n, d) never read empty parts
    merged = (w[..., None] * o).sum(dim=-2)                   # (..., d)
    merged = merged / torch.where(s > 0, s, 1.0)              # all empty: 0 / 1 = 0
    merged_lse = (m + torch.log(s)).squeeze(-1)               # (...) log(0) = -inf when all empty
    return merged.to(outputs.dtype), merged_lse


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _lse_merge_kernel(
        o_ptr, lse_ptr, out_ptr, out_lse_ptr,   # (rows, n, d) (rows, n) (rows, d) (rows,)
        n_rows, n_parts, head_dim,
        stride_o_row, stride_o_part,            # outputs: head_dim is contiguous
        stride_l_row, stride_l_part,            # lses
        stride_out_row,                         # merged: head_dim is contiguous
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program merges BLOCK_R rows x BLOCK_D columns of head_dim, over all n partials.
        pid_r = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)          # (BLOCK_R,)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)          # (BLOCK_D,)
        parts = tl.arange(0, BLOCK_N).to(tl.int64)              # (BLOCK_N,)
        row_ok = rows < n_rows
        col_ok = cols < head_dim
        rows64 = rows.to(tl.int64)                              # offsets may pass 2**31

        # One pass over the partials, BLOCK_N at a time, with an online softmax: keep the running
        # max m, the running sum s of exp(lse_i - m) and the running weighted sum acc, and rescale
        # s and acc by exp(m_old - m_new) when the max grows. The lse and output loads of a chunk
        # do not depend on each other, so they are in flight together.
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for start in range(0, n_parts, BLOCK_N):
            p = start + parts
            ok = row_ok[:, None] & (p < n_parts)[None, :]       # (BLOCK_R, BLOCK_N)
            lse = tl.load(lse_ptr + rows64[:, None] * stride_l_row + p[None, :] * stride_l_part,
                          mask=ok, other=float("-inf")).to(tl.float32)
            o = tl.load(o_ptr + rows64[:, None, None] * stride_o_row
                        + p[None, :, None] * stride_o_part + cols[None, None, :],
                        mask=ok[:, :, None] & col_ok[None, None, :],
                        other=0.0).to(tl.float32)               # (BLOCK_R, BLOCK_N, BLOCK_D)
            m_new = tl.maximum(m, tl.max(lse, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: shift by 0
            alpha = tl.exp(m - shift)                           # rescales the old sums (0 at first)
            w = tl.exp(lse - shift[:, None])                    # (BLOCK_R, BLOCK_N), 0 if empty
            empty = lse == float("-inf")                        # its output may be NaN: skip it
            wo = tl.where(empty[:, :, None], 0.0, w[:, :, None] * o)
            s = s * alpha + tl.sum(w, axis=1)
            acc = acc * alpha[:, None] + tl.sum(wo, axis=1)
            m = m_new

        has_keys = s > 0                                        # s >= 1 unless all parts empty
        s_safe = tl.where(has_keys, s, 1.0)
        merged = acc / s_safe[:, None]                          # all empty: 0 / 1 = 0
        tl.store(out_ptr + rows64[:, None] * stride_out_row + cols[None, :],
                 merged.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if pid_d == 0:                                          # one program per row writes lse
            merged_lse = tl.where(has_keys, m + tl.log(s_safe), float("-inf"))
            tl.store(out_lse_ptr + rows, merged_lse, mask=row_ok)

else:
    _lse_merge_kernel = None


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_GPU_TILE = 4096          # values in one (BLOCK_R, BLOCK_N, BLOCK_D) tile on a GPU
_INTERPRETER_TILE = 1 << 16   # the interpreter runs programs one by one: fewer, larger tiles
_MIN_PROGRAMS = 264       # about two programs per multiprocessor on an H100/H200 (132 SMs)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=1024)
def choose_blocks(n_rows: int, n_parts: int, head_dim: int, interpreted: bool = False):
    """Pick (BLOCK_R, BLOCK_N, BLOCK_D, num_warps) for a launch.

    GPU: head_dim in chunks of 64, all partials (up to 32) in one tile, rows until the tile holds
    about 4K values; fewer rows while the grid has too few programs to fill the chip; 2 warps.
    From the H200 block sweep in benchmarks/results/lse_merge_nvidia_h200.json (bf16, d=128):
    2 warps was the best or within noise of it everywhere, and 4-8 warps made some tiles 3-5x
    slower; (32, 2, 64, 2) ran the 32x8192x2 merge in 0.056 ms (3.6 TB/s, 86% of copy) and
    (16, 4, 64, 2) the 4x32x2048x4 merge in 0.092 ms (3.7 TB/s, 88%); decode shapes are
    launch-bound (5-7 us in a CUDA graph) whatever the blocks.
    """
    block_d = min(_next_pow2(head_dim), 64)
    block_n = min(_next_pow2(n_parts), 32)
    tile = _INTERPRETER_TILE if interpreted else _GPU_TILE
    block_r = max(1, tile // (block_n * block_d))
    block_r = min(block_r, _next_pow2(n_rows))
    if not interpreted:
        def programs(br, bd):
            return _cdiv(n_rows, br) * _cdiv(head_dim, bd)

        while block_r > 1 and programs(block_r, block_d) < _MIN_PROGRAMS:
            block_r //= 2
        while block_d > 32 and programs(block_r, block_d) < _MIN_PROGRAMS:
            block_d //= 2
    num_warps = 1 if block_r * block_n * block_d < 512 else 2
    return block_r, block_n, block_d, num_warps


def lse_merge_triton(
    outputs: torch.Tensor,          # (rows, n, d), head_dim contiguous
    lses: torch.Tensor,             # (rows, n)
    out: torch.Tensor,              # (rows, d), head_dim contiguous; written
    out_lse: torch.Tensor,          # (rows,) float32, contiguous; written
    blocks: tuple[int, int, int, int] | None = None,
) -> None:
    """Launch the Triton kernel on 3-D/2-D views; `blocks` overrides `choose_blocks`."""
    n_rows, n_parts, head_dim = outputs.shape
    if n_rows == 0 or head_dim == 0:
        return
    block_r, block_n, block_d, num_warps = blocks or choose_blocks(
        n_rows, n_parts, head_dim, interpreted=is_interpreted(_lse_merge_kernel))
    grid = (_cdiv(n_rows, block_r), _cdiv(head_dim, block_d))
    _lse_merge_kernel[grid](
        outputs, lses, out, out_lse,
        n_rows, n_parts, head_dim,
        outputs.stride(0), outputs.stride(1),
        lses.stride(0), lses.stride(1),
        out.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------


def _check_inputs(outputs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(outputs, (list, tuple)) or isinstance(lses, (list, tuple)):
        if not (isinstance(outputs, Sequence) and isinstance(lses, Sequence)
                and len(outputs) == len(lses) and len(outputs) > 0):
            raise WorkbenchError("merge_attention_partials: give outputs and lses both as "
                                 "tensors, or both as non-empty lists of the same length.")
        outputs = torch.stack(list(outputs), dim=-2)          # (..., n, d): a copy
        lses = torch.stack(list(lses), dim=-1)                # (..., n)
    if not (isinstance(outputs, torch.Tensor) and isinstance(lses, torch.Tensor)):
        raise WorkbenchError("merge_attention_partials: outputs and lses must be tensors.")
    if outputs.dim() < 2 or tuple(lses.shape) != tuple(outputs.shape[:-1]):
        raise WorkbenchError(
            "merge_attention_partials: expected outputs (..., n_partials, head_dim) and lses "
            f"(..., n_partials) with the same leading dims; got outputs {tuple(outputs.shape)} "
            f"and lses {tuple(lses.shape)}.")
    if outputs.shape[-2] == 0:
        raise WorkbenchError("merge_attention_partials: there must be at least one partial.")
    if not (outputs.is_floating_point() and lses.is_floating_point()):
        raise WorkbenchError("merge_attention_partials: outputs and lses must be floating point, "
                             f"got {outputs.dtype} and {lses.dtype}.")
    return outputs, lses


def _check_buffer(buf: torch.Tensor, shape: tuple, dtype: torch.dtype, name: str) -> None:
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or not buf.is_contiguous():
        raise WorkbenchError(
            f"merge_attention_partials: {name} must be a contiguous {dtype} tensor of shape "
            f"{tuple(shape)}; got {buf.dtype} {tuple(buf.shape)}"
            f"{'' if buf.is_contiguous() else ' (not contiguous)'}.")


def merge_attention_partials(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    lses: torch.Tensor | Sequence[torch.Tensor],
    backend: str = "auto",
    *,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge n partial attention results into the attention over all their keys.

    outputs: (..., n_partials, head_dim) float16/bfloat16/float32, or a list of n (..., head_dim)
        tensors (stacked: one copy). Any leading dims, e.g. (batch, heads, n_splits, head_dim).
    lses: (..., n_partials) log-sum-exp of each partial's scaled scores, natural log; -inf marks
        an empty partial, whose output is ignored (it may be NaN). Or a list of n (...) tensors.
    backend: "auto" | "triton" | "torch" (see `kernels.dispatch`).
    out, out_lse: optional contiguous buffers of shape (..., head_dim) in outputs.dtype and (...)
        in float32 to write into.

    Returns (merged, lse): merged (..., head_dim) in outputs.dtype, lse (...) in float32 (float64
    for float64 inputs). Accumulates in float32. All partials empty: merged 0, lse -inf.
    """
    outputs, lses = _check_inputs(outputs, lses)
    lead, (n_parts, head_dim) = outputs.shape[:-2], outputs.shape[-2:]
    which = pick_backend(backend, (outputs, lses, out, out_lse), _lse_merge_kernel,
                         op="merge_attention_partials", supported_dtypes=SUPPORTED_DTYPES)
    if out is not None:
        _check_buffer(out, (*lead, head_dim), outputs.dtype, "out")
    if out_lse is not None:
        _check_buffer(out_lse, tuple(lead), torch.promote_types(outputs.dtype, torch.float32),
                      "out_lse")

    if which == "torch":
        merged, merged_lse = merge_attention_partials_reference(outputs, lses)
        if out is not None:
            merged = out.copy_(merged)
        if out_lse is not None:
            merged_lse = out_lse.copy_(merged_lse)
        return merged, merged_lse

    o3 = outputs.reshape(-1, n_parts, head_dim)               # (rows, n, d): a view when it can
    if o3.stride(-1) != 1:
        o3 = o3.contiguous()
    l2 = lses.reshape(-1, n_parts)                            # (rows, n)
    if out is None:
        out = torch.empty((*lead, head_dim), dtype=outputs.dtype, device=outputs.device)
    if out_lse is None:
        out_lse = torch.empty(tuple(lead), dtype=torch.float32, device=outputs.device)
    lse_merge_triton(o3, l2, out.view(-1, head_dim), out_lse.view(-1))
    return out, out_lse
