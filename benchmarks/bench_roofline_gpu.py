"""Time a Llama-7B-shaped decoder block on the GPU, to check the roofline's predictions.

    python -m benchmarks.bench_roofline_gpu --out DIR    # GPU: writes DIR/roofline_h200.json
    python -m benchmarks.bench_roofline_gpu --small      # CPU smoke test: tiny shapes, no JSON

What it measures, in one run:
1. Ceilings: device-to-device copy (bytes read + written), a large bf16 matrix-vector product
   over 1 GiB of weights (the operation decode is made of: achieved read bandwidth), bf16 and
   fp32 (TF32 off) matrix products, and the per-kernel floor (tiny kernels replayed in a CUDA
   graph, and launched eagerly).
2. Correctness: the bf16 block against the same block in fp32 (relative error) for one decode
   and one prefill case, on fresh random inputs; NaN fails.
3. Time per case (random bf16 weights N(0, 0.02), random KV cache, never zeros): decode steps at
   several batch sizes and contexts (eager, and replayed from a CUDA graph as serving engines do;
   optionally torch.compile'd, which fuses the small element-wise kernels), and prefills.
4. A kernel profile (torch.profiler) of one decode step and one prefill: which kernels ran, how
   long each took. Predictions are not stored: the notebook recomputes them from this JSON.

Block: `workbench.roofline.layer.LlamaBlock` (fused QKV and gate/up matrices, SDPA, static
cache), checked against transformers' LlamaDecoderLayer in tests/test_roofline_layer.py.
Timing: benchmarks.harness.time_ms (triton do_bench median, L2 cleared before each run).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import capture_graph, device_name, time_ms, write_results
from workbench.roofline.layer import LlamaBlock
from workbench.roofline.microbench import measure_this_machine
from workbench.roofline.shapes import known_config


@dataclass(frozen=True)
class Case:
    model: str
    phase: str  # "decode" (one token after `context` cached) or "prefill" (`context` tokens)
    batch: int
    context: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.phase} b{self.batch} ctx{self.context}"


GPU_CASES = [
    *(Case("llama-2-7b", "decode", b, c) for b, c in
      [(1, 128), (1, 1024), (1, 4096), (1, 16384), (1, 32768), (8, 4096), (32, 1024),
       (32, 4096), (64, 2048), (16, 32768), (128, 512)]),
    *(Case("llama-3-8b", "decode", b, c) for b, c in [(1, 4096), (32, 8192)]),
    *(Case("llama-2-7b", "prefill", b, c) for b, c in [(1, 128), (1, 512), (1, 2048), (1, 8192),
                                                        (4, 2048)]),
]
CPU_CASES = [Case("tiny", "decode", 1, 64), Case("tiny", "decode", 2, 128),
             Case("tiny", "prefill", 1, 64)]
PROFILE_CASES = {("llama-2-7b", "decode", 1, 4096), ("llama-2-7b", "decode", 32, 4096),
                 ("llama-2-7b", "prefill", 1, 2048)}
COMPILE_BUDGET_S = 200  # stop compiling new cases after this many seconds of the run


def block_dims(model: str) -> dict:
    if model == "tiny":
        return dict(hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=352)
    cfg = known_config(model)
    return dict(hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                kv_heads=cfg.num_key_value_heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                intermediate=cfg.intermediate_size)


def ceilings(device: str) -> dict:
    """This machine's ceilings (workbench.roofline.microbench) plus tiny-kernel floors."""
    chip = measure_this_machine(device)
    out = {"name": chip.name, "bandwidth_Bps": chip.bandwidth, "op_latency_s": chip.op_latency,
           "matrix16_flops": chip.matrix_flops.get(16), "fp32_flops": chip.vector_flops,
           "memory_bytes": chip.memory, **chip.extra}
    tiny = torch.randn(4096, device=device, dtype=torch.bfloat16)
    out["eager_tiny_kernel_s"] = time_ms(lambda: tiny.mul_(1.0), device=device) * 1e-3
    if device == "cuda":
        replay = capture_graph(lambda: [tiny.mul_(1.0) for _ in range(100)])
        out["graph_tiny_kernel_s"] = time_ms(replay, device=device) * 1e-3 / 100
    return out


def make_inputs(block: LlamaBlock, case: Case, device: str, dtype, seed: int):
    torch.manual_seed(seed)
    new = 1 if case.phase == "decode" else case.context
    start = case.context if case.phase == "decode" else 0
    k, v = block.empty_cache(case.batch, start + new)
    x = torch.randn(case.batch, new, block.qkv.shape[1], device=device, dtype=dtype)
    return x, k, v, start


def rel_error(block: LlamaBlock, case: Case, device: str) -> float:
    """||bf16 block - fp32 block|| / ||fp32 block|| on fresh random inputs."""
    x, k, v, start = make_inputs(block, case, device, block.qkv.dtype, seed=1234)
    ref_block = LlamaBlock(**block_dims(case.model), max_positions=block.cos.shape[0],
                           device=device, dtype=torch.float32)
    ref_block.load_state_dict({n: p.float() for n, p in block.state_dict().items()})
    with torch.no_grad():
        out = block(x, k, v, start).float()
        ref = ref_block(x.float(), k.float(), v.float(), start)
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())




