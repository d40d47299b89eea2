"""Measure the machine you are on: the ceilings a roofline should use next to datasheet ones.

    chip = measure_this_machine()          # CPU here (a few seconds); CUDA GPU when present
    chip.bandwidth, chip.flops_for(16), chip.op_latency, chip.extra

Measured, with the dtype the workbench runs models in (fp32 on CPU, bf16 on GPU):
- copy bandwidth: one large tensor copied, bytes read + written (METHOD.md's ceiling);
- per-op latency and streaming bandwidth: matrix-vector products over a row of distinct weight
  matrices (what a decode step is), together far larger than the caches. The latency is the
  time per product at a tiny size (pure overhead: launch, dispatch, thread wake-up); the
  bandwidth is fitted from four larger sizes as time = latency + bytes / bandwidth. On GPU the
  products run back to back in a CUDA graph (as a serving engine replays a decode step);
- matrix rate: the best of a few large square matrix products (fp32 with TF32 off as the
  'vector' fp32 rate).
Timing: on CUDA, triton's do_bench median (L2 cleared between runs); on CPU the fastest of
several repeats (on a CPU shared with other processes the fastest repeat is the least disturbed).
Set OMP_WAIT_POLICY=PASSIVE on a shared CPU (see shared/data.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import date

from workbench.machine import cpu_name
from workbench.roofline.hardware import Chip


def _timer(device: str, reps: int = 7):
    import torch

    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None

        def run(fn):
            if do_bench is not None:
                return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            return sorted(times)[len(times) // 2]
        return run

    def run_cpu(fn):
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best
    return run_cpu


def capture_graph(fn: Callable, warmup: int = 1) -> Callable:
    """Capture `fn()` in a CUDA graph after `warmup` calls on a side stream; returns its replay
    (one launch for the whole call: timing it leaves out the host's launch overhead)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def fit_bandwidth(sizes: list[float], times: list[float], latency: float) -> float:
    """Least-squares bandwidth (byte/s) of time = latency + bytes / bandwidth, latency fixed."""
    return sum(b * b for b in sizes) / sum(b * (t - latency) for b, t in zip(sizes, times,
                                                                            strict=True))


def stream_fit(device: str, dtype, sizes_mb: list[float], total_mb: float, cols: int) -> dict:
    """Matrix-vector products over distinct matrices: per-op latency and streaming bandwidth.

    The latency is the per-product time at a tiny size (4 x cols: nearly pure overhead, less
    its own bytes); the bandwidth is fitted over the larger sizes with that latency held fixed.
    """
    import torch
    import torch.nn.functional as F

    timer = _timer(device)
    x = torch.randn(1, cols, device=device, dtype=dtype)
    sizes, times = [], []
    tiny_mb = 4 * cols * x.element_size() / 2 ** 20
    for mb in [tiny_mb, *sizes_mb]:
        rows = max(1, int(mb * 2 ** 20 / (cols * x.element_size())))
        count = min(256, max(2, int(total_mb // mb)))
        mats = [torch.randn(rows, cols, device=device, dtype=dtype) for _ in range(count)]

        def chain(mats=mats):
            for w in mats:
                F.linear(x, w)

        fn = capture_graph(chain) if device == "cuda" else chain
        times.append(timer(fn) / count)
        sizes.append(rows * cols * x.element_size())
        del mats
    bandwidth = fit_bandwidth(sizes[1:], times[1:], times[0])
    latency = max(0.0, times[0] - sizes[0] / bandwidth)
    bandwidth = fit_bandwidth(sizes[1:], times[1:], latency)
    return {"sizes_bytes": sizes, "seconds_per_matrix": times, "latency_s": latency,
            "bandwidth_Bps": bandwidth}


def _copy_rate(device: str, n_bytes: int) -> float:
    """Copy bandwidth, bytes read + written per second."""
    import torch

    src = torch.randn(n_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _timer(device)(lambda: dst.copy_(src))


def _matmul_rate(device: str, dtype, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _timer(device, reps=5)(lambda: a @ b)


def _total_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return float(torch.cuda.get_device_properties(0).total_memory)
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def measure_this_machine(device: str | None = None) -> Chip:
    """Measure this machine's ceilings and return them as a `Chip` (extra holds the details)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    started = time.perf_counter()
    copy_bps = _copy_rate(device, (1 << 30) if gpu else (1 << 28))
    if gpu:
        stream = stream_fit(device, dtype, [4, 16, 64, 256], 1024, 4096)
        matrix16 = max(_matmul_rate(device, dtype, n) for n in (4096, 8192))
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = _matmul_rate(device, torch.float32, 4096)
        torch.backends.cuda.matmul.allow_tf32 = allow
        name = torch.cuda.get_device_name(0)
    else:
        stream = stream_fit(device, dtype, [1, 4, 16, 64], 256, 1024)
        fp32 = max(_matmul_rate(device, dtype, n) for n in (1024, 1536))
        matrix16 = None
        name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    try:
        load = os.getloadavg()[0]  # other processes competing for the cores (1-minute average)
    except OSError:
        load = None
    extra = {"device": device, "dtype": str(dtype).replace("torch.", ""), "load_average": load,
             "cpu_count": os.cpu_count(),
             "copy_Bps": copy_bps, "stream": stream, "matrix16_flops": matrix16,
             "fp32_flops": fp32, "seconds": round(time.perf_counter() - started, 1),
             "date": date.today().isoformat()}
    return Chip(
        key="this-machine", name=f"this machine ({name})", vendor="", year=date.today().year,
        kind="gpu" if gpu else "cpu", matrix_flops={16: matrix16} if matrix16 else {},
        vector_flops=fp32, memory=_total_memory(device), memory_type="",
        bandwidth=stream["bandwidth_Bps"], op_latency=stream["latency_s"],
        source="measured by workbench.roofline.microbench.measure_this_machine",
        notes="bandwidth and per-op latency from a fit of matrix-vector products over distinct "
              "matrices; copy bandwidth in extra", measured=True, extra=extra)
