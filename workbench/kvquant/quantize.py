"""Reference quantizers: normalize, split off outliers, round to levels, pack; and back.

One layer's keys or values, x of shape (batch, kv_heads, seq, head_dim), become a `Quantized`:

    codes    (B, H, S, bits, D/8) uint8    bit-packed level indices (see `packing`)
    zero     per-token (B, H, S) | per-group (B, H, S/G, D) fp16 | None (calibrated per channel)
    scale    same shape as zero
    outlier_index (n,) int32     token-major flat index ((s * B + b) * H + h) * D + d
    outlier_delta (n,) fp16      x - dequant(code) at those elements: dense + sparse = x

With `spec.value_rotation == "hadamard"` values are quantized as x @ H (H the orthonormal
Hadamard matrix, `kernels.hadamard`): codes, ranges and outliers live in that basis, and
`dequantize` multiplies by H again (H @ H = I).

Normalization (KVQuant): u = (x - zero) / scale with zero = (hi + lo) / 2, scale = (hi - lo) / 2,
so the inlier range [lo, hi] maps to [-1, 1]. Elements outside [lo, hi] (calibrated keys: by
more than RANGE_TOLERANCE of the half-range) are the outliers (kept in
the sparse part); the dense part rounds clamp(u, -1, 1) to the nearest level. The first
`sink_tokens` positions are kept exact the same way (all of their elements are "outliers").

Ranges: keys per channel from calibration (`tables.key_lo/key_hi`, (H, D)), per channel online
per group of G tokens (KIVI-like), or per token; values per token. Per-token outliers are the
round(f / 2 * H * D) largest and smallest elements of the token over all KV heads, then each
(token, head) takes the range of its remaining elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.hadamard import hadamard
from kernels.kvquant_pack import RANGE_TOLERANCE, round_with_feedback
from workbench.errors import WorkbenchError
from workbench.kvquant.levels import lookup_levels, round_to_levels
from workbench.kvquant.methods import QuantSpec
from workbench.kvquant.packing import pack_codes, unpack_codes


@dataclass
class LayerTables:
    """What quantizing one layer needs besides the data (from calibration, or defaults)."""

    key_levels: torch.Tensor            # (2^b,) or per KV head (H, 2^b): sorted levels used
    #                                     for rounding keys
    key_table: torch.Tensor             # same shape: dequantization table (Q-Norm may shift it)
    value_levels: torch.Tensor
    value_table: torch.Tensor
    key_lo: torch.Tensor | None = None  # (H, D) calibrated per-channel key range, or None
    key_hi: torch.Tensor | None = None
    value_tails: tuple[int, int] | None = None  # per-token value outliers (smallest, largest)
    #                                            allocated by calibration; None: f/2 per tail
    key_feedback: torch.Tensor | None = None    # (H, D, D) upper Cholesky factor of the damped
    #                                            inverse Fisher matrix of the keys (key_rounding
    #                                            "feedback"), or None

    def feedback_for(self, spec: QuantSpec) -> torch.Tensor | None:
        """The key feedback factor when `spec` rounds keys with feedback, else None."""
        if spec.key_rounding != "feedback":
            return None
        if self.key_feedback is None:
            raise WorkbenchError("key_rounding='feedback' needs the keys' Fisher matrices from "
                                 "a calibration (tables.key_feedback is None).")
        return self.key_feedback

    def to(self, device) -> LayerTables:
        """The same tables with every tensor on `device` (a cache on a GPU)."""
        def move(t):
            return t.to(device) if isinstance(t, torch.Tensor) else t
        return LayerTables(**{k: move(v) for k, v in self.__dict__.items()})


@dataclass
class Quantized:
    """Packed codes, ranges and sparse outliers of one layer's keys or values (module doc)."""

    codes: torch.Tensor
    zero: torch.Tensor | None
    scale: torch.Tensor | None
    outlier_index: torch.Tensor
    outlier_delta: torch.Tensor
    batch: int
    heads: int
    head_dim: int

    @property
    def seq_len(self) -> int:
        return self.codes.shape[2]

    def nbytes(self) -> int:
        """Bytes of every tensor held."""
        ts = (self.codes, self.zero, self.scale, self.outlier_index, self.outlier_delta)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def append(self, other: Quantized) -> Quantized:
        """This followed by `other` (later tokens) along the sequence."""
        def cat(a, b):
            return None if a is None else torch.cat([a, b], dim=2)
        return Quantized(torch.cat([self.codes, other.codes], 2), cat(self.zero, other.zero),
                         cat(self.scale, other.scale),
                         torch.cat([self.outlier_index, other.outlier_index]),
                         torch.cat([self.outlier_delta, other.outlier_delta]),
                         self.batch, self.heads, self.head_dim)

    def select_batch(self, index: torch.Tensor) -> Quantized:
        """Keep batch rows `index` (beam search, batch selection)."""
        b, h, d = self.batch, self.heads, self.head_dim
        idx = self.outlier_index.long()
        s, rest = idx // (b * h * d), idx % (b * h * d)
        ob, rest2 = rest // (h * d), rest % (h * d)
        new_b = len(index)
        parts_i, parts_d = [], []
        for new, old in enumerate(index.tolist()):  # a row may be picked more than once
            keep = ob == old
            parts_i.append((s[keep] * new_b + new) * h * d + rest2[keep])
            parts_d.append(self.outlier_delta[keep])
        def pick(t):
            return None if t is None or t.dim() < 3 else t[index]
        return Quantized(self.codes[index], pick(self.zero), pick(self.scale),
                         torch.cat(parts_i).to(torch.int32), torch.cat(parts_d), new_b, h, d)


