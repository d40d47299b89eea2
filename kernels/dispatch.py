"""How a public kernel op picks its implementation: the Triton kernel or the PyTorch reference.

Every op in `kernels/` takes `backend="auto" | "triton" | "torch"` and asks `pick_backend` which
one to run. The rules, in order:

- ``"torch"``: always the PyTorch reference (the readable teaching path), on any device.
- ``"triton"``: the Triton kernel. On CUDA tensors it compiles for the GPU. On CPU tensors it
  runs only in Triton's interpreter, which is chosen when the kernel is *defined*: set
  ``TRITON_INTERPRET=1`` in the environment before Python imports `kernels` (``make test``
  does). Otherwise, and when triton is not installed or the dtype is not supported, it raises
  one clear `WorkbenchError` that says what to do.
- ``"auto"`` (the default): Triton on CUDA tensors, the reference on CPU tensors (also under
  ``TRITON_INTERPRET=1``: the interpreter is for testing kernels, far too slow for notebooks and
  evaluations, so it runs only when ``"triton"`` is asked for). Where Triton cannot run (not
  installed, an unsupported dtype, another device such as MPS) it quietly uses the reference,
  which computes the same function.

Importing this module never fails: triton is imported under a guard, and `triton`/`tl` are None
when it is missing. A kernel module defines its `@triton.jit` functions under ``if HAS_TRITON:``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from workbench.errors import WorkbenchError

try:  # a machine without triton still imports every kernel module and runs the references
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _TRITON_IMPORT_ERROR = ""
except Exception as error:  # ImportError, or a broken install that fails while loading
    triton = None
    tl = None
    HAS_TRITON = False
    _TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

BACKENDS = ("auto", "triton", "torch")
_TRUE = {"1", "true", "on", "yes"}


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET is set to a true value in the environment now."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def pick_backend(
    backend: str,
    tensors: Iterable[torch.Tensor | None],
    kernel=None,
    *,
    op: str = "this op",
    supported_dtypes: tuple[torch.dtype, ...] | None = None,
) -> str:
    """Return "triton" or "torch" for `op` on `tensors` by the rules in the module docstring.

    `kernel` is the op's `@triton.jit` function (None when triton is missing); `tensors` may hold
    None (absent optional buffers); `supported_dtypes` lists the floating dtypes the kernel
    accepts (None: any). Called on every op call, so the common path is a few checks.
    """
    if backend == "torch":
        return "torch"
    if backend not in BACKENDS:
        raise WorkbenchError(f"{op}: backend must be one of {BACKENDS}, not {backend!r}.")
    devices, bad_dtypes = set(), set()
    for t in tensors:
        if t is not None:
            devices.add(t.device.type)
            if (supported_dtypes is not None and t.dtype not in supported_dtypes
                    and t.is_floating_point()):
                bad_dtypes.add(str(t.dtype).replace("torch.", ""))
    if len(devices) > 1:
        raise WorkbenchError(f"{op}: all tensors must be on one device, got {sorted(devices)}. "
                             "Move them with .to(device) first.")
    device = devices.pop() if devices else "cpu"

    # Why Triton cannot run here, or "" when it can.
    if not HAS_TRITON or kernel is None:
        reason = ("triton is not installed (or failed to import: "
                  f"{_TRITON_IMPORT_ERROR or 'no kernel defined'}). Install it with "
                  "`pip install triton`, or use backend='torch'.")
    elif bad_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in supported_dtypes)
        reason = (f"the Triton kernel takes {names}, not {', '.join(sorted(bad_dtypes))}. "
                  "Cast the inputs, or use backend='torch'.")
    elif device == "cuda" or is_interpreted(kernel):
        reason = ""
    elif device == "cpu":
        late = (" TRITON_INTERPRET is set now, but was not when `kernels` was imported."
                if interpreter_requested() else "")
        reason = ("Triton runs on CPU tensors only in its interpreter, which is chosen when the "
                  "kernel is defined: start Python with TRITON_INTERPRET=1 in the environment "
                  f"(e.g. `TRITON_INTERPRET=1 python ...`, as `make test` does).{late} "
                  "Or move the tensors to a CUDA device, or use backend='torch'.")
    else:
        reason = f"there is no Triton backend here for {device!r} tensors; use backend='torch'."

    if backend == "triton" and reason:
        raise WorkbenchError(f"{op}: backend='triton' was asked for, but {reason}")
    if reason or (backend == "auto" and device != "cuda"):  # interpreter only when named
        return "torch"
    return "triton"
