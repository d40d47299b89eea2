"""Level tables for b-bit quantization of values normalized to [-1, 1].

A b-bit code c in {0 .. 2^b - 1} stands for `levels[c]`; a normalized value u is rounded to the
nearest level. Three ways to choose the 2^b levels:

- `uniform_levels(b)`: evenly spaced, -1 .. 1 (plain asymmetric integer quantization).
- `nf_levels(b)`: NormalFloat-style, quantiles of a standard normal scaled to -1 .. 1.
- `kmeans_levels(hist, b)`: 1-D k-means over a calibration histogram of normalized values, each
  bin weighted by how many values fell in it or by their summed Fisher information (KVQuant's
  sensitivity-weighted non-uniform datatype, "nuq").

`qnorm_table(levels, hist)` is Q-Norm: an affine correction of the table used for *dequantizing*
(codes are unchanged) so the dequantized values keep the mean and standard deviation of the
originals on the calibration distribution.

Tables are per layer (K,) or per KV head (H, K) (`round_to_levels` and `lookup_levels` take
either). Histograms are (n_bins,) tensors over [-1, 1] (`bin_centers(n_bins)`); 1-D k-means on the bin
centers is exact up to the bin width (2 / n_bins) and takes milliseconds.
"""

from __future__ import annotations

import math

import torch

from kernels.kvquant_layout import lookup_levels  # noqa: F401 (re-exported)
from workbench.errors import WorkbenchError

SUPPORTED_BITS = (2, 3, 4)


def check_bits(bits: int) -> int:
    """Return `bits` if supported, else raise a WorkbenchError that lists the supported widths."""
    if bits not in SUPPORTED_BITS:
        raise WorkbenchError(f"{bits}-bit quantization is not supported: use one of "
                             f"{', '.join(map(str, SUPPORTED_BITS))} bits (or 'fp16' for none).")
    return bits


def bin_centers(n_bins: int) -> torch.Tensor:
    """(n_bins,) centers of equal bins over [-1, 1]."""
    edges = torch.linspace(-1.0, 1.0, n_bins + 1, dtype=torch.float64)
    return ((edges[:-1] + edges[1:]) / 2).float()


def histogram(u: torch.Tensor, weights: torch.Tensor | None, n_bins: int) -> torch.Tensor:
    """(n_bins,) summed `weights` (or counts) of normalized values `u` (any shape, in [-1, 1])."""
    idx = ((u.flatten().double() + 1.0) * (n_bins / 2.0)).floor().clamp_(0, n_bins - 1).long()
    w = torch.ones_like(idx, dtype=torch.float64) if weights is None else weights.flatten().double()
    return torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, w).float()


def uniform_levels(bits: int) -> torch.Tensor:
    """(2^bits,) evenly spaced levels from -1 to 1."""
    return torch.linspace(-1.0, 1.0, 2 ** check_bits(bits))


def nf_levels(bits: int) -> torch.Tensor:
    """(2^bits,) NormalFloat-style levels: normal quantiles at (i + 0.5) / 2^bits, scaled so the
    outermost levels are -1 and 1 (symmetric, no exact zero for even counts)."""
    k = 2 ** check_bits(bits)
    p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    z = math.sqrt(2.0) * torch.erfinv(2 * p - 1)
    return (z / z.abs().max()).float()


def round_to_levels(u: torch.Tensor, levels: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """Index of the nearest level for each element of `u` (uint8, same shape). `levels` sorted:
    (K,) for all of `u`, or (H, K), one table per head, heads along `u`'s dim `head_dim`."""
    if levels.dim() == 2:                                       # per head: one bucketize each
        out = torch.empty(u.shape, dtype=torch.uint8, device=u.device)
        for j in range(levels.shape[0]):
            out.select(head_dim, j).copy_(round_to_levels(u.select(head_dim, j), levels[j]))
        return out
    mids = (levels[1:] + levels[:-1]) / 2                       # (K-1,) decision boundaries
    return torch.bucketize(u.contiguous(), mids.to(u.dtype)).to(torch.uint8)


def _weighted_quantiles(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    cdf = torch.cumsum(w, 0)
    cdf = cdf / cdf[-1]
    return x[torch.searchsorted(cdf, q).clamp_(0, len(x) - 1)]


def kmeans_levels(hist: torch.Tensor, bits: int, iters: int = 300) -> torch.Tensor:
    """(2^bits,) sorted levels from weighted 1-D k-means (Lloyd's) over a histogram on [-1, 1].

    hist: (n_bins,) non-negative weights of the bin centers (counts, or Fisher information).
    Starts from the weighted quantiles, so the result is deterministic. A level that loses all
    its weight keeps its place (it is never used). Falls back to uniform levels for an empty
    histogram.
    """
    k = 2 ** check_bits(bits)
    w = hist.double().clamp_min(0)
    if float(w.sum()) <= 0:
        return uniform_levels(bits)
    x = bin_centers(len(hist)).double()
    c = _weighted_quantiles(x, w, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        c, _ = torch.sort(c)
        assign = torch.bucketize(x, (c[1:] + c[:-1]) / 2)      # (n_bins,) nearest level
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w * x)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), c)
        if torch.allclose(new, c, atol=1e-9, rtol=0):
            break
        c = new
    return torch.sort(c)[0].float()


def qnorm_table(levels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Q-Norm: the dequantization table `a * levels + b` whose output has the mean and standard
    deviation of the original normalized values, both taken over the calibration histogram
    `counts` (n_bins,). Codes are still chosen with `levels`."""
    x = bin_centers(len(counts)).double()
    w = counts.double().clamp_min(0)
    if float(w.sum()) <= 0:
        return levels.clone()
    w = w / w.sum()
    lv = levels.double()
    q = lv[torch.bucketize(x, (lv[1:] + lv[:-1]) / 2)]         # (n_bins,) dequantized bins
    mu, sd = (w * x).sum(), ((w * (x - (w * x).sum()) ** 2).sum()).sqrt()
    mu_q, sd_q = (w * q).sum(), ((w * (q - (w * q).sum()) ** 2).sum()).sqrt()
    a = sd / sd_q if float(sd_q) > 0 else torch.tensor(1.0, dtype=torch.float64)
    return (a * (lv - mu_q) + mu).float()
