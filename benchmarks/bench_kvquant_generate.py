"""KVQuant's cache inside `model.generate` on a GPU: decode through the fused kernel
(`workbench.kvquant.fused_decode`) vs the cache's dequantize-every-step path vs the plain
bf16 DynamicCache, on the embedded model's architecture with random bf16 weights (the GPU
machine has no model files; weights do not change the work per token).

    python3 -m benchmarks.bench_kvquant_generate --out DIR      # GPU: DIR/kvquant_generate_h200.json

Modes: bf16 DynamicCache; KVQuantCache (nuq3-1%, recent_window=64) dequantizing every step;
inside `fused_decode` with every token quantized as it arrives (the default recent_window=0,
the paper's setting), with the reference quantizer or the quantize-and-pack kernel
(append_backend="triton"); and inside `fused_decode` with a 64-token recent window (the
kernel over the quantized tokens + attention over the window, quantized 64 at a time), with
either quantizer. Per prompt length: ms per generated token ((generate of 1 + N new tokens) -
(generate of 1), over N; median of 3), and how many of the N greedy tokens the fused path with
the window shares with the dequantize path (the same keys and values; random weights make
near-ties, so a flip or two is rounding, not a bug). --profile: per mode, GPU-busy time,
kernel launches and ops per token and the top CPU-side ops.
The calibration is made on the spot from random token ids (a smoke calibration, for timing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import write_results  # noqa: E402


def gen_time(model, prompt, new: int, cache_fn, context=None) -> tuple[float, torch.Tensor]:
    """Seconds of model.generate(prompt, new tokens) with a fresh cache_fn() cache."""
    import contextlib

    cache = cache_fn()
    ctx = context(cache) if context else contextlib.nullcontext()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad(), ctx:
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def step_profile(model, prompt, new: int, cache_fn, context=None, top: int = 14) -> dict:
    """Where a generated token's time goes: wall ms, GPU-busy ms (kernel time summed), CUDA
    kernel launches and CPU-side ops per token, and the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = gen_time(model, prompt, 1 + new, cache_fn, context)
    events = prof.key_averages()
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    launches = sum(e.count for e in events if "cudaLaunchKernel" in e.key
                   or "cuLaunchKernel" in e.key)
    cpu_ops = sum(e.count for e in events if e.key.startswith("aten::"))
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_ms_per_token": wall / (1 + new) * 1e3,
            "gpu_busy_ms_per_token": gpu_us / 1e3 / (1 + new),
            "kernel_launches_per_token": launches / (1 + new),
            "aten_ops_per_token": cpu_ops / (1 + new),
            "top_self_cpu": [f"{e.self_cpu_time_total / 1e3 / (1 + new):7.2f} ms "
                             f"x{e.count / (1 + new):.0f} {e.key[:60]}" for e in rows]}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--new", type=int, default=128,
                        help="tokens timed per generate (>= 2x the cache's 64-token recent "
                             "window, so its flushes are in the average)")
    parser.add_argument("--modes", default="",
                        help="comma-separated substrings: run only the modes whose name holds one")
    parser.add_argument("--profile", action="store_true",
                        help="per mode at the last prompt length: GPU busy time, kernel launches "
                             "and the top CPU-side ops per generated token (torch.profiler)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kvquant_generate needs a CUDA GPU.")
    from transformers import DynamicCache

    from workbench.compiler.benchmark import random_weights_backend
    from workbench.kvquant import KVQuantCache, calibrate, fused_decode

    chat = random_weights_backend(ROOT / ".gpu" / "smollm2")
    model = chat.model
    gen = torch.Generator().manual_seed(0)
    calib_ids = torch.randint(100, 40000, (4, 512), generator=gen).cuda()
    t = time.perf_counter()
    calib = calibrate(model, ids=calib_ids, progress=False, batch_size=2)
    print(f"calibration {time.perf_counter() - t:.1f} s", flush=True)
    def kvq(**kw):
        return lambda: KVQuantCache(model, "nuq3-1%", calib, **kw)

    def fused(c):
        return fused_decode(model, c)

    modes = {
        "bf16 DynamicCache": (lambda: DynamicCache(config=model.config), None),
        "nuq3-1% dequantize path, recent window 64": (
            kvq(recent_window=64, append_backend="torch"), None),
        "nuq3-1% fused, every token quantized": (kvq(append_backend="torch"), fused),
        "nuq3-1% fused, every token quantized, kernel append": (
            kvq(append_backend="triton"), fused),
        "nuq3-1% fused decode, recent window 64": (
            kvq(recent_window=64, append_backend="torch"), fused),
        "nuq3-1% fused decode, recent window 64, kernel append": (
            kvq(recent_window=64, append_backend="triton"), fused),
    }
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        modes = {k: v for k, v in modes.items() if any(w in k for w in wanted)}
    rows = []
    for n_ctx in [int(c) for c in args.contexts.split(",")]:
        prompt = torch.randint(100, 40000, (1, n_ctx), generator=gen).cuda()
        outs = {}
        for name, (make, ctx) in modes.items():
            try:
                gen_time(model, prompt, 2, make, ctx)                       # warm-up
                # the window's flushes (once per 64 tokens) must be in the average; the modes
                # without one take a shorter run (each of their tokens costs the same)
                new = args.new if name.startswith("nuq3-1% fused decode") \
                    else min(args.new, 32)
                per = []
                for _ in range(3):
                    t1, _ = gen_time(model, prompt, 1, make, ctx)
                    tn, out = gen_time(model, prompt, 1 + new, make, ctx)
                    per.append((tn - t1) / new * 1e3)
                outs[name] = out[0, n_ctx:]
                ms = statistics.median(per)
                print(f"{n_ctx:6d} {name:28s} {ms:8.2f} ms/token", flush=True)
                rows.append({"name": f"SmolLM2-135M arch, prompt {n_ctx}", "impl": name,
                             "median_ms": ms, "unit": "ms per generated token",
                             "shape": {"prompt": n_ctx, "new_tokens": new, "batch": 1},
                             "dtype": "bfloat16"})
            except Exception as err:  # record and go on
                print(f"{n_ctx} {name}: {type(err).__name__}: {str(err)[:400]}", flush=True)
        for row in rows[-len(outs):]:
            name = row["impl"]
            if name.startswith("nuq3-1% fused decode") and "nuq3-1% dequantize path, recent window 64" in outs:
                a, b = outs[name], outs["nuq3-1% dequantize path, recent window 64"]
                a = a[:len(b)]                       # the shorter run's tokens
                same = int((a == b[:len(a)]).sum())
                print(f"{n_ctx}: {name} vs dequantize path: {same}/{len(a)} tokens equal",
                      flush=True)
                row["tokens_equal_to_dequantize_path"] = f"{same}/{len(a)}"
    meta = {"model": "SmolLM2-135M-Instruct architecture, random bf16 weights; calibration "
                     "from random ids (smoke)",
            "timing": "(generate 1 + N) - (generate 1), over N; median of 3"}
    write_results("kvquant_generate_h200", rows, device="cuda", out_dir=args.out, meta=meta)
    if args.profile:
        for name, (make, ctx) in modes.items():
            try:
                prof = step_profile(model, prompt, 16, make, ctx)   # steady state: no flush
            except Exception as err:  # record and go on
                print(f"profile {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            print(name, {k: v for k, v in prof.items() if k != "top_self_cpu"}, flush=True)
            for line in prof["top_self_cpu"]:
                print("   ", line, flush=True)
            row = next((r for r in rows[::-1] if r["impl"] == name), None)
            if row is not None:
                row["profile_last_prompt"] = prof
    path = write_results("kvquant_generate_h200", rows, device="cuda", out_dir=args.out,
                         meta=meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
