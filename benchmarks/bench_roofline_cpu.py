"""Predicted vs measured prefill and decode speed of the real SmolLM2-135M on this CPU.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.bench_roofline_cpu   # writes results/roofline_cpu.json
    python -m benchmarks.bench_roofline_cpu --out DIR                  # elsewhere

Order: this machine's ceilings (workbench.roofline.microbench: streaming bandwidth and per-op
latency from matrix-vector products, fp32 matrix rate), the software stack's fixed cost per op
(the same architecture at width 64, `framework_latency`), then the embedded model (float32, real
text from the Python docs) at several prompt lengths: one prefill pass, then greedy decode
steps. Predictions use the measured ceilings, first without and then with the per-op cost.
The CPU is shared with other processes here: every time is the fastest of its repeats, and the
ceilings are measured before and after the model runs; their geometric mean stands for the
machine as it was during the runs (both are in the JSON, with the load average).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch

from benchmarks.harness import RESULTS_DIR, write_results
from workbench.models import load_model
from workbench.roofline.measure import compare, framework_latency, measure_speed
from workbench.roofline.microbench import measure_this_machine
from workbench.roofline.units import format_table

CONTEXTS = (64, 256, 1024, 2048)


def _summary(chip) -> dict:
    return {"bandwidth_Bps": chip.bandwidth, "fp32_flops": chip.vector_flops,
            "op_latency_s": chip.op_latency, "load_average": chip.extra.get("load_average")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for roofline_cpu.json")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    contexts = tuple(int(c) for c in args.contexts.split(","))
    model, tokenizer = load_model(device="cpu")
    before, overhead_before = measure_this_machine("cpu"), framework_latency(model)
    rows = measure_speed(model, tokenizer, contexts=contexts, decode_steps=8, repeats=3)
    after, overhead_after = measure_this_machine("cpu"), framework_latency(model)
    # the machine as it was during the model runs: geometric mean of the before/after ceilings
    chip = replace(before, bandwidth=(before.bandwidth * after.bandwidth) ** 0.5,
                   vector_flops=(before.vector_flops * after.vector_flops) ** 0.5,
                   op_latency=(before.op_latency + after.op_latency) / 2,
                   extra={**before.extra, "before": _summary(before), "after": _summary(after)})
    latency = (overhead_before["latency_s"] + overhead_after["latency_s"]) / 2
    overhead = {**overhead_before, "latency_s": latency, "before": overhead_before,
                "after": overhead_after}
    chip_sw = chip.with_ceilings(op_latency=max(chip.op_latency, latency),
                                 suffix=" + framework per-op cost")
    roofline = compare(model, chip, rows)
    with_overhead = compare(model, chip_sw, rows)
    print(chip.name, f"streaming {chip.bandwidth / 1e9:.1f} GB/s, fp32 "
          f"{chip.vector_flops / 1e9:.0f} GFLOP/s, op latency {chip.op_latency * 1e6:.1f} us; "
          f"framework {overhead['latency_s'] * 1e6:.1f} us/op")
    print("roofline with measured ceilings:\n" + format_table(roofline))
    print("plus the framework's per-op cost:\n" + format_table(with_overhead))
    meta = {"model": "SmolLM2-135M-Instruct (embedded, float32)", "threads": torch.get_num_threads(),
            "ceilings": {"name": chip.name, "bandwidth_Bps": chip.bandwidth,
                         "op_latency_s": chip.op_latency, "fp32_flops": chip.vector_flops,
                         "memory_bytes": chip.memory, **chip.extra},
            "framework": overhead, "seconds": round(time.perf_counter() - started, 1),
            "timing": "fastest of repeats (shared CPU); decode: fastest of 8 steps x 3 repeats",
            "text": "workbench.data.text.text_chunks (Python language reference)"}
    for r, a, b in zip(rows, roofline, with_overhead, strict=True):
        r.update(predicted_s=a["predicted ms"] / 1e3, ratio=a["ratio"],
                 predicted_with_overhead_s=b["predicted ms"] / 1e3, ratio_with_overhead=b["ratio"])
    path = write_results("roofline_cpu", rows, device="cpu", meta=meta, out_dir=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
