"""Pack b-bit codes into bit planes: b bytes per 8 codes, exactly b bits per element.

Layout, for codes of shape (..., D) with D a multiple of 8:

    planes (..., bits, D // 8) uint8     planes[..., j, i] bit t = bit j of code[..., 8 * i + t]

Each vector's planes are contiguous (bits * D / 8 bytes), so a kernel reads one token of one
head as one short row and rebuilds code = sum_j ((planes[j, d // 8] >> (d % 8)) & 1) << j with
shifts only. The same layout serves 2, 3 and 4 bits (3-bit codes need no straddling of bytes).
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

_SHIFTS = torch.arange(8, dtype=torch.uint8)                    # bit t within a byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., D) uint8 < 2**bits -> planes (..., bits, D // 8) uint8."""
    d = codes.shape[-1]
    if d % 8:
        raise WorkbenchError(f"Packing needs the last dim to be a multiple of 8, got {d}.")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], d // 8, 8)        # (..., D/8, 8)
    shifts = _SHIFTS.to(codes.device)
    planes = [(((c >> j) & 1) << shifts).sum(-1, dtype=torch.uint8) for j in range(bits)]
    return torch.stack(planes, dim=-2)                                     # (..., bits, D/8)


def unpack_codes(planes: torch.Tensor) -> torch.Tensor:
    """planes (..., bits, D // 8) uint8 -> codes (..., D) uint8 (the inverse of `pack_codes`)."""
    bits, nbytes = planes.shape[-2:]
    shifts = _SHIFTS.to(planes.device)
    bitvals = (planes[..., None] >> shifts) & 1                            # (..., bits, D/8, 8)
    weights = (1 << torch.arange(bits, dtype=torch.uint8, device=planes.device))
    codes = (bitvals * weights[:, None, None]).sum(-3, dtype=torch.uint8)  # (..., D/8, 8)
    return codes.reshape(*planes.shape[:-2], nbytes * 8)
