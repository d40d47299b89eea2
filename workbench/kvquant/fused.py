"""Glue between the KVQuant cache and the fused decode kernel (`kernels/kvquant_decode.py`).

    packed = pack_layer(cache.layers[i])        # the kernel's view of one cached layer
    out = kvquant_decode_attention(q, packed)   # q (B, Hq, D) post-RoPE, one token

`pack_layer` reuses the layer's packed codes and ranges as they are and only re-sorts the sparse
outliers into the kernel's block-CSR (int16 index + fp16 delta per entry; key entries by token
and value entries by channel within a block). `GrowingPack` keeps that CSR up to date while a
cache grows (what `fused_decode` reads each decode step). `random_layer` builds a
packed layer from random tensors of a given shape, for kernel tests and speed runs (accuracy is
measured with the real model, in `evaluate`).
"""

from __future__ import annotations

import dataclasses

import torch

from kernels.kvquant_decode import BLOCK_N, PackedKV, block_csr, csr_entries
from workbench.errors import WorkbenchError
from workbench.kvquant.levels import nf_levels
from workbench.kvquant.methods import QuantSpec, method
from workbench.kvquant.quantize import LayerTables, Quantized, quantize, rotates


def pack(qk: Quantized, qv: Quantized, tables: LayerTables, inv_freq: torch.Tensor,
         rope_scale: float = 1.0, block: int = BLOCK_N, csr=None,
         v_hadamard: bool = False) -> PackedKV:
    """A `PackedKV` from quantized pre-RoPE keys (calibrated per-channel ranges) and values;
    `block` tokens per block of the sparse part (the kernel's tile: 64, or 32). csr: the
    sparse part's (key, value) block-CSR when already built (`GrowingPack`). v_hadamard: the
    values were quantized in the Hadamard basis (`value_rotation="hadamard"`)."""
    if qk.zero is not None or tables.key_lo is None:
        raise WorkbenchError("The fused kernel takes pre-RoPE keys with calibrated per-channel "
                             "ranges (KVQuant's nuq methods), not per-token or grouped keys.")
    b, h, s, d = qk.batch, qk.heads, qk.seq_len, qk.head_dim
    lo, hi = tables.key_lo.float(), tables.key_hi.float()
    dev = qk.codes.device
    if csr is None:
        csr = (block_csr(qk.outlier_index, qk.outlier_delta, b, h, s, d, block,
                         token_offsets=True),
               block_csr(qv.outlier_index, qv.outlier_delta, b, h, s, d, block,
                         by_channel=True))
    k_csr, v_csr = csr
    return PackedKV(
        qk.codes, ((hi + lo) / 2).to(dev), ((hi - lo) / 2).clamp_min(1e-6).to(dev),
        tables.key_table.float().to(dev),
        qv.codes, qv.zero, qv.scale, tables.value_table.float().to(dev),
        *k_csr[:3], *v_csr, inv_freq.float().to(dev), float(rope_scale), block,
        k_tok=k_csr[3], v_hadamard=bool(v_hadamard))


class GrowingPack:
    """The sparse part of a growing KVQuant layer in the kernel's block-CSR, kept up to date as
    tokens arrive: blocks that are full are sorted once and frozen (the CSR is block-major, so
    they only append), and only the open last block is re-sorted per call. Feed it every
    appended chunk (`add`); `packed(qk, qv)` is then `pack(qk, qv, ...)` without re-sorting the
    whole cache's outliers each decode step."""

    def __init__(self, tables: LayerTables, inv_freq: torch.Tensor, rope_scale: float = 1.0,
                 block: int = BLOCK_N, v_hadamard: bool = False):
        self.tables, self.inv_freq, self.rope_scale, self.block = (tables, inv_freq,
                                                                   rope_scale, block)
        self.v_hadamard = v_hadamard
        self.frozen_blocks = 0
        self.frozen: list | None = None             # [key csr, value csr] of the full blocks
        self.pending: list | None = None            # [(index, delta) keys, values], later tokens
        self.last: PackedKV | None = None           # its ranges and tables are reused

    def add(self, qk: Quantized, qv: Quantized) -> None:
        """Record the outliers of newly appended tokens (or of a whole layer, at the start)."""
        new = [(qk.outlier_index, qk.outlier_delta), (qv.outlier_index, qv.outlier_delta)]
        if self.pending is None:
            self.pending = new
        else:
            self.pending = [(torch.cat([i0, i1]), torch.cat([d0, d1]))
                            for (i0, d0), (i1, d1) in zip(self.pending, new, strict=True)]

    def _csr(self, entries, t0: int, n_tok: int, shape, keys: bool):
        """Block-CSR of `entries` (flat token-major index, delta) for tokens [t0, t0 + n_tok)."""
        b, h, d = shape
        index, delta = entries
        local = index.long() - t0 * b * h * d
        return block_csr(local, delta, b, h, n_tok, d, self.block, token_offsets=keys,
                         by_channel=not keys)

    @staticmethod
    def _cat(first, second):
        """Two block-CSRs of consecutive token ranges -> one (ptr offsets shifted)."""
        if first is None:
            return second
        ptr = torch.cat([first[0][:-1], second[0] + first[0][-1]])
        return (ptr, *(torch.cat([a, b]) for a, b in zip(first[1:], second[1:], strict=True)))

    def packed(self, qk: Quantized, qv: Quantized) -> PackedKV:
        """The kernel's `PackedKV` of the layer whose chunks were added: qk, qv its whole
        quantized keys and values (codes and ranges are used as they are)."""
        b, h, s, d = qk.batch, qk.heads, qk.seq_len, qk.head_dim
        shape, blk = (b, h, d), self.block
        full = s // blk
        csr = []
        for kind, keys in ((0, True), (1, False)):
            index, delta = self.pending[kind]
            tok = index.long() // (b * h * d)
            if full > self.frozen_blocks:                     # freeze the blocks now full
                done = tok < full * blk
                t0 = self.frozen_blocks * blk
                part = self._csr((index[done], delta[done]), t0, full * blk - t0, shape, keys)
                if self.frozen is None:
                    self.frozen = [None, None]
                self.frozen[kind] = self._cat(self.frozen[kind], part)
                index, delta, tok = index[~done], delta[~done], tok[~done]
                self.pending[kind] = (index, delta)
            tail = self._csr((index, delta), full * blk, s - full * blk, shape, keys) \
                if s > full * blk else None
            head = self.frozen[kind] if self.frozen is not None else None
            both = self._cat(head, tail) if tail is not None else head
            if both is None:                                  # no tokens yet
                both = self._csr((index, delta), 0, 0, shape, keys)
            csr.append(both)
        self.frozen_blocks = full
        (k_ptr, k_idx, k_val, k_tok), (v_ptr, v_idx, v_val) = csr
        if self.last is None:        # the per-layer constants once: ranges, tables, inv_freq
            self.last = pack(qk, qv, self.tables, self.inv_freq, self.rope_scale, blk,
                             csr=tuple(csr), v_hadamard=self.v_hadamard)
        else:
            self.last = dataclasses.replace(
                self.last, k_planes=qk.codes, v_planes=qv.codes, v_zero=qv.zero,
                v_scale=qv.scale, k_ptr=k_ptr, k_idx=k_idx, k_val=k_val, k_tok=k_tok,
                v_ptr=v_ptr, v_idx=v_idx, v_val=v_val)
        return self.last


