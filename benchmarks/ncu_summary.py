"""Summarize Nsight Compute raw CSV exports (`ncu --import X.ncu-rep --page raw --csv`) into
one JSON of the numbers that say what limits a kernel: time, registers and occupancy, issue
rate, eligible warps, DRAM bytes and throughput, cache hit rates, and the share of each warp
stall reason (PC sampling).

    python3 -m benchmarks.ncu_summary OUT.json A.csv [B.csv ...]
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

METRICS = {
    "duration_us": "gpu__time_duration.sum",
    "registers_per_thread": "launch__registers_per_thread",
    "grid_size": "launch__grid_size",
    "block_size": "launch__block_size",
    "achieved_occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "issue_slots_busy_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "eligible_warps_per_cycle": "smsp__warps_eligible.avg.per_cycle_active",
    "instructions_executed": "smsp__inst_executed.sum",
    "dram_bytes_read": "dram__bytes_read.sum",
    "dram_read_pct_of_peak": "dram__bytes_read.sum.pct_of_peak_sustained_elapsed",
    "l1_hit_rate_pct": "l1tex__t_sector_hit_rate.pct",
    "l2_hit_rate_pct": "lts__t_sector_hit_rate.pct",
}
STALL = "smsp__pcsamp_warps_issue_stalled_"
UNIT_SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6,
              "Gbyte": 1e9}     # durations to us, sizes to bytes


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(path: Path) -> list[dict]:
    """One dict per profiled kernel in the CSV (header row, units row, then one row each)."""
    rows = list(csv.reader(path.open()))
    header, units = rows[0], rows[1]
    out = []
    for values in rows[2:]:
        by = dict(zip(header, values, strict=False))
        unit = dict(zip(header, units, strict=False))
        k = {"kernel": by.get("Kernel Name", "?")}
        for name, metric in METRICS.items():
            v = _number(by.get(metric, ""))
            k[name] = None if v is None else v * UNIT_SCALE.get(unit.get(metric, ""), 1.0)
        stalls = {h[len(STALL):]: _number(v) for h, v in by.items()
                  if h.startswith(STALL) and not h.endswith("not_issued") and _number(v)}
        total = sum(stalls.values()) or 1.0
        k["stall_share_pct"] = {s: round(100 * v / total, 1)
                                for s, v in sorted(stalls.items(), key=lambda kv: -kv[1])
                                if 100 * v / total >= 0.5}
        out.append(k)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit(__doc__)
    kernels = [k for p in argv[1:] for k in summarize(Path(p))]
    Path(argv[0]).write_text(json.dumps({"kernels": kernels}, indent=1) + "\n")
    for k in kernels:
        print(json.dumps(k))


if __name__ == "__main__":
    main()
