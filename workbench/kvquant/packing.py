"""Pack b-bit codes into bit planes: exactly b bits per element, in the fused kernel's layout.

Layout, for codes of shape (..., D) with D a multiple of 32: planes (..., bits, D // 8) uint8;
plane j of a vector is D/32 little-endian 32-bit words, word w holding bit j of the codes of
channels [16w, 16w + 16) and their RoPE partners [D/2 + 16w, D/2 + 16w + 16), arranged so that
the decode kernel turns three plane words into byte-permute selectors with a rotate and a mask
per plane and lane (`kernels.kvquant_layout` has the bit map and the reasons). Each vector's
planes are contiguous (bits * D / 8 bytes); the same layout serves 2, 3 and 4 bits. This module
re-exports the one definition in `kernels.kvquant_layout`, which the Triton pack and decode
kernels and the cache share.
"""

from __future__ import annotations

from kernels.kvquant_layout import pack_codes, unpack_codes

__all__ = ["pack_codes", "unpack_codes"]
