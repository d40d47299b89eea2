"""Where a Squeezed Attention decode step spends its time on the GPU: GPU time per kernel
(torch.profiler) of the default decode path at 128K, budget 1/8, for the Llama-2-7B and
Llama-3-8B shapes, and the CUDA-graph time of each of its parts alone, next to the time to
read the bytes each part must read at the measured copy bandwidth.

    python3 -m benchmarks.profile_squeezed_decode --out DIR     # GPU: DIR/squeezed_decode_profile_h200.json

Parts: the one-level lookup's keep flags (`centroid_keep`: partial log-sum-exp over centroid
tiles, the merge, the threshold pass; the logits are stored, so the centroids are read once),
the lookup with its launch settings varied (centroids per program, warps), and the whole path
(keep flags + `select_and_attend` + the LSE merge). GPU only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_squeezed import GPU_SHAPES, _one_layer, random_plan  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    copy_bandwidth_gbps,
    graph_ms,
    kernel_profile,
    result_row,
    write_results,
)
from workbench.squeezed.fastpath import fast_squeezed_attention, kept_centroids  # noqa: E402

KEEP_VARIANTS = ({}, {"block_k": 64}, {"block_k": 256}, {"num_warps": 8},
                 {"block_k": 256, "num_warps": 8}, {"fuse_lse": True})


def profile_shape(shape, n: int, gbps: float) -> list[dict]:
    """Rows of one shape: each part's graph time, floor and (for two) kernel profile."""
    from kernels.squeezed_select import centroid_keep

    dev, dt = "cuda", torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    hq, kv, d = shape.q_heads, shape.kv_heads, shape.head_dim
    q = torch.randn(1, hq, 1, d, generator=gen).to(dev, dt)
    k = torch.randn(1, kv, n + 1, d, device=dev, dtype=dt)
    v = torch.randn(1, kv, n + 1, d, device=dev, dtype=dt)
    plan = _one_layer(random_plan(shape, n, q, 1 / 8, False, 16, gen, dt, dev))
    kf = plan.fine.shape[2]
    cent_bytes = kv * kf * (d * 2 + 4)
    label_bytes = plan.labels[0].numel() * plan.labels.element_size()
    kept_bytes = int(n / 8) * kv * 2 * d * 2
    parts = {"whole decode path": (lambda: fast_squeezed_attention(plan, 0, q, k, v, 16),
                                   cent_bytes + label_bytes + kept_bytes)}
    for var in KEEP_VARIANTS:
        label = "keep flags " + (", ".join(f"{a}={b}" for a, b in var.items()) or "default")
        parts[label] = (lambda var=var: centroid_keep(
            q, plan.fine[0], plan.fine_log_sizes[0], plan.scaling, 16, plan.fine_threshold,
            **var), cent_bytes)
    keep = kept_centroids(plan, 0, q, 16)
    print(f"{shape.name}: {kf} centroids per KV head, kept {float(keep.float().mean()):.3f} "
          "of them", flush=True)
    rows = []
    for label, (fn, nbytes) in parts.items():
        ms = graph_ms(fn, dev)
        prof = kernel_profile(fn, dev) if label in ("whole decode path",
                                                    "keep flags default") else None
        floor_ms = nbytes / (gbps * 1e9) * 1e3
        print(f"  {label:40s} graph {ms * 1e3:7.1f} us  floor {floor_ms * 1e3:6.1f} us",
              flush=True)
        for line in prof or ():
            print("     ", line, flush=True)
        row = result_row(name=f"{shape.name} n{n // 1024}K decode 1/8", impl=label,
                         shape={"q_heads": hq, "kv_heads": kv, "head_dim": d, "context": n,
                                "centroids_per_kv_head": kf},
                         dtype=dt, median_ms=ms, bytes_moved=nbytes, peak_gbps=gbps)
        row.update(floor_ms=floor_ms, floor_ratio=ms / floor_ms, kernel_profile=prof)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--context", type=int, default=128 * 1024)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_squeezed_decode needs a CUDA GPU.")
    gbps = copy_bandwidth_gbps("cuda")
    rows = [row for shape in GPU_SHAPES for row in profile_shape(shape, args.context, gbps)]
    path = write_results("squeezed_decode_profile_h200", rows, device="cuda", out_dir=args.out,
                         meta={"copy_gbps": gbps, "timing": "CUDA-graph replay, median "
                               "(do_bench); floor = bytes / measured copy bandwidth"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
