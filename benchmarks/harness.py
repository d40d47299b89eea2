"""Benchmark harness: time a callable, turn times into bandwidth, write JSON, print a table.

On CUDA, times come from `triton.testing.do_bench` (CUDA events, warm-up first, median of many
runs; do_bench also clears the L2 cache before every run). When one input set fits in the L2 the
caller can pass several sets and the harness rotates through them, so no run reads data that an
earlier run left in the cache. On CPU, times are wall-clock medians after warm-up.

A result row holds the shape, dtype, the median time in ms, the baseline's time and the speedup
over it, the bytes the op must move (each input read once, each output written once), the
achieved GB/s and its fraction of the measured copy bandwidth, and TFLOP/s when flops are given.
`write_results` adds the device, the torch/triton/transformers versions and the date.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from workbench.roofline.microbench import capture_graph as _capture_graph

RESULTS_DIR = Path(__file__).resolve().parent / "results"
H200_COPY_GBPS = 4250.0  # device-to-device copy measured on the H200 here (read + write), GB/s


def package_version(name: str) -> str | None:
    """Installed version of `name` without importing it (None when it is not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def environment(device: str) -> dict:
    """Device, library versions and date: what a reader needs to trust or redo a number."""
    env = {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if env["device_type"] == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 1e9, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 1e6, 1))
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def l2_bytes(device: str) -> int:
    """The GPU's L2 size in bytes (0 on CPU)."""
    if torch.device(device).type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0))


def input_set_count(bytes_per_set: int, device: str, cap: int = 32) -> int:
    """How many input sets to rotate so that together they are 3x the L2 (1 on CPU)."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_set >= 3 * l2:
        return 1
    return max(1, min(cap, math.ceil(3 * l2 / max(bytes_per_set, 1))))


def time_ms(
    fn: Callable,
    input_sets: Sequence[tuple] | None = None,
    *,
    device: str = "cuda",
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_min_repeats: int = 5,
) -> float:
    """Median time of one call in ms: `fn(*args)` over `input_sets` in turn, or `fn()`."""
    if input_sets:
        sets = itertools.cycle(input_sets)

        def call():
            return fn(*next(sets))
    else:
        call = fn
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms,
                                             return_mode="median"))
    # CPU: warm up for warmup_ms (at least once), then time repeats for rep_ms
    start = time.perf_counter()
    while True:
        call()
        if (time.perf_counter() - start) * 1e3 >= warmup_ms:
            break
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < cpu_min_repeats or (time.perf_counter() - start) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capture_graph(fn: Callable, warmup: int = 3) -> Callable:
    """`workbench.roofline.microbench.capture_graph` with 3 warm-up calls (Triton compiles and
    autotunes on the first)."""
    return _capture_graph(fn, warmup)


def graph_ms(fn: Callable, device: str) -> float | None:
    """Median replay time (ms) of a CUDA graph of `fn()`; None off CUDA or when capture fails
    (the failure is printed, so one uncapturable op does not stop a benchmark run)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        return time_ms(capture_graph(fn), device=device)
    except Exception as error:  # record, don't stop the run
        print(f"  graph capture failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return None


def kernel_profile(fn, device: str, calls: int = 20, top: int = 10) -> list[str]:
    """GPU time per kernel of `fn` (torch.profiler, `calls` calls), largest first, as lines."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append((us / calls, e.count // calls, e.key[:70]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"{us:8.1f} us x{cnt} {name}" for us, cnt, name in rows[:top]]
    return [f"total {total:.1f} us per call"] + lines


def copy_bandwidth_gbps(device: str, n_bytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device=device)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def result_row(
    *,
    name: str,
    impl: str,
    shape: dict,
    dtype: torch.dtype | str,
    median_ms: float | None,
    baseline_ms: float | None = None,
    bytes_moved: int | None = None,
    flops: float | None = None,
    peak_gbps: float | None = None,
    note: str = "",
) -> dict:
    """One JSON row, with speedup, GB/s, fraction of peak and TFLOP/s derived from the inputs."""
    ok = median_ms is not None and median_ms > 0
    row = {
        "name": name,
        "impl": impl,
        "shape": dict(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "median_ms": median_ms,
        "baseline_ms": baseline_ms,
        "speedup": baseline_ms / median_ms if ok and baseline_ms else None,
        "bytes": bytes_moved,
        "gbps": bytes_moved / (median_ms * 1e-3) / 1e9 if ok and bytes_moved else None,
        "tflops": flops / (median_ms * 1e-3) / 1e12 if ok and flops else None,
    }
    row["frac_of_copy_bw"] = row["gbps"] / peak_gbps if row["gbps"] and peak_gbps else None
    if note:
        row["note"] = note
    return row


def write_results(name: str, rows: list[dict], *, device: str, meta: dict | None = None,
                  out_dir: str | Path = RESULTS_DIR) -> Path:
    """Write {"name", "environment", "meta", "rows"} to <out_dir>/<name>.json; returns the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"name": name, "environment": environment(device), "meta": meta or {},
               "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def device_slug(device: str) -> str:
    """File-name form of the device: "cpu", or e.g. "nvidia_h200" for a GPU."""
    if torch.device(device).type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "_" for c in device_name(device).lower()).strip("_")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


DEFAULT_COLUMNS = ("name", "impl", "median_ms", "speedup", "gbps", "frac_of_copy_bw")


def format_table(rows: Sequence[dict], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """A short fixed-width table of `columns` (missing values print as '-')."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def print_table(rows: Sequence[dict], columns: Sequence[str] = DEFAULT_COLUMNS) -> None:
    print(format_table(rows, columns), flush=True)
