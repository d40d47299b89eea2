"""Benchmark the fused log-sum-exp merge against the PyTorch a user would write.

    python -m benchmarks.bench_lse_merge                  # GPU: writes results/lse_merge_<gpu>.json
    python -m benchmarks.bench_lse_merge --out DIR        # write the JSON to DIR instead
    TRITON_INTERPRET=1 python -m benchmarks.bench_lse_merge   # CPU smoke test, tiny shapes;
                                                          # writes lse_merge_cpu.json only with --out

Order (the Triton tutorials'): correctness on this device first (kernel vs the float64 truth with
flash-attention's tolerance rule, fresh random inputs, -inf partials, poisoned outputs), then
timings. Baselines: the reference in eager PyTorch, the short softmax version most people write
(it gives NaN when every partial is empty), and torch.compile of the reference. Speedups are
against the fastest of them, measured in the same run.

Bytes moved per row (each input read once, each output written once): n * head_dim * itemsize
(partial outputs) + 4n (lses) + head_dim * itemsize (merged) + 4 (merged lse). Times are medians
from do_bench (L2 cleared before each run); `graph_ms` replays a CUDA graph of the call, which
removes launch overhead as a serving engine's decode loop does; `host_us` is the host time per
call issued back to back (Python + launch), the floor of an eager loop without graphs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import (
    H200_COPY_GBPS,
    copy_bandwidth_gbps,
    device_name,
    device_slug,
    graph_ms,
    input_set_count,
    print_table,
    result_row,
    time_ms,
    write_results,
)
from kernels.dispatch import HAS_TRITON, is_interpreted
from kernels.lse_merge import (
    _lse_merge_kernel,
    choose_blocks,
    lse_merge_triton,
    merge_attention_partials,
    merge_attention_partials_reference,
)
from kernels.testing import assert_all_written, assert_matches_reference, fresh_seed, poison_


def softmax_merge(outputs: torch.Tensor, lses: torch.Tensor):
    """The short merge most people write: softmax of the lses as weights. NaN when all empty."""
    w = torch.softmax(lses.float(), dim=-1)                         # (..., n)
    merged = (w[..., None] * outputs.float()).sum(dim=-2)           # (..., d)
    return merged.to(outputs.dtype), torch.logsumexp(lses.float(), dim=-1)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    q_len: int          # 1 for decode: the layout is then (batch, heads, n, head_dim)
    n: int              # partials (split-KV chunks, or context + user tokens)
    head_dim: int

    @property
    def lead(self) -> tuple[int, ...]:
        if self.q_len == 1:
            return (self.batch, self.heads)
        return (self.batch, self.heads, self.q_len)

    @property
    def rows(self) -> int:
        return self.batch * self.heads * self.q_len

    def bytes_moved(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return self.rows * (self.n * self.head_dim * size + 4 * self.n + self.head_dim * size + 4)


GPU_CASES = [
    Case("decode split-KV", 1, 32, 1, 2, 128),
    Case("decode split-KV", 1, 32, 1, 8, 128),
    Case("decode split-KV", 1, 32, 1, 32, 128),
    Case("decode split-KV", 8, 32, 1, 2, 128),
    Case("decode split-KV", 8, 32, 1, 8, 128),
    Case("decode split-KV", 8, 32, 1, 32, 128),
    Case("prefill ctx+user", 1, 32, 512, 2, 128),
    Case("prefill ctx+user", 1, 32, 8192, 2, 128),
    Case("prefill 4 parts", 4, 32, 2048, 4, 128),
]
CPU_CASES = [
    Case("decode split-KV", 1, 4, 1, 4, 64),
    Case("prefill ctx+user", 1, 4, 16, 2, 64),
]
SWEEP_CASES = (4, 5, 7, 8)   # indexes into GPU_CASES for the block-size sweep


def make_inputs(case: Case, dtype: torch.dtype, device: str, gen: torch.Generator,
                empty_frac: float = 0.0):
    """Random partial outputs (lead, n, d) and finite lses (lead, n); some -inf if asked."""
    outputs = torch.randn(*case.lead, case.n, case.head_dim, generator=gen).to(device, dtype)
    lses = (torch.randn(*case.lead, case.n, generator=gen) * 2.0 + 5.0).to(device)
    if empty_frac:
        empty = (torch.rand(*case.lead, case.n, generator=gen) < empty_frac).to(device)
        lses = lses.masked_fill(empty, float("-inf"))
        outputs = outputs.masked_fill(empty[..., None], float("nan"))
    return outputs, lses


def check_correctness(device: str, cases: list[Case]) -> list[str]:
    """Kernel vs float64 truth on fresh inputs with empty partials; poisoned outputs."""
    odd = [Case("odd", 3, 7, 5, 3, 40), Case("odd", 2, 5, 1, 37, 96), Case("odd", 1, 1, 1, 1, 17)]
    lines = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for case in odd + (cases if dtype == torch.bfloat16 else []):
            seed = fresh_seed()
            gen = torch.Generator().manual_seed(seed)
            outputs, lses = make_inputs(case, dtype, device, gen, empty_frac=0.2)
            out = poison_(torch.empty(*case.lead, case.head_dim, dtype=dtype, device=device))
            out_lse = poison_(torch.empty(case.lead, dtype=torch.float32, device=device))
            got = merge_attention_partials(outputs, lses, backend="triton", out=out,
                                           out_lse=out_lse)
            assert_all_written(out, "merged")
            assert_all_written(out_lse, "lse")
            reports = assert_matches_reference(
                None, merge_attention_partials_reference, (outputs, lses), kernel_out=got,
                names=("merged", "lse"), context=f"({case}, {dtype}, seed {seed})")
            lines.append(f"ok {str(dtype):15s} {case.lead} n={case.n} d={case.head_dim}: "
                         + "; ".join(str(r) for r in reports))
    return lines


def host_us(fn, args, device: str, calls: int = 200) -> float | None:
    """Host time per call in us when calls are issued back to back (GPU only): the Python and
    launch overhead, which bounds an eager decode loop when the kernel itself is shorter."""
    if torch.device(device).type != "cuda":
        return None
    for _ in range(10):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def compile_baseline():
    """torch.compile of the reference (static shapes), or (None, why it failed)."""
    try:
        import torch._dynamo as dynamo

        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 64)
        return torch.compile(merge_attention_partials_reference, dynamic=False), ""
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


def bench_case(case: Case, impls: dict, dtype: torch.dtype, device: str, peak: float | None):
    """Time every impl on one case; rows get speedups against the fastest baseline."""
    gen = torch.Generator().manual_seed(fresh_seed())
    n_sets = input_set_count(case.bytes_moved(dtype), device)
    sets = [make_inputs(case, dtype, device, gen) for _ in range(n_sets)]
    shape = {**asdict(case), "layout": "(" + ", ".join(
        ["batch", "heads"] + (["q_len"] if case.q_len > 1 else []) + ["n", "head_dim"]) + ")"}
    shape.pop("name")
    times, graphs, hosts, notes = {}, {}, {}, {}
    for impl, fn in impls.items():
        try:
            t0 = time.perf_counter()
            fn(*sets[0])                                     # compiles on first call
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            times[impl] = time_ms(fn, sets, device=device)
            graphs[impl] = graph_ms(functools.partial(fn, *sets[0]), device)
            hosts[impl] = host_us(fn, sets[0], device)
            if first > 1.0:
                notes[impl] = f"first call {first:.1f} s"
        except Exception as error:
            times[impl], graphs[impl], hosts[impl] = None, None, None
            notes[impl] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            print(f"  {impl} failed on {case}: {notes[impl]}", flush=True)
    baselines = {k: v for k, v in times.items() if k != "triton" and v}
    best = min(baselines, key=baselines.get) if baselines else None
    best_graph = min((v for k, v in graphs.items() if k != "triton" and v), default=None)
    rows = []
    for impl in impls:
        note = notes.get(impl, "")
        if impl == "triton" and best:
            note = (note + "; " if note else "") + f"vs {best}"
        row = result_row(name=f"{case.name} b{case.batch} q{case.q_len} n{case.n}", impl=impl,
                         shape=shape, dtype=dtype, median_ms=times[impl],
                         baseline_ms=baselines.get(best), bytes_moved=case.bytes_moved(dtype),
                         peak_gbps=peak, note=note)
        row["graph_ms"] = graphs[impl]
        row["graph_speedup"] = (best_graph / graphs[impl]
                                if best_graph and graphs[impl] else None)
        row["host_us"] = hosts[impl]
        row["input_sets"] = n_sets
        rows.append(row)
    return rows


def sweep_blocks(case: Case, dtype: torch.dtype, device: str, peak: float | None) -> list[dict]:
    """Time the kernel at several block sizes around the heuristic's choice."""
    gen = torch.Generator().manual_seed(fresh_seed())
    n_sets = input_set_count(case.bytes_moved(dtype), device)
    sets = []
    for _ in range(n_sets):
        outputs, lses = make_inputs(case, dtype, device, gen)
        o3 = outputs.reshape(-1, case.n, case.head_dim)
        sets.append((o3, lses.reshape(-1, case.n), torch.empty_like(o3[:, 0]),
                     torch.empty(o3.shape[0], device=device)))
    chosen = choose_blocks(case.rows, case.n, case.head_dim)
    d_pow2 = 1 << (case.head_dim - 1).bit_length()
    bn = min(1 << (case.n - 1).bit_length(), 32)
    configs = {chosen}
    for br in (1, 2, 4, 8, 16, 32):
        for bd in (64, 128):
            for nw in (2, 4, 8):
                if bd <= d_pow2 and 2048 <= br * bn * bd <= 8192 and br <= case.rows:
                    configs.add((br, bn, bd, nw))
    rows = []
    for cfg in sorted(configs):
        try:
            ms = time_ms(lambda *a, cfg=cfg: lse_merge_triton(*a, blocks=cfg), sets,
                         device=device, warmup_ms=10, rep_ms=40)
        except Exception as error:
            print(f"  config {cfg} failed: {type(error).__name__}: {error}", flush=True)
            continue
        rows.append(result_row(name=f"{case.name} b{case.batch} q{case.q_len} n{case.n}",
                               impl=f"triton{list(cfg)}" + (" *" if cfg == chosen else ""),
                               shape=asdict(case), dtype=dtype, median_ms=ms,
                               bytes_moved=case.bytes_moved(dtype), peak_gbps=peak))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the JSON (GPU default: benchmarks/results; "
                        "CPU: none, nothing is written)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile "
                        "baseline (on CPU it is skipped unless --compile)")
    parser.add_argument("--compile", action="store_true", help="time torch.compile on CPU too")
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's block sizes")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    dtype = torch.bfloat16
    cases = GPU_CASES if on_gpu else CPU_CASES
    print(f"device: {device_name(device)}; torch {torch.__version__}", flush=True)
    can_triton = HAS_TRITON and (on_gpu or is_interpreted(_lse_merge_kernel))
    if not can_triton:
        print("Triton kernel skipped: needs triton, and on CPU TRITON_INTERPRET=1", flush=True)

    meta: dict = {"dtype": str(dtype), "timing": "triton.testing.do_bench median (L2 cleared "
                  "before each run), rotating input sets to 3x L2; graph_ms: CUDA graph replay"
                  if on_gpu else "wall-clock median after warm-up (CPU)"}
    peak = None
    if on_gpu:
        peak = copy_bandwidth_gbps(device)
        tiny = torch.zeros(1, device=device)
        meta["copy_gbps_measured"] = peak
        meta["copy_gbps_reference"] = H200_COPY_GBPS
        meta["launch_floor_ms"] = time_ms(tiny.zero_, device=device)
        print(f"copy bandwidth {peak:.0f} GB/s (read + write); one-launch floor in do_bench "
              f"{meta['launch_floor_ms'] * 1e3:.1f} us", flush=True)

    if can_triton:
        t0 = time.perf_counter()
        lines = check_correctness(device, cases if on_gpu else [])
        print(f"correctness ({time.perf_counter() - t0:.1f} s):", *lines, sep="\n  ", flush=True)
        meta["correctness"] = lines

    impls: dict = {}
    if can_triton:
        impls["triton"] = lambda o, lse: merge_attention_partials(o, lse, backend="triton")
    impls["eager reference"] = merge_attention_partials_reference
    impls["eager softmax"] = softmax_merge
    if (on_gpu and not args.no_compile) or args.compile:
        compiled, why = compile_baseline()
        if compiled is not None:
            impls["torch.compile reference"] = compiled
        else:
            meta["compile_failed"] = why
            print(f"torch.compile unavailable: {why}", flush=True)

    rows = []
    for case in cases:
        t0 = time.perf_counter()
        rows += bench_case(case, impls, dtype, device, peak)
        print(f"  {case.name} {case.lead} n={case.n}: {time.perf_counter() - t0:.1f} s",
              flush=True)
    sweep = []
    if args.sweep and on_gpu and can_triton:
        for i in SWEEP_CASES:
            if time.perf_counter() - started > 300:
                print("sweep stopped early: time budget", flush=True)
                break
            sweep += sweep_blocks(GPU_CASES[i], dtype, device, peak)
        meta["sweep"] = sweep

    print()
    print_table(rows, ("name", "impl", "median_ms", "speedup", "graph_ms", "graph_speedup",
                       "host_us", "gbps", "frac_of_copy_bw"))
    if sweep:
        print("\nblock sweep (BLOCK_R, BLOCK_N, BLOCK_D, num_warps); * = heuristic's choice")
        print_table(sweep, ("name", "impl", "median_ms", "gbps", "frac_of_copy_bw"))
    out_dir = args.out or ("benchmarks/results" if on_gpu else None)
    if out_dir:
        path = write_results(f"lse_merge_{device_slug(device)}", rows, device=device, meta=meta,
                             out_dir=out_dir)
        print(f"\nwrote {path}")
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
