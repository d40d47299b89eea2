"""The bit layout of KVQuant's packed codes: b bits per element, laid out for a cheap decode.

Shape, for codes (..., D) with D a multiple of 32: planes (..., bits, D/8) uint8, i.e. bit plane j
of a vector is D/32 little-endian 32-bit words. Word w of every plane covers one group of 32
channels: the 16 channels [16w, 16w + 16) of the first half of the vector and their RoPE partners
[D/2 + 16w, D/2 + 16w + 16). Within a group, slot (l, k) (lane l < 4, k < 8) is channel

    channel(w, l, k) = (l // 2) * D/2 + 16 w + 8 (l % 2) + k

and bit j of its code sits at bit (4k + l + j) mod 32 of plane j's word w. Why: rotating the word
of plane j right by l puts bit j of the codes of lane l at bits 4k + j, so for a lane

    selector = OR_j (rotr(plane_j, l) & (0x11111111 << j))

holds the 8 codes of the lane as nibbles (bit 3 clear): exactly the selector of the PTX byte
permute `prmt.b32`, which looks up 4 codes in a table of 8 bytes per instruction (the decode
kernel does the low and the high bytes of the fp16 levels separately). That is ~25 integer
operations per 32 codes for unpacking, against a shift-and-mask per bit per code for plain
planes. Each vector's planes stay contiguous (bits * D/8 bytes): the same bytes as before,
exactly `bits` bits per element, for 2, 3 and 4 bits.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError


def _shifts(bits: int, device) -> torch.Tensor:
    """(bits, 2, 2, 8) int32: bit position of code bit j of slot (h, l % 2, k) (lane l = 2h + l%2)."""
    j = torch.arange(bits, device=device)[:, None, None, None]
    h = torch.arange(2, device=device)[None, :, None, None]
    l1 = torch.arange(2, device=device)[None, None, :, None]
    k = torch.arange(8, device=device)[None, None, None, :]
    return ((4 * k + 2 * h + l1 + j) % 32).to(torch.int32)


def _check_dim(d: int) -> None:
    if d % 32:
        raise WorkbenchError(f"The packed code layout needs head_dim a multiple of 32, got {d}.")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., D) integers < 2**bits -> planes (..., bits, D // 8) uint8 (module docstring)."""
    d = codes.shape[-1]
    _check_dim(d)
    ng = d // 32
    lead = codes.shape[:-1]
    c = codes.to(torch.int32).reshape(*lead, 2, ng, 2, 8)                 # (.., h, w, l%2, k)
    sh = _shifts(bits, codes.device)                                      # (bits, h, l%2, k)
    words = []
    for j in range(bits):
        b = ((c >> j) & 1) << sh[j][:, None]                              # (.., h, w, l%2, k)
        words.append(b.sum(dim=(-4, -2, -1), dtype=torch.int32)
                     if b.numel() else b.new_zeros(*lead, ng))            # disjoint bits: sum = or
    w = torch.stack(words, dim=-2).contiguous()                           # (..., bits, ng) int32
    return w.view(torch.uint8).reshape(*lead, bits, d // 8)


def unpack_codes(planes: torch.Tensor) -> torch.Tensor:
    """planes (..., bits, D // 8) uint8 -> codes (..., D) uint8 (the inverse of `pack_codes`)."""
    bits, nbytes = planes.shape[-2:]
    d = nbytes * 8
    _check_dim(d)
    ng = d // 32
    lead = planes.shape[:-2]
    w = planes.contiguous().view(torch.int32).reshape(*lead, bits, 1, ng, 1, 1)
    sh = _shifts(bits, planes.device)                                     # (bits, h, l%2, k)
    codes = torch.zeros(*lead, 2, ng, 2, 8, dtype=torch.int32, device=planes.device)
    for j in range(bits):
        codes |= ((w[..., j, :, :, :, :] >> sh[j][:, None]) & 1) << j
    return codes.reshape(*lead, d).to(torch.uint8)


def lookup_levels(table: torch.Tensor, codes: torch.Tensor, head_dim: int = 1) -> torch.Tensor:
    """table[codes]: `table` (K,) for every element, or (H, K) with heads along `codes`'s dim
    `head_dim` (per-head level tables). codes: integer tensor of any shape."""
    if table.dim() == 1:
        return table[codes.long()]
    shape = [1] * codes.dim()
    shape[head_dim] = table.shape[0]
    heads = torch.arange(table.shape[0], device=codes.device).view(shape)
    return table[heads, codes.long()]
