"""Compile the Triton kernels for a GPU on a machine without one: catch what the interpreter misses.

Triton's interpreter (TRITON_INTERPRET=1, how CI tests the kernels) runs the kernel body as
NumPy and never builds its IR, so errors of the GPU compiler pass it: a loop-carried variable
whose type changes, a constexpr branch that does not type-check, a shared-memory request over
the limit. This module records the launches an interpreter run makes and compiles each one for
an NVIDIA target (PTX and cubin, with the ptxas that ships in the triton wheel), all on CPU.

    with record_launches() as launches:     # under TRITON_INTERPRET=1
        some_op(..., backend="triton")
    n, failures = compile_launches(launches)  # failures == [] when all compile for sm_90

The compile runs in a subprocess without TRITON_INTERPRET (there `@triton.jit` gives real
JITFunctions): tensor arguments travel as one-element tensors of their dtype (the compiler sees
only the dtype and the pointer's 16-byte alignment), scalars and constexprs as they are.
`gpu_variants` adds, for each launch, the constexprs the GPU picks where the interpreter picks
otherwise (`GPU_RULES`: 16-bit dots on tensor cores instead of the interpreter's float32, the
KVQuant decode's inline-PTX level lookup) and any extra constexpr sets a caller names per kernel
(launch options that exist only on a GPU, such as L2 prefetches). Block sizes stay the
interpreter's (larger or smaller than the GPU's): the check is for what fails to compile, not
for resource limits.

`python -m kernels.compile_check FILE` compiles the launches saved in FILE (what the subprocess
runs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from kernels.dispatch import HAS_TRITON


def _tensor_core_dots(kw: dict) -> dict | None:
    return {"FP32_DOT": False} if kw.get("FP32_DOT") else None


def _ptx_level_lookup(kw: dict) -> dict | None:      # kernels.kvquant_decode: bf16 queries, <= 3 bits
    ok = kw.get("HALF_MATH") and kw.get("BITS", 99) <= 3 and not kw.get("USE_ASM")
    return {"USE_ASM": True} if ok else None


GPU_RULES = (_tensor_core_dots, _ptx_level_lookup)   # what a CUDA device picks where the
                                                     # interpreter picks otherwise


@dataclass
class Launch:
    """One kernel launch: where the kernel lives and the arguments it was called with."""

    module: str
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def key(self) -> tuple:
        """Launches with equal keys compile to the same code up to integer specialization
        (Triton also specializes ints equal to 1 and multiples of 16: not worth a compile each
        here): same kernel, tensor dtypes, scalar kinds and constexprs."""
        def sig(x):
            if isinstance(x, torch.Tensor):
                return ("tensor", str(x.dtype))
            if isinstance(x, bool) or x is None or isinstance(x, str):
                return x
            if isinstance(x, int | float):
                return type(x).__name__
            return repr(x)
        return (self.module, self.name, tuple(sig(a) for a in self.args),
                tuple(sorted((k, sig(v)) for k, v in self.kwargs.items())))

    def label(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in sorted(self.kwargs.items())
                           if not isinstance(v, torch.Tensor))
        return f"{self.name}({consts})"


def _portable(x):
    """A launch argument as the compile subprocess gets it (tensors -> 1 element, same dtype)."""
    if isinstance(x, torch.Tensor):
        return torch.empty(1, dtype=x.dtype)
    return x


@contextlib.contextmanager
def record_launches():
    """Record every interpreted Triton launch in the block (list of `Launch`, deduplicated)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[Launch] = []
    seen: set = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        launch = Launch(fn.__module__, fn.__name__, args, kwargs)
        if launch.key() not in seen:
            seen.add(launch.key())
            launches.append(Launch(fn.__module__, fn.__name__,
                                   tuple(_portable(a) for a in args),
                                   {k: _portable(v) for k, v in kwargs.items()}))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def gpu_variants(launches: list[Launch], extra: dict[str, list[dict]] | None = None
                 ) -> list[Launch]:
    """Each launch with what a GPU picks instead (all `GPU_RULES` applied), and with each
    constexpr set extra[kernel name] on top of that; deduplicated."""
    out, seen = [], set()
    for launch in launches:
        gpu = dict(launch.kwargs)
        for rule in GPU_RULES:
            gpu.update(rule(gpu) or {})
        # the recorded constexprs only where no rule changes them (float32 inputs, 4-bit codes):
        # what the interpreter alone picks is run by the other tests already
        sets = [gpu] + [{**gpu, **e} for e in (extra or {}).get(launch.name, [])]
        for kw in sets:
            variant = Launch(launch.module, launch.name, launch.args, kw)
            if variant.key() not in seen:
                seen.add(variant.key())
                out.append(variant)
    return out


def compile_one(launch: Launch, arch: int = 90) -> None:
    """Compile one launch for an NVIDIA GPU of compute capability `arch` (raises on failure).
    Needs real JITFunctions: run where TRITON_INTERPRET is not set."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch.module), launch.name)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                   options=options.__dict__)


def compile_launches(launches: list[Launch], arch: int = 90, timeout: float = 1200.0,
                     extra: dict[str, list[dict]] | None = None) -> tuple[int, list[str]]:
    """Compile every launch and its `gpu_variants` (extra: see there) for sm_`arch` in a
    subprocess without the interpreter. Returns (kernels compiled, one line per failure: the
    launch's label and the compiler's error)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    variants = gpu_variants(launches, extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.pt")
        torch.save([(x.module, x.name, x.args, x.kwargs) for x in variants], path)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        done = subprocess.run([sys.executable, "-m", "kernels.compile_check", path, str(arch)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode not in (0, 1):
        return len(variants), [f"compile subprocess failed ({done.returncode}): "
                               f"{done.stderr[-3000:]}"]
    return len(variants), [line[len("FAILED "):] for line in done.stdout.splitlines()
                           if line.startswith("FAILED ")]


def _try_compile(item: tuple, arch: int) -> str:
    launch = Launch(*item)
    try:
        compile_one(launch, arch)
        return f"ok {launch.label()}"
    except Exception as error:                # report every failure, not only the first
        msg = " ".join(str(error).split())[-600:]
        return f"FAILED {launch.label()}: {type(error).__name__}: {msg}"


def main(argv: list[str]) -> int:
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    path, arch = argv[0], int(argv[1]) if len(argv) > 1 else 90
    items = torch.load(path, weights_only=False)
    workers = max(1, min(len(items), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:     # ptxas and the MLIR passes: one core each
        lines = list(pool.map(partial(_try_compile, arch=arch), items))
    print("\n".join(lines), flush=True)
    return 1 if any(line.startswith("FAILED") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
