"""Quantizing appended tokens with the quantize-and-pack kernel (`kernels.kvquant_pack`): the
same `Quantized` as the reference `quantize`, from one kernel launch plus a few PyTorch ops,
instead of the reference's dozens of small ops per layer and token (a decode step of the cache
is launch-bound on a GPU: `benchmarks/bench_kvquant_generate.py`).

    q = quantize_appended(x, spec, "v", tables, start, backend="triton")   # == quantize(...)

Covers KVQuant's layouts: keys per channel with calibrated ranges, and per-token keys or
values (outliers: the k largest and smallest of each token over all heads, found by top-k and
passed to the kernel as per-token thresholds). KIVI-like online groups use the reference.
"""

from __future__ import annotations

import torch

from kernels.hadamard import hadamard
from kernels.kvquant_pack import quantize_pack
from workbench.kvquant.methods import QuantSpec
from workbench.kvquant.quantize import LayerTables, Quantized, quantize, rotates, token_tails


def kernel_layout(spec: QuantSpec, kind: str) -> bool:
    """True when the kernel covers this spec's layout for `kind` ("k" or "v")."""
    if spec.is_fp16:
        return False
    return kind == "v" or spec.key_axis == "token" or spec.key_ranges == "calibrated"


def _token_cuts(x: torch.Tensor, tails: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token thresholds (B, n) whose outside holds the tails[0] smallest and tails[1] largest
    elements of each token over all heads: x (B, H, n, D)."""
    b, h, n, d = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(b, n, h * d)                    # (B, n, H*D)
    inf = torch.full((b, n), float("inf"), device=x.device)
    hi = flat.topk(tails[1] + 1, dim=-1).values[..., -1] if tails[1] else inf
    lo = -(-flat).topk(tails[0] + 1, dim=-1).values[..., -1] if tails[0] else -inf
    return lo, hi


def quantize_appended(x: torch.Tensor, spec: QuantSpec, kind: str, tables: LayerTables,
                      start: int = 0, backend: str = "triton") -> Quantized:
    """`quantize(x, spec, kind, tables, start)` through the quantize-and-pack kernel where it
    covers the layout (`kernel_layout`), else the reference. x (B, H, n, D) float."""
    if backend == "torch" or not kernel_layout(spec, kind):
        return quantize(x, spec, kind, tables, start)
    b, h, n, d = x.shape
    xf = x.float()
    if rotates(spec, kind):                                         # values in Hadamard basis
        xf = xf @ hadamard(d, xf.device)
    xf = xf.contiguous()
    frac = spec.key_fraction if kind == "k" else spec.value_fraction
    levels = tables.key_levels if kind == "k" else tables.value_levels
    table = tables.key_table if kind == "k" else tables.value_table
    n_sink = max(0, min(spec.sink_tokens - start, n))
    kw = dict(heads=h, rows_per_head=n, pos0=0, n_sink=n_sink, backend=backend)
    if kind == "k" and spec.key_axis == "channel":                  # calibrated per channel
        planes, zero, scale, residual = quantize_pack(
            xf.view(-1, d), levels, table, spec.bits, lo=tables.key_lo, hi=tables.key_hi,
            outliers=frac > 0,
            feedback=tables.feedback_for(spec), **kw)
    else:                                                           # per token
        tails = tables.value_tails if kind == "v" else None
        if tails is None:
            k = token_tails(frac, h, d)
            tails = (k, k)
        if not frac > 0:
            tails = (0, 0)
        lo, hi = _token_cuts(xf, tails)                                 # (B, n)
        planes, zero, scale, residual = quantize_pack(
            xf.view(-1, d), levels, table, spec.bits,
            cut_lo=lo[:, None, :].expand(b, h, n).reshape(-1),
            cut_hi=hi[:, None, :].expand(b, h, n).reshape(-1), **kw)
        zero, scale = zero.view(b, h, n), scale.view(b, h, n)
    residual = residual.view(b, h, n, d)
    bb, hh, ss, dd = residual.nonzero(as_tuple=True)
    index = ((ss + start) * b + bb) * h * d + hh * d + dd
    return Quantized(planes.view(b, h, n, spec.bits, d // 8), zero, scale,
                     index.to(torch.int32), residual[bb, hh, ss, dd], b, h, d)
