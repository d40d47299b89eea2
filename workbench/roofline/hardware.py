"""The accelerator catalog: one `Chip` per row of `hardware.csv`, each with its source.

    chip = get_chip("H200")          # by key or name, case and punctuation ignored
    chip.ridge(16)                   # FLOP/byte where the roofline bends (dense 16-bit matrix)
    chip.flops_for(8), chip.bandwidth  # FLOP/s, byte/s

Units: the CSV holds TFLOP/s, GB (1e9 bytes) and GB/s; a `Chip` holds plain FLOP/s, bytes and
byte/s so that arithmetic on it needs no unit juggling. Matrix rates are dense (no structured
sparsity). Interconnect figures count both directions, as vendors quote NVLink.
A measured "this machine" chip comes from `workbench.roofline.microbench.measure_this_machine`.
"""

from __future__ import annotations

import csv
import difflib
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from workbench.errors import WorkbenchError

CATALOG_PATH = Path(__file__).with_name("hardware.csv")

# Matrix-rate slot used for each activation bit width, most precise first.
_SLOTS = (32, 16, 8, 4)


@dataclass(frozen=True)
class Chip:
    """One accelerator (or this machine), in SI units.

    matrix_flops: dense matrix FLOP/s by operand bits {16: ..., 8: ..., 4: ...}; missing widths
    fall back to the next wider one. vector_flops: non-matrix fp32 FLOP/s (softmax, norms).
    memory: bytes of device memory. bandwidth: byte/s. op_latency: seconds every operation
    costs on top of its roofline time (launch, ramp-up and tail of one kernel; 0 for datasheet
    rows, measured for measured rows: the intercept of time = latency + bytes / bandwidth).
    """

    key: str
    name: str
    vendor: str
    year: int
    kind: str  # "gpu", "tpu" or "cpu"
    matrix_flops: dict[int, float]
    vector_flops: float | None
    memory: float
    memory_type: str
    bandwidth: float
    interconnect: float | None = None
    interconnect_name: str = ""
    op_latency: float = 0.0
    source: str = ""
    notes: str = ""
    measured: bool = False
    tier: str = ""  # "flagship", "inference", "consumer" or "measured" (trend fits use flagship)
    extra: dict = field(default_factory=dict, compare=False)

    def flops_for(self, bits: float) -> float:
        """Matrix FLOP/s for operands of `bits` bits (fp32 uses the non-matrix fp32 rate).

        A width the chip lacks runs on the next wider unit it has (W4A16 -> 16-bit units; int8 on
        a V100 -> fp16 tensor cores); never on a narrower one.
        """
        slot = next((s for s in _SLOTS[::-1] if s >= bits), 32)
        for s in _SLOTS[::-1]:
            rate = self.vector_flops if s == 32 else self.matrix_flops.get(s)
            if s >= slot and rate:
                return rate
        for s in (16, 8, 4):  # nothing wide enough listed (fp32 on a TPU): widest unit there is
            if self.matrix_flops.get(s):
                return self.matrix_flops[s]
        raise WorkbenchError(f"{self.name} lists no FLOP/s figure at all; add one to the catalog.")

    def vector_rate(self) -> float:
        """FLOP/s for element-wise work: the fp32 rate, or the matrix rate where none is listed."""
        return self.vector_flops or self.flops_for(16)

    def ridge(self, bits: float = 16) -> float:
        """Machine balance in FLOP/byte: matrix FLOP/s at `bits` over memory bandwidth."""
        return self.flops_for(bits) / self.bandwidth

    @property
    def peak_flops(self) -> float:
        """Highest dense FLOP/s at 16 bits or wider: the 'peak FLOPS' of the trend figures."""
        return max(r for r in (self.matrix_flops.get(16), self.vector_flops) if r)

    def with_ceilings(self, *, bandwidth: float | None = None, flops16: float | None = None,
                      op_latency: float | None = None, suffix: str = " (measured ceilings)") -> Chip:
        """A copy with measured ceilings swapped in (byte/s, FLOP/s, seconds per op)."""
        matrix = dict(self.matrix_flops)
        if flops16:
            matrix[16] = flops16
        return replace(self, key=self.key + "-measured", name=self.name + suffix, matrix_flops=matrix,
                       tier="measured",
                       bandwidth=bandwidth or self.bandwidth,
                       op_latency=self.op_latency if op_latency is None else op_latency,
                       measured=True)

    def row(self) -> dict:
        """The chip as a display row in catalog units (TFLOP/s, GB, GB/s)."""
        return {"chip": self.name, "year": self.year,
                "bf16 TFLOP/s": _tera(self.matrix_flops.get(16)),
                "8-bit TFLOP/s": _tera(self.matrix_flops.get(8)),
                "fp32 TFLOP/s": _tera(self.vector_flops),
                "memory GB": round(self.memory / 1e9, 1), "GB/s": round(self.bandwidth / 1e9),
                "ridge FLOP/B": round(self.peak_flops / self.bandwidth)}


def _tera(x: float | None) -> float | None:
    return None if x is None else round(x / 1e12, 3)


def _num(text: str) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@lru_cache(maxsize=1)
def catalog() -> tuple[Chip, ...]:
    """All chips of `hardware.csv`, in file order."""
    chips = []
    with open(CATALOG_PATH, newline="") as f:
        for r in csv.DictReader(f):
            matrix = {bits: _num(r[f"matrix{bits}_tflops"]) for bits in (16, 8, 4)}
            chips.append(Chip(
                key=r["key"], name=r["name"], vendor=r["vendor"], year=int(r["year"]),
                kind=r["kind"],
                matrix_flops={b: v * 1e12 for b, v in matrix.items() if v is not None},
                vector_flops=(_num(r["fp32_tflops"]) or 0) * 1e12 or None,
                memory=_num(r["memory_gb"]) * 1e9, memory_type=r["memory_type"],
                bandwidth=_num(r["bandwidth_gbs"]) * 1e9,
                interconnect=(_num(r["interconnect_gbs"]) or 0) * 1e9 or None,
                interconnect_name=r["interconnect"],
                op_latency=(_num(r["op_latency_us"]) or 0) * 1e-6,
                source=r["source"], notes=r["notes"], measured=r["tier"] == "measured",
                tier=r["tier"]))
    return tuple(chips)


def chip_names() -> list[str]:
    """Catalog keys, in file order."""
    return [c.key for c in catalog()]


def get_chip(chip: str | Chip) -> Chip:
    """Look a chip up by key or name ('h200', 'H200', 'NVIDIA H200 SXM'); a Chip passes through."""
    if isinstance(chip, Chip):
        return chip
    if not isinstance(chip, str):
        raise WorkbenchError(f"A chip is a name like 'h200' or a Chip, not {type(chip).__name__}.")
    want = _norm(chip)
    by_key = {_norm(c.key): c for c in catalog()}
    by_name = {_norm(c.name): c for c in catalog()}
    for table in (by_key, by_name):
        if want in table:
            return table[want]
    partial = [c for c in catalog() if want and (want in _norm(c.name) or want in _norm(c.key))]
    if len(partial) == 1:
        return partial[0]
    close = difflib.get_close_matches(want, list(by_key), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(by_key[k].key) for k in close)}?" if close else ""
    if len(partial) > 1:
        hint = f" It matches several: {', '.join(c.key for c in partial)}."
    raise WorkbenchError(f"Unknown chip {chip!r}.{hint} Known chips: {', '.join(chip_names())}. "
                         "For the machine you are on, use measure_this_machine().")
