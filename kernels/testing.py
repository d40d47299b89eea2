"""Helpers to test a kernel against its reference: fresh random inputs, a tolerance that is not a
magic number, and poisoned outputs.

The tolerance rule is flash-attention's. Run the reference on the inputs upcast to float64: that
is the truth. Run the reference again on the inputs as given (PyTorch in the same low precision):
its distance from the truth is what that precision costs anyway. The kernel passes when

    max|kernel - truth| <= factor * max|torch_low - truth| + atol        (factor 2 by default)

for every output, where `atol` is a small absolute floor for outputs that PyTorch happens to get
exactly right. Infinities must match exactly, and a NaN passes only where the truth is NaN.

One allowance: Triton's CPU interpreter converts float32 to bfloat16 by truncation, not by
rounding to nearest as the GPU does (`cast_impl` in triton/runtime/interpreter.py), which adds up
to one bfloat16 ulp. So under TRITON_INTERPRET=1 a bfloat16 output may also differ from the truth
by one ulp of the truth value; on a GPU the rule is exactly the one above.

Poisoning: fill an output buffer with NaN (integers: their minimum value) before the kernel runs,
so an element the kernel forgot to write shows up as NaN instead of as a plausible stale value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def fresh_seed() -> int:
    """A new random seed for each check (print it on failure so the case can be replayed)."""
    return int.from_bytes(os.urandom(4), "little")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill `t` in place with NaN (floats) or the dtype's minimum (integers); returns `t`."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).min)


def poisoned_empty(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """torch.empty(shape), poisoned: every element the kernel does not write stays NaN."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return poison_(torch.empty(shape, dtype=dtype, device=device))


def assert_all_written(t: torch.Tensor, name: str = "output") -> None:
    """Fail if any element of a poisoned float buffer is still NaN."""
    if t.is_floating_point():
        unwritten = torch.isnan(t)
        if unwritten.any():
            first = tuple(int(i) for i in unwritten.nonzero()[0])
            raise AssertionError(f"{name}: {int(unwritten.sum())} of {t.numel()} elements were "
                                 f"not written (still NaN), first at index {first}")


@dataclass
class ErrorReport:
    """Errors of one output against the float64 truth."""

    name: str
    max_err: float           # max |kernel - truth| over finite truth values
    rel_err: float           # ||kernel - truth|| / ||truth|| (2-norm, finite values)
    torch_max_err: float     # max |torch_low - truth|: what the low precision costs PyTorch
    torch_rel_err: float
    bound: float             # factor * torch_max_err + atol
    mismatch: str            # "" or why the non-finite values disagree
    checked_err: float = -1.0  # max_err less the interpreter's bf16 slack (-1: same as max_err)

    @property
    def passed(self) -> bool:
        err = self.max_err if self.checked_err < 0 else self.checked_err
        return not self.mismatch and err <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        extra = f" [{self.mismatch}]" if self.mismatch else ""
        if 0 <= self.checked_err < self.max_err:
            extra += f" [{self.checked_err:.3g} beyond the interpreter's bf16 truncation]"
        return (f"{self.name}: max err {self.max_err:.3g} (bound {self.bound:.3g}; torch "
                f"{self.torch_max_err:.3g}), rel err {self.rel_err:.3g} (torch "
                f"{self.torch_rel_err:.3g}) {verdict}{extra}")


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _upcast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` numbers at |x| (float64 tensor of x's shape)."""
    info = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps


def _interpreter_slack(got: torch.Tensor, truth: torch.Tensor) -> torch.Tensor | float:
    from kernels.dispatch import interpreter_requested

    if got.dtype == torch.bfloat16 and interpreter_requested():
        return ulp(torch.nan_to_num(truth, posinf=0.0, neginf=0.0), torch.bfloat16)
    return 0.0


def _errors(got: torch.Tensor, truth: torch.Tensor, slack=0.0):
    """(max |got - truth|, max (|got - truth| - slack), relative 2-norm error, why non-finite
    values disagree), over the finite truth values."""
    got, truth = got.double(), truth.double()
    finite = torch.isfinite(truth)
    mismatch = ""
    nan_bad = torch.isnan(got) & ~torch.isnan(truth)
    inf_bad = torch.isinf(truth) & (got != truth)
    if nan_bad.any():
        mismatch = f"{int(nan_bad.sum())} NaN where the truth is not NaN"
    elif inf_bad.any():
        mismatch = f"{int(inf_bad.sum())} infinities that differ"
    elif (torch.isinf(got) & finite).any():
        mismatch = "infinite where the truth is finite"
    diff = (got - truth)[finite]
    if diff.numel() == 0:
        return 0.0, 0.0, 0.0, mismatch
    if isinstance(slack, torch.Tensor):
        slack = slack.to(diff.device)[finite]
    max_err = float(diff.abs().max())
    excess = float((diff.abs() - slack).clamp_min(0).max())
    ref_norm = float(truth[finite].norm())
    rel_err = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    return max_err, excess, rel_err, mismatch


def compare_to_reference(
    kernel_fn: Callable,
    reference_fn: Callable,
    inputs: Sequence,
    *,
    factor: float = 2.0,
    atol: float = 1e-6,
    names: Sequence[str] | None = None,
    kernel_out=None,
) -> list[ErrorReport]:
    """Compare `kernel_fn(*inputs)` with `reference_fn` by the rule in the module docstring.

    `reference_fn` must compute in the precision of its inputs (so float64 inputs give the
    truth). `kernel_out` is the kernel's result if it was already computed (e.g. into poisoned
    buffers). Returns one `ErrorReport` per output; nothing is asserted.
    """
    got = _as_tuple(kernel_out if kernel_out is not None else kernel_fn(*inputs))
    low = _as_tuple(reference_fn(*inputs))
    truth = _as_tuple(reference_fn(*[_upcast(x) for x in inputs]))
    names = list(names) if names is not None else [f"output {i}" for i in range(len(truth))]
    reports = []
    for name, g, lo, t in zip(names, got, low, truth, strict=True):
        if tuple(g.shape) != tuple(t.shape):
            raise AssertionError(f"{name}: shape {tuple(g.shape)}, expected {tuple(t.shape)}")
        max_err, excess, rel_err, mismatch = _errors(g, t, _interpreter_slack(g, t))
        t_max, _, t_rel, _ = _errors(lo, t)
        reports.append(ErrorReport(name, max_err, rel_err, t_max, t_rel,
                                   factor * t_max + atol, mismatch, excess))
    return reports


def assert_matches_reference(kernel_fn, reference_fn, inputs, *, context: str = "",
                             **kwargs) -> list[ErrorReport]:
    """`compare_to_reference`, then fail with every report (and `context`, e.g. the seed)."""
    reports = compare_to_reference(kernel_fn, reference_fn, inputs, **kwargs)
    if not all(r.passed for r in reports):
        lines = "\n  ".join(str(r) for r in reports)
        raise AssertionError(f"kernel does not match its reference {context}\n  {lines}")
    return reports


TEST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_triton(kernel):
    """A pytest skip mark for tests that run `kernel` through Triton: skipped when triton is
    missing, or on CPU when the kernel was not defined under TRITON_INTERPRET=1."""
    import pytest

    from kernels.dispatch import HAS_TRITON, is_interpreted

    return pytest.mark.skipif(
        not HAS_TRITON or (TEST_DEVICE == "cpu" and not is_interpreted(kernel)),
        reason="needs triton, and on CPU TRITON_INTERPRET=1 set before triton was imported")
