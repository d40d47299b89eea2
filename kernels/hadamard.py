"""The orthonormal Sylvester-Hadamard matrix, for rotating vectors before quantization.

    H = hadamard(64, device, torch.float32)     # (64, 64), H @ H = I, H = H^T
    v_rot = v @ H                               # spreads each vector's large channels out

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]], scaled by 1/sqrt(n): symmetric and orthogonal, so
it is its own inverse. Rotating a value vector by it before per-token quantization spreads a
few large channels over all of them (QuaRot's observation): the range shrinks relative to the
typical element, so uniform or k-means levels lose less. Attention is linear in the values,
so an output computed from rotated values is rotated back by one more product with H.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError

_CACHE: dict = {}


def hadamard(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(d, d) orthonormal Hadamard matrix; d a power of two. Cached per (d, device, dtype)."""
    if d < 1 or d & (d - 1):
        raise WorkbenchError(f"A Hadamard rotation needs a power-of-two size, got {d}.")
    key = (d, str(device), dtype)
    if key not in _CACHE:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _CACHE[key] = (h / math.sqrt(d)).to(device=device, dtype=dtype)
    return _CACHE[key]
