"""KVQuant fused decode attention vs fp16/bf16 SDPA decode, on a GPU; one call checks and times all.

    python benchmarks/bench_kvquant.py [--out DIR] [--quick]

For each attention shape (Llama-2-7B: 32 x 128 heads; Llama-3-8B: 32 q / 8 kv heads, head_dim
128) and context (32K, 128K), batch 1, one query token:
- dense baselines: torch `scaled_dot_product_attention` on fp16 and on bf16 K/V (GQA via
  enable_gqa); the faster of the two is the baseline of the speedup;
- the fused kernel (`kernels.kvquant_decode`) over a packed cache quantized from random
  tensors with a few large channels (nuq3 with 1% dense-and-sparse and the first token
  exact, nuq3 without sparse part; nuq2/4 with --all-bits), for a few launch settings (the best
  is reported);
- correctness: the kernel against the float64 reference on the same packed cache, by the
  flash-attention rule in `kernels.testing` (bf16 queries), and the pack kernel against its
  reference (codes equal, residual close);
- bytes: what the kernel reads at least once (codes, ranges, sparse part, its cos/sin tables:
  `PackedKV.kernel_bytes`) vs 2 * S * H * D * 2 dense bytes; achieved GB/s = bytes / median
  time.
Random tensors: speed and shape only; accuracy is measured with the real model on CPU.
"""

from __future__ import annotations

import argparse
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
    print_table,
    result_row,
    time_ms,
    write_results,
)
from kernels.kvquant_decode import (  # noqa: E402
    kvquant_decode_attention,
    kvquant_decode_reference,
    kvquant_decode_triton,
)
from kernels.kvquant_pack import quantize_pack, quantize_pack_reference  # noqa: E402
from kernels.lse_merge import merge_attention_partials  # noqa: E402
from kernels.testing import compare_to_reference  # noqa: E402
from workbench.kvquant.fused import random_layer  # noqa: E402
from workbench.kvquant.levels import nf_levels  # noqa: E402

SHAPES = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}   # q heads, kv heads, head_dim
# launch settings timed per case: (warps, stages, splits as a multiple of ~4 programs per SM,
# levels by PTX byte permutes (True) or by the plain-Triton fallback (False), sparse entries per
# chunk, register cap or None); the best is reported
SETTINGS = ((4, 2, 1, True, 128, None), (4, 2, 2, True, 128, None), (4, 3, 1, True, 128, None),
            (4, 3, 2, True, 128, None), (4, 3, 2, True, 128, 168), (4, 3, 2, True, 128, 128),
            (4, 3, 1, True, 64, None), (4, 3, 1, False, 128, None))


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
    parser.add_argument("--budget-s", type=float, default=290.0,
                        help="stop starting new cases after this many seconds")
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
                base[dt] = time_ms(sdpa, [(q, k, v)])
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
                                          generator=gen)
                    q = torch.randn(1, hq, d, generator=gen).to("cuda", torch.bfloat16)
                    # correctness against the float64 reference
                    out = kvquant_decode_attention(q, packed, backend="triton")
                    rep = compare_to_reference(None, kvquant_decode_reference, (q, packed),
                                               kernel_out=(out,), names=("out",))[0]
                    log(f"{shape_name} {s} {vname}: {rep}")
                    nbytes = packed.kernel_bytes()
                    # the PTX lookup against the plain-Triton fallback: the same fp16 numbers
                    if bits <= 3:
                        oa, la = kvquant_decode_triton(q, packed, use_asm=True)
                        ob, lb = kvquant_decode_triton(q, packed, use_asm=False)
                        log(f"  asm vs fallback: max |o| diff {float((oa - ob).abs().max()):.3g}, "
                            f"max |lse| diff {float((la - lb).abs().max()):.3g}")
                    timings = {}
                    for nw, ns, mult, asm, chunk, regs in SETTINGS:
                        if (asm and bits > 3) or (chunk != 128 and frac == 0):
                            continue
                        n_spl = mult * max(1, -(-528 // hkv))
                        key = (f"warps={nw} stages={ns} splits={n_spl} "
                               f"levels={'prmt' if asm else 'triton'} chunk={chunk}"
                               + (f" maxnreg={regs}" if regs else ""))
                        try:
                            def run(nw=nw, ns=ns, n_spl=n_spl, q=q, packed=packed, asm=asm,
                                    chunk=chunk, regs=regs):
                                o, lse = kvquant_decode_triton(q, packed, n_spl, nw, ns, asm, chunk,
                                                               regs)
                                return merge_attention_partials(o, lse)
                            run()
                            timings[key] = time_ms(run)
                        except Exception as err:  # a launch setting that does not compile
                            log(f"  {key}: {type(err).__name__}: {str(err)[:300]}")
                    if not timings:
                        log("  no launch setting ran")
                        continue
                    best = min(timings, key=timings.get)
                    log(f"  best {best}: {timings[best]:.4f} ms (all: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in timings.items()) + ")")
                    rows.append(result_row(
                        name=f"{shape_name} {s // 1024}K", impl=f"kvquant {vname}", shape=shape,
                        dtype="bf16 q", median_ms=timings[best], baseline_ms=base[best_dt],
                        bytes_moved=nbytes, peak_gbps=peak,
                        note=(f"{best}; bytes vs dense {dense_bytes / nbytes:.2f}x fewer; "
                              f"max err {rep.max_err:.3g} (torch bf16 {rep.torch_max_err:.3g}) "
                              f"{'ok' if rep.passed else 'FAIL'}")))
                    rows[-1]["all_settings_ms"] = timings
                    rows[-1]["correct"] = rep.passed
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
            "data": "random tensors with a few large key channels, quantized by the reference",
            "copy_gbps": peak, "seconds": time.time() - t_start, "log": lines}
    path = write_results("kvquant_decode_h200", rows, device="cuda", meta=meta, out_dir=args.out)
    print_table(rows, ("name", "impl", "median_ms", "speedup", "gbps", "frac_of_copy_bw"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