def _csr_to_flat(ptr, idx, val, p: PackedKV):
    b, h, s, d, _ = p.shape
    bh, t, ch = csr_entries(ptr, idx, b * h, d, p.block)
    return ((t * b + bh // h) * h + bh % h) * d + ch, val


def reblock(p: PackedKV, block: int) -> PackedKV:
    """The same packed layer with its sparse part in blocks of `block` tokens (the kernel's
    tile size follows the block)."""
    b, h, s, d, _ = p.shape
    k = block_csr(*_csr_to_flat(p.k_ptr, p.k_idx, p.k_val, p), b, h, s, d, block,
                  token_offsets=True)
    v = block_csr(*_csr_to_flat(p.v_ptr, p.v_idx, p.v_val, p), b, h, s, d, block,
                  by_channel=True)
    return dataclasses.replace(p, k_ptr=k[0], k_idx=k[1], k_val=k[2], k_tok=k[3],
                               v_ptr=v[0], v_idx=v[1], v_val=v[2], block=block)


def pack_layer(layer) -> PackedKV:
    """The kernel's view of one `KVQuantLayer` (pre-RoPE nuq methods; no pending tokens)."""
    spec: QuantSpec = layer.spec
    if spec.is_fp16 or not spec.pre_rope or layer.qk is None:
        raise WorkbenchError("pack_layer needs a filled KVQuant layer with pre-RoPE keys.")
    rot = layer.rotary.module
    return pack(layer.qk, layer.qv, layer.tables, rot.inv_freq,
                float(getattr(rot, "attention_scaling", 1.0)),
                v_hadamard=rotates(spec, "v"))


def random_layer(batch: int, kv_heads: int, seq: int, head_dim: int, bits: int = 3,
                 outlier_fraction: float = 0.01, sink_tokens: int = 1, *, device="cpu",
                 generator: torch.Generator | None = None, theta: float = 10000.0,
                 block: int = BLOCK_N, levels_per: str = "layer",
                 value_rotation: str = "none") -> PackedKV:
    """A packed layer quantized from random keys/values with a few large channels (for kernel
    tests and timing only). Key ranges are the data's per-channel quantiles. Level tables: NF
    levels, one per KV head with a random stretch each (`levels_per="head"`) or one for the
    layer ("layer"). value_rotation: "hadamard" stores the values in the Hadamard basis."""
    gen = generator or torch.Generator().manual_seed(0)
    shape = (batch, kv_heads, seq, head_dim)
    chan = torch.ones(head_dim)
    chan[torch.randperm(head_dim, generator=gen)[: max(1, head_dim // 16)]] = 4.0
    k = (torch.randn(shape, generator=gen) * chan).to(device)
    v = torch.randn(shape, generator=gen).to(device)
    spec = method("kvquant", bits, outlier_fraction=outlier_fraction, sink_tokens=sink_tokens,
                  levels="nf", q_norm=False, value_rotation=value_rotation,
                  key_rounding="nearest")                  # no Fisher matrix: nearest codes
    flat = k.permute(1, 3, 0, 2).reshape(kv_heads, head_dim, -1)          # (H, D, B*S)
    m = flat.shape[-1]
    if outlier_fraction > 0:
        j = max(1, int(round(outlier_fraction / 2 * m)))
        lo = flat.kthvalue(j, dim=-1).values
        hi = flat.kthvalue(m - j + 1, dim=-1).values
    else:
        lo, hi = flat.amin(-1), flat.amax(-1)
    lv = nf_levels(bits)
    if levels_per == "head":                   # (H, 2^b): sorted, within [-1, 1], head-specific
        stretch = 0.7 + 0.6 * torch.rand(kv_heads, 1, generator=gen)
        lv = (lv.sign() * lv.abs() ** stretch).sort(-1).values
    lv = lv.to(device)
    tables = LayerTables(lv, lv, lv, lv, lo, hi)
    qk = quantize(k, spec, "k", tables)
    qv = quantize(v, spec, "v", tables)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return pack(qk, qv, tables, inv_freq.to(device), block=block,
                v_hadamard=rotates(spec, "v"))
