"""KVQuant fused decode attention vs fp16/bf16 SDPA decode, on a GPU; one call checks and times all.

    python benchmarks/bench_kvquant.py [--out DIR] [--quick]

For each attention shape (Llama-2-7B: 32 x 128 heads; Llama-3-8B: 32 q / 8 kv heads, head_dim
128) and context (32K, 128K), batch 1, one query token:
- dense baselines: torch `scaled_dot_product_attention` on fp16 and on bf16 K/V (GQA via
  enable_gqa); the faster of the two is the baseline of the speedup;
- the fused kernel (`kernels.kvquant_decode`) over a packed cache quantized from random
  tensors with a few large channels (nuq3 with 1% dense-and-sparse and the first token
  exact, nuq3 without sparse part; nuq2/4 with --all-bits), for the launch settings in
  SETTINGS (the current default first, then the variants: the sparse part inside the tile
  loop, more splits, queries rotated by a pre-pass, tiles of 32 tokens with 2 warps, scores
  and value product by fp32 FMAs (one query head per KV head); the best correct one is
  reported, all are in the JSON with their max error);
- correctness: the kernel against the float64 reference on the same packed cache, by the
  flash-attention rule in `kernels.testing` (bf16 queries), and the pack kernel against its
  reference (codes equal, residual close);
- bytes: what the kernel reads at least once (codes, ranges, sparse part, its cos/sin tables,
  the separate passes' buffers: `PackedKV.kernel_bytes` of the reported setting) vs
  2 * S * H * D * 2 dense bytes; achieved GB/s = bytes / median time.
Next H200 run (128K only; 5 settings per case, 8 for the Llama-2 shape, under the 250 s
budget; --profile adds torch.profiler kernel times of the default and the best setting):
    python3 -m benchmarks.bench_kvquant --contexts 131072 --profile
Random tensors: speed and shape only; accuracy is measured with the real model on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import (  # noqa: E402
    copy_bandwidth_gbps,
    graph_ms,
    kernel_profile,
    print_table,
    result_row,
    time_ms,
    write_results,
)
from kernels.hadamard import hadamard  # noqa: E402
from kernels.kvquant_decode import (  # noqa: E402
    kvquant_decode_attention,
    kvquant_decode_reference,
    kvquant_decode_triton,
)
from kernels.kvquant_pack import quantize_pack, quantize_pack_reference  # noqa: E402
from kernels.lse_merge import merge_attention_partials  # noqa: E402
from kernels.testing import compare_to_reference  # noqa: E402
from workbench.kvquant.fused import random_layer, reblock  # noqa: E402
from workbench.kvquant.levels import nf_levels  # noqa: E402

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}   # q heads, kv heads, head_dim
# launch settings timed per case: (label, tokens per tile (the sparse part is re-blocked to
# match), splits as a multiple of ~4 programs per SM, kvquant_decode_triton options); the
# default path first; settings that only change the sparse part run only where there is one.
# Local sm_90 SASS (Triton 3.9, Llama-2 / Llama-3 shape, nuq3-1%): registers per thread and
# instructions in the tile loop per tile, see kernels/kvquant_decode.py's docstring.
_B = {"num_warps": 4, "use_asm": None, "e_chunk": 128}     # None: PTX lookups for 2-3 bits
_PASSES = {"key_sparse": "prepass", "value_sparse": "post"}
_IN_LOOP = {"key_sparse": "segments", "value_sparse": "segments"}
_QROT = {"rotate_queries": "prepass"}
SETTINGS = (
    ("default (sparse passes)", 64, 2, {**_B, "num_stages": 3, **_PASSES}),
    ("sparse in loop", 64, 2, {**_B, "num_stages": 3, **_IN_LOOP}),
    ("default splits*2", 64, 4, {**_B, "num_stages": 3, **_PASSES}),
    ("default block=32 warps=2 splits*2", 32, 4, {**_B, "num_warps": 2, "num_stages": 3,
                                                  **_PASSES}),
    ("passes+qrot block=32 maxnreg=168", 32, 2,
     {**_B, "num_stages": 3, **_PASSES, **_QROT, "max_registers": 168}),
    ("fma scores", 64, 2, {**_B, "num_stages": 3, **_PASSES, "score_math": "fma"}),
    ("fma scores block=32", 32, 2, {**_B, "num_stages": 3, **_PASSES, "score_math": "fma"}),
    ("fma scores block=32 splits*2", 32, 4, {**_B, "num_stages": 3, **_PASSES,
                                             "score_math": "fma"}),
)
_SPARSE_ONLY = ("key_sparse", "value_sparse")


def best_ms(fn) -> float:
    """The faster of a plain call (triton's do_bench median) and a CUDA-graph replay: the
    kernel's time without the Python launch cost of its several launches, as a decode step
    captured in a graph sees it."""
    g = graph_ms(fn, "cuda")
    return min(time_ms(fn), g if g is not None else math.inf)


def dense_inputs(hq, hkv, s, d, dtype, gen):
    q = torch.randn(1, hq, 1, d, generator=gen, dtype=torch.float32).to("cuda", dtype)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=dtype)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=dtype)
    return q, k, v


def sdpa(q, k, v):
    gqa = q.shape[1] != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


def check_pack(rows: list, log) -> None:
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(4096, 128, generator=gen).cuda()
    lv = nf_levels(3).cuda()
    cl, ch = x.quantile(0.01, dim=1), x.quantile(0.99, dim=1)
    got = quantize_pack(x, lv, lv, 3, cut_lo=cl, cut_hi=ch, rows_per_head=4096, n_sink=1,
                        backend="triton")
    ref = quantize_pack_reference(x, lv, lv, 3, cut_lo=cl, cut_hi=ch, rows_per_head=4096, n_sink=1)
    mismatch = float((got[0] != ref[0]).float().mean())
    res = float((got[3].float() - ref[3].float()).abs().max())
    log(f"pack kernel: plane bytes differing {mismatch:.2e}, residual max diff {res:.3g}")
    ms = time_ms(lambda: quantize_pack(x, lv, lv, 3, cut_lo=cl, cut_hi=ch, rows_per_head=4096))
    moved = x.numel() * 4 + x.numel() * 3 // 8 + 4096 * 4 + x.numel() * 2
    rows.append(result_row(name="pack 4096 vectors x 128 (values, 3 bit)", impl="triton",
                           shape={"rows": 4096, "head_dim": 128}, dtype="float32",
                           median_ms=ms, bytes_moved=moved,
                           note=f"plane byte mismatch {mismatch:.2e}; residual diff {res:.3g}"))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="32K only")
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--all-bits", action="store_true", help="also nuq2-1%% and nuq4-1%%")
    parser.add_argument("--value-rotation", default="hadamard", choices=("hadamard", "none"),
                        help="values in the Hadamard basis (KVQuant's default here): the "
                             "partial outputs are rotated back before the merge")
    parser.add_argument("--levels-per", default="layer", choices=("layer", "head"))
    parser.add_argument("--budget-s", type=float, default=250.0,
                        help="stop starting new cases after this many seconds")
    parser.add_argument("--profile", action="store_true",
                        help="kernel times (torch.profiler) of the default and the best setting")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kvquant needs a CUDA GPU.")
    t_start = time.time()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    peak = copy_bandwidth_gbps("cuda")
    log(f"copy bandwidth {peak:.0f} GB/s")
    rows: list[dict] = []
    check_pack(rows, log)
    contexts = [32768] if args.quick else [int(c) for c in args.contexts.split(",")]
    cases = [(name, s) for s in sorted(contexts, reverse=True) for name in SHAPES]
    for shape_name, s in cases:
        hq, hkv, d = SHAPES[shape_name]
        if True:  # one case: a shape at a context
            gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
            shape = {"model": shape_name, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                     "context": s, "batch": 1}
            dense_bytes = 2 * hkv * s * d * 2
            base = {}
            for dt in (torch.float16, torch.bfloat16):
                q, k, v = dense_inputs(hq, hkv, s, d, dt, gen)
                base[dt] = best_ms(lambda q=q, k=k, v=v: sdpa(q, k, v))
                del q, k, v
            best_dt = min(base, key=base.get)
            for dt, ms in base.items():
                rows.append(result_row(name=f"{shape_name} {s // 1024}K", impl=f"sdpa {dt}",
                                       shape=shape, dtype=dt, median_ms=ms,
                                       baseline_ms=base[best_dt], bytes_moved=dense_bytes,
                                       peak_gbps=peak))
            variants = [("nuq3-1%", 3, 0.01, 1), ("nuq3 (no sparse)", 3, 0.0, 0)]
            if s == max(contexts) and args.all_bits:
                variants += [("nuq4-1%", 4, 0.01, 1), ("nuq2-1%", 2, 0.01, 1)]
            for vname, bits, frac, sink in variants:
                try:
                    torch.cuda.empty_cache()
                    packed = random_layer(1, hkv, s, d, bits, frac, sink, device="cuda",
                                          generator=gen, levels_per=args.levels_per,
                                          value_rotation=args.value_rotation)
                    q = torch.randn(1, hq, d, generator=gen).to("cuda", torch.bfloat16)
                    # correctness against the float64 reference
                    out = kvquant_decode_attention(q, packed, backend="triton")
                    rep = compare_to_reference(None, kvquant_decode_reference, (q, packed),
                                               kernel_out=(out,), names=("out",))[0]
                    log(f"{shape_name} {s} {vname}: {rep}")
                    # the PTX lookup against the plain-Triton fallback: the same fp16 numbers
                    if bits <= 3:
                        oa, la = kvquant_decode_triton(q, packed, use_asm=True)
                        ob, lb = kvquant_decode_triton(q, packed, use_asm=False)
                        log(f"  asm vs fallback: max |o| diff {float((oa - ob).abs().max()):.3g}, "
                            f"max |lse| diff {float((la - lb).abs().max()):.3g}")
                    timings, errs, moved, seen, runs = {}, {}, {}, set(), {}
                    eager, graphed = {}, {}
                    truth = kvquant_decode_reference(q.double(), packed)
                    by_block = {64: packed}
                    for label, block, mult, opts in SETTINGS:
                        if opts.get("score_math") == "fma" and hq != hkv:
                            continue           # fma scores: one query head per KV head only
                        if frac == 0:          # no sparse part: its options do nothing
                            opts = {k: v for k, v in opts.items() if k not in _SPARSE_ONLY}
                            label = label.replace("passes+", "")
                        n_spl = mult * max(1, -(-528 // hkv))
                        eff = (block, n_spl, tuple(sorted(opts.items())))
                        if eff in seen:
                            continue
                        seen.add(eff)
                        key = f"{label} (splits={n_spl})"
                        try:
                            if block not in by_block:
                                by_block[block] = reblock(packed, block)
                            pk = by_block[block]

                            def run(n_spl=n_spl, q=q, pk=pk, opts=opts):
                                o, lse = kvquant_decode_triton(q, pk, n_spl, **opts)
                                if pk.v_hadamard:      # as kvquant_decode_attention does
                                    o = o @ hadamard(o.shape[-1], o.device)
                                return merge_attention_partials(o, lse)
                            runs[key] = run
                            got = run()[0].to(q.dtype)
                            errs[key] = float((got.double() - truth).abs().max())
                            eager[key] = time_ms(run)
                            graphed[key] = graph_ms(run, "cuda")
                            timings[key] = min(eager[key], graphed[key] or math.inf)
                            moved[key] = pk.kernel_bytes(opts.get("key_sparse", "segments"),
                                                         opts.get("value_sparse", "segments"),
                                                         hq)
                            if errs[key] > rep.bound:
                                log(f"  {key}: max err {errs[key]:.3g} > bound {rep.bound:.3g}")
                        except Exception as err:  # a launch setting that does not compile
                            log(f"  {key}: {type(err).__name__}: {str(err)[:300]}")
                        if time.time() - t_start > args.budget_s:
                            log("  budget spent: remaining settings skipped")
                            break
                    del by_block, truth
                    if not timings:
                        log("  no launch setting ran")
                        continue
                    ok_keys = [k for k in timings if errs[k] <= rep.bound] or list(timings)
                    best = min(ok_keys, key=timings.get)
                    nbytes = moved[best]
                    log(f"  best {best}: {timings[best]:.4f} ms (all: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in timings.items()) + ")")
                    rows.append(result_row(
                        name=f"{shape_name} {s // 1024}K", impl=f"kvquant {vname}", shape=shape,
                        dtype="bf16 q", median_ms=timings[best], baseline_ms=base[best_dt],
                        bytes_moved=nbytes, peak_gbps=peak,
                        note=(f"{best}; bytes vs dense {dense_bytes / nbytes:.2f}x fewer; "
                              f"max err {rep.max_err:.3g} (torch bf16 {rep.torch_max_err:.3g}) "
                              f"{'ok' if rep.passed else 'FAIL'}")))
                    if args.profile:
                        first = next(iter(timings))
                        profiles = {k: kernel_profile(runs[k], "cuda")
                                    for k in dict.fromkeys((first, best))}
                        for k, prof in profiles.items():
                            log(f"  kernels of {k}:\n    " + "\n    ".join(prof))
                        rows[-1]["kernel_profiles"] = profiles
                    runs.clear()
                    rows[-1]["all_settings_ms"] = timings
                    rows[-1]["all_settings_eager_ms"] = eager
                    rows[-1]["all_settings_graph_ms"] = graphed
                    rows[-1]["all_settings_max_err"] = errs
                    rows[-1]["error_bound"] = rep.bound
                    rows[-1]["correct"] = rep.passed and all(e <= rep.bound
                                                             for e in errs.values())
                    del packed, q, out
                    write_results("kvquant_decode_h200", rows, device="cuda", out_dir=args.out,
                                  meta={"partial": True, "log": lines})
                except Exception:  # keep timing the other cases; the log says why
                    log(f"{shape_name} {s} {vname}: FAILED\n{traceback.format_exc()[-3000:]}")
                if time.time() - t_start > args.budget_s:
                    break
        if time.time() - t_start > args.budget_s:
            log(f"stopped early: the {args.budget_s:.0f} s budget was spent")
            break
    meta = {"baseline": "faster of fp16 / bf16 torch SDPA decode (batch 1, 1 query token)",
            "timing": "each time the faster of triton's do_bench median and a CUDA-graph "
                      "replay median (all_settings_eager_ms / all_settings_graph_ms)",
            "data": "random tensors with a few large key channels, quantized by the reference",
            "value_rotation": args.value_rotation, "levels_per": args.levels_per,
            "copy_gbps": peak, "seconds": time.time() - t_start, "log": lines}
    path = write_results("kvquant_decode_h200", rows, device="cuda", meta=meta, out_dir=args.out)
    print_table(rows, ("name", "impl", "median_ms", "speedup", "gbps", "frac_of_copy_bw"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
