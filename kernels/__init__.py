"""Triton kernels with their PyTorch references, behind one function per op.

Each op takes `backend="auto" | "triton" | "torch"` (rules in `kernels.dispatch`): the Triton
kernel on CUDA tensors, the readable PyTorch reference on CPU tensors, and the kernel in Triton's
interpreter on CPU when TRITON_INTERPRET=1 was set before import. Importing never needs a GPU,
nor triton itself.
"""

from kernels.dispatch import HAS_TRITON, pick_backend
from kernels.lse_merge import merge_attention_partials, merge_attention_partials_reference

__all__ = [
    "HAS_TRITON",
    "merge_attention_partials",
    "merge_attention_partials_reference",
    "pick_backend",
]