def kernel_profile(fn, device: str, steps: int = 5) -> list[dict]:
    """Per-kernel GPU time of one call of fn (mean over `steps` calls), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(ev.name, [0, 0.0])
            r[0] += 1
            r[1] += ev.device_time
    out = [{"kernel": k[:90], "calls": c / steps, "us": t / steps} for k, (c, t) in rows.items()]
    return sorted(out, key=lambda r: -r["us"])


def preview(rows: list[dict], ceil: dict) -> None:
    """Print predicted vs measured (the notebook redoes this from the JSON)."""
    try:
        from workbench.roofline.analysis import analyze
        from workbench.roofline.hardware import get_chip
        from workbench.roofline.shapes import fuse_projections, model_shape

        chip = get_chip("h200").with_ceilings(bandwidth=ceil["bandwidth_Bps"],
                                              flops16=ceil["matrix16_flops"],
                                              op_latency=ceil["op_latency_s"])
        for r in rows:
            if r["model"] == "tiny":
                continue
            shape = fuse_projections(model_shape(known_config(r["model"], num_hidden_layers=1)))
            a = analyze(shape, chip, phase=r["phase"], batch=r["batch"], context=r["context"],
                        blocks_only=True)
            best = r.get("compiled_graph_ms") or r.get("graph_ms") or r["eager_ms"]
            print(f"{r['name']:40s} predicted {a.time * 1e3:.4f} ms  measured {best:.4f} ms  "
                  f"ratio {a.time * 1e3 / best:.2f}  ({a.bound})")
    except Exception as err:  # a preview only
        print(f"preview failed: {type(err).__name__}: {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for roofline_h200.json (GPU only)")
    parser.add_argument("--small", action="store_true", help="CPU smoke test with tiny shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    on_gpu = torch.cuda.is_available() and not args.small
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    cases = GPU_CASES if on_gpu else CPU_CASES
    print(f"device: {device_name(device)}; torch {torch.__version__}", flush=True)
    meta: dict = {"dtype": str(dtype).replace("torch.", ""),
                  "block": "workbench.roofline.layer.LlamaBlock (fused QKV, fused gate/up, "
                           "F.rms_norm, SDPA, static KV cache)",
                  "timing": "benchmarks.harness.time_ms: do_bench median, L2 cleared each run"
                  if on_gpu else "wall-clock median (CPU smoke test)"}
    try:
        meta["ceilings"] = ceilings(device)
    except Exception as err:  # keep the case timings even if a ceiling measurement breaks
        meta["ceilings"] = {"error": f"{type(err).__name__}: {err}"}
    print("ceilings:", {k: v for k, v in meta["ceilings"].items() if k != "stream"}, flush=True)
    rows, blocks, errors = [], {}, {}
    for case in cases:
        if case.model not in blocks:
            blocks.clear()
            if on_gpu:
                torch.cuda.empty_cache()
            max_pos = max(c.context + 1 for c in cases if c.model == case.model)
            blocks[case.model] = LlamaBlock.random(**block_dims(case.model), max_positions=max_pos,
                                                   device=device, dtype=dtype)
        block = blocks[case.model]
        if (case.model, case.phase) not in errors:
            small = Case(case.model, case.phase, 1, 1024 if case.phase == "decode" else 512)
            errors[(case.model, case.phase)] = rel_error(block, small if on_gpu else case, device)
        x, k, v, start = make_inputs(block, case, device, dtype, seed=7)

        def step(x=x, k=k, v=v, start=start, block=block):
            with torch.no_grad():
                return block(x, k, v, start)

        row = {**asdict(case), "name": case.name, "kv_heads": block.kv_heads,
               "rel_err_vs_fp32": errors[(case.model, case.phase)],
               "eager_ms": time_ms(step, device=device)}
        if on_gpu:
            try:
                row["graph_ms"] = time_ms(capture_graph(step), device=device)
            except RuntimeError as err:
                row["graph_error"] = str(err).splitlines()[0]
            key = (case.model, case.phase, case.batch, case.context)
            if not args.no_compile and time.perf_counter() - started < COMPILE_BUDGET_S:
                try:
                    torch._dynamo.reset()
                    compiled = torch.compile(block, dynamic=False)

                    def cstep(x=x, k=k, v=v, start=start, compiled=compiled):
                        with torch.no_grad():
                            return compiled(x, k, v, start)

                    row["compiled_graph_ms"] = time_ms(capture_graph(cstep), device=device)
                    if key in PROFILE_CASES:
                        row["compiled_profile"] = kernel_profile(cstep, device)[:25]
                except Exception as err:  # compile is optional: keep the run's other numbers
                    row["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            if key in PROFILE_CASES:
                try:
                    row["profile"] = kernel_profile(step, device)[:40]
                except Exception as err:  # the profile explains; the timings are the result
                    row["profile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        del x, k, v
        rows.append(row)
        print(f"{case.name:40s} eager {row['eager_ms']:.4f} ms  graph "
              f"{row.get('graph_ms', float('nan')):.4f} ms  compiled+graph "
              f"{row.get('compiled_graph_ms', float('nan')):.4f} ms  "
              f"err {row['rel_err_vs_fp32']:.1e}", flush=True)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    preview(rows, meta["ceilings"])
    if on_gpu and args.out:
        path = write_results("roofline_h200", rows, device=device, meta=meta, out_dir=args.out)
        print(f"wrote {path}")
    bad = [k for k, e in errors.items() if not e < 2e-2]
    if bad:
        print(f"FAILED correctness: {bad} {errors}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
