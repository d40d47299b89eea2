"""The paper's scaling trends, fitted from dated tables instead of typed in.

    growth = hardware_growth()      # {"peak FLOPS": Growth(per_2_years=..., ...), ...}
    sizes = model_growth(until=2020.5)   # the paper's window for model sizes

Hardware series come from the catalog (`hardware.csv`, flagship data-center chips only: the
inference/consumer parts and measured rows are left out), one point per chip at its launch
year: peak FLOPS (dense 16-bit matrix rate, or fp32 before 16-bit units existed), DRAM
bandwidth, interconnect bandwidth (PCIe/NVLink, both directions) and memory capacity. Model
sizes come from `model_sizes.csv` (parameters at the publication month; dense models). A
`Growth` is a least-squares line through log(value) against year: value grows by
`per_2_years` every two years.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.roofline.hardware import catalog

MODEL_SIZES_PATH = Path(__file__).with_name("model_sizes.csv")

HARDWARE_SERIES = {
    "peak FLOPS": lambda c: c.peak_flops,
    "DRAM bandwidth": lambda c: c.bandwidth,
    "interconnect bandwidth": lambda c: c.interconnect,
    "memory capacity": lambda c: c.memory,
}
UNITS = {"peak FLOPS": "FLOP/s", "DRAM bandwidth": "B/s", "interconnect bandwidth": "B/s",
         "memory capacity": "B", "model parameters": "parameters"}


@dataclass(frozen=True)
class Point:
    """One dated value: `year` as a decimal (2020.4 = May 2020), `label` names the chip/model."""

    year: float
    value: float
    label: str


@dataclass(frozen=True)
class Growth:
    """A fitted exponential: value = scale * per_2_years ** ((year - first_year) / 2)."""

    metric: str
    per_2_years: float
    r2: float
    points: tuple[Point, ...]
    intercept: float  # log(value) at year 0 of the fit line

    @property
    def first_year(self) -> float:
        return min(p.year for p in self.points)

    @property
    def last_year(self) -> float:
        return max(p.year for p in self.points)

    def at(self, year: float) -> float:
        """The fitted value in `year`."""
        return math.exp(self.intercept + math.log(self.per_2_years) / 2 * year)

    def over(self, years: float) -> float:
        """Growth factor over `years` years."""
        return self.per_2_years ** (years / 2)

    @property
    def label(self) -> str:
        return f"{self.metric}: {self.per_2_years:.2g}x / 2 years"


def fit_growth(points: list[Point], metric: str = "") -> Growth:
    """Least-squares fit of log(value) = a + b * year over the points."""
    pts = [p for p in points if p.value and p.value > 0]
    if len(pts) < 2 or len({p.year for p in pts}) < 2:
        raise WorkbenchError(f"Fitting {metric or 'a trend'} needs at least two dated points "
                             f"in different years; got {len(pts)}.")
    xs = [p.year for p in pts]
    ys = [math.log(p.value) for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return Growth(metric, math.exp(2 * slope), 1 - ss_res / ss_tot if ss_tot else 1.0,
                  tuple(sorted(pts, key=lambda p: p.year)), intercept)


def hardware_points(metric: str, tiers: tuple[str, ...] = ("flagship",)) -> list[Point]:
    """Dated points of one catalog series (see HARDWARE_SERIES) for chips of `tiers`."""
    if metric not in HARDWARE_SERIES:
        raise WorkbenchError(f"Unknown hardware series {metric!r}; use one of "
                             f"{', '.join(HARDWARE_SERIES)}.")
    get = HARDWARE_SERIES[metric]
    return [Point(c.year + 0.5, get(c), c.name) for c in catalog()
            if c.tier in tiers and get(c)]


def hardware_growth(since: float = 0, until: float = 9999) -> dict[str, Growth]:
    """Fitted growth of every hardware series over chips launched in [since, until]."""
    out = {}
    for metric in HARDWARE_SERIES:
        pts = [p for p in hardware_points(metric) if since <= p.year <= until]
        out[metric] = fit_growth(pts, metric)
    return out


def model_points(kinds: tuple[str, ...] = ("dense",)) -> list[Point]:
    """Parameter counts of the models in model_sizes.csv, at their publication month."""
    with open(MODEL_SIZES_PATH, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        if r["kind"] in kinds:
            year, month = (int(x) for x in r["date"].split("-"))
            out.append(Point(year + (month - 0.5) / 12, float(r["params"]), r["model"]))
    return out


def model_growth(since: float = 0, until: float = 9999) -> Growth:
    """Fitted growth of model parameter counts published in [since, until]."""
    pts = [p for p in model_points() if since <= p.year <= until]
    return fit_growth(pts, "model parameters")


def growth_table(growths: dict[str, Growth]) -> list[dict]:
    """Rows for printing: metric, x per 2 years, x over 20 years, fit quality, span."""
    return [{"series": name, "x / 2 years": round(g.per_2_years, 2),
             "x / 20 years": float(f"{g.over(20):.2g}"), "R²": round(g.r2, 2),
             "points": len(g.points),
             "years": f"{math.floor(g.first_year)}-{math.floor(g.last_year)}"}
            for name, g in growths.items()]