def rotates(spec: QuantSpec, kind: str) -> bool:
    """True when `kind` ("k" | "v") is stored in the Hadamard basis (rotated values)."""
    return kind == "v" and spec.value_rotation == "hadamard"


def token_tails(fraction: float, heads: int, head_dim: int) -> int:
    """Outliers per tail of each token's values: round(f/2 * H * D), at least 1 (0 for f = 0)."""
    return max(1, round(fraction / 2 * heads * head_dim)) if fraction > 0 else 0


def _token_ranges(x: torch.Tensor, fraction: float, tails: tuple[int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ranges. x (B, H, n, D) -> lo, hi (B, H, n) of the inliers, outliers (B, H, n, D)
    bool: the k largest and k smallest of each token over all heads, k = round(f/2 * H * D), or
    the tails[0] smallest and tails[1] largest when `tails` is given (calibrated allocation)."""
    b, h, n, d = x.shape
    out = torch.zeros_like(x, dtype=torch.bool)
    if tails is None:
        k = token_tails(fraction, h, d)
        tails = (k, k)
    if fraction > 0 and max(tails) > 0:
        flat = x.permute(0, 2, 1, 3).reshape(b, n, h * d)              # (B, n, H*D)
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if tails[1]:
            mask.scatter_(-1, flat.topk(tails[1], dim=-1).indices, True)
        if tails[0]:
            mask.scatter_(-1, (-flat).topk(tails[0], dim=-1).indices, True)
        out = mask.view(b, n, h, d).permute(0, 2, 1, 3)                 # (B, H, n, D)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    lo = torch.where(out, inf, x).amin(-1)
    hi = torch.where(out, -inf, x).amax(-1)
    lo, hi = torch.where(torch.isfinite(lo), lo, 0), torch.where(torch.isfinite(hi), hi, 0)
    return lo, hi, out


def _group_ranges(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ranges over groups of `group` tokens: x (B, H, n, D), n % group == 0 ->
    lo, hi (B, H, n / group, D)."""
    b, h, n, d = x.shape
    if n % group:
        raise WorkbenchError(f"Online per-channel keys need whole groups of {group} tokens, "
                             f"got {n}.")
    g = x.view(b, h, n // group, group, d)
    return g.amin(3), g.amax(3)


def _expand(t: torch.Tensor, shape, group: int) -> torch.Tensor:
    """Broadcast stored ranges to (B, H, n, D): per token (B,H,n) or per group (B,H,n/G,D)."""
    if t.dim() == 2:                                                   # calibrated (H, D)
        return t[None, :, None, :]
    if t.shape[-1] == shape[-1] and t.dim() == 4:                      # per group
        return t.repeat_interleave(group, dim=2)
    return t[..., None]                                                # per token


def quantize(x: torch.Tensor, spec: QuantSpec, kind: str, tables: LayerTables,
             start: int = 0) -> Quantized:
    """Quantize one layer's keys (kind "k", pre- or post-RoPE as the spec says) or values ("v").

    x: (B, H, n, D) float; `start` is the position of its first token (for sinks and indices).
    """
    b, h, n, d = x.shape
    x = x.float()
    if rotates(spec, kind):                                            # values in Hadamard basis
        x = x @ hadamard(d, x.device)
    frac = spec.key_fraction if kind == "k" else spec.value_fraction
    if kind == "k" and spec.key_axis == "channel" and spec.key_ranges == "calibrated":
        if tables.key_lo is None:
            raise WorkbenchError("Calibrated per-channel keys need key ranges from a calibration "
                                 "(run workbench.kvquant.calibrate first).")
        lo, hi = tables.key_lo.float(), tables.key_hi.float()           # (H, D)
        zero, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-6)
        stored_zero = stored_scale = None
        z, s = zero[None, :, None, :], scale[None, :, None, :]
        outliers = ((x - z).abs() > s * (1 + RANGE_TOLERANCE)) if frac > 0 else None
        group = 1
    else:
        if kind == "k" and spec.key_axis == "channel":                  # KIVI-like, online groups
            group = spec.key_group
            lo, hi = _group_ranges(x, group)                            # (B, H, n/G, D)
            outliers = None
        else:                                                           # per token
            group = 1
            tails = tables.value_tails if kind == "v" else None
            lo, hi, outliers = _token_ranges(x, frac, tails)            # (B, H, n)
        stored_zero = ((hi + lo) / 2).half()
        stored_scale = ((hi - lo) / 2).clamp_min(1e-4).half()
        z = _expand(stored_zero.float(), x.shape, group)
        s = _expand(stored_scale.float(), x.shape, group)
    levels = tables.key_levels if kind == "k" else tables.value_levels
    table = tables.key_table if kind == "k" else tables.value_table
    keep = torch.zeros_like(x, dtype=torch.bool) if outliers is None else outliers.clone()
    n_sink = max(0, min(spec.sink_tokens - start, n))
    if n_sink:
        keep[:, :, :n_sink] = True
    if kind == "k" and spec.key_rounding == "feedback":                 # per channel, calibrated
        def per_head(t):                                                # (B, H, n, D) -> (H, B*n, D)
            return t.expand(b, h, n, d).transpose(0, 1).reshape(h, b * n, d)
        codes, x = round_with_feedback(per_head(x), per_head(z), per_head(s), per_head(keep),
                                       levels, table, tables.feedback_for(spec))
        codes = codes.view(h, b, n, d).transpose(0, 1).to(torch.uint8)  # (B, H, n, D)
        x = x.view(h, b, n, d).transpose(0, 1)                          # error-fed keys
    else:
        u = ((x - z) / s).clamp_(-1.0, 1.0)
        codes = round_to_levels(u, levels.to(x.device))                 # (B, H, n, D) uint8
    deq = lookup_levels(table.to(x.device), codes) * s + z
    bb, hh, ss, dd = keep.nonzero(as_tuple=True)
    index = ((ss + start) * b + bb) * h * d + hh * d + dd
    if index.numel() and int(index.max()) >= 2 ** 31:
        raise WorkbenchError("Too many tokens for the cache's int32 outlier index.")
    delta = (x - deq)[keep].half()
    return Quantized(pack_codes(codes, spec.bits), stored_zero, stored_scale,
                     index.to(torch.int32), delta, b, h, d)


def dequantize(q: Quantized, spec: QuantSpec, kind: str, tables: LayerTables,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B, H, S, D) tensor that `q` stands for: table[codes] * scale + zero + sparse."""
    codes = unpack_codes(q.codes).long()                                # (B, H, S, D)
    table = (tables.key_table if kind == "k" else tables.value_table).to(codes.device)
    if q.zero is None:
        lo, hi = tables.key_lo.float(), tables.key_hi.float()
        z = ((hi + lo) / 2)[None, :, None, :]
        s = ((hi - lo) / 2).clamp_min(1e-6)[None, :, None, :]
    else:
        group = spec.key_group if (kind == "k" and q.zero.dim() == 4) else 1
        z = _expand(q.zero.float(), codes.shape, group)
        s = _expand(q.scale.float(), codes.shape, group)
    out = lookup_levels(table, codes) * s + z
    if q.outlier_index.numel():
        b, h, d = q.batch, q.heads, q.head_dim
        idx = q.outlier_index.long()
        tok, rest = idx // (b * h * d), idx % (b * h * d)
        bi, rest = rest // (h * d), rest % (h * d)
        hi_, di = rest // d, rest % d
        out.index_put_((bi, hi_, tok, di), q.outlier_delta.float(), accumulate=True)
    if rotates(spec, kind):                                            # back from Hadamard basis
        out = out @ hadamard(q.head_dim, out.device)
    return out.to(dtype)
