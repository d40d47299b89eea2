"""Growth rates fitted from the dated tables."""

import math

import pytest

from workbench.errors import WorkbenchError
from workbench.roofline.trends import (
    Point,
    fit_growth,
    growth_table,
    hardware_growth,
    hardware_points,
    model_growth,
    model_points,
)


def test_fit_recovers_an_exact_exponential():
    pts = [Point(2000 + y, 5.0 * 3.0 ** (y / 2), str(y)) for y in range(0, 12, 3)]
    g = fit_growth(pts, "x")
    assert g.per_2_years == pytest.approx(3.0)
    assert g.r2 == pytest.approx(1.0)
    assert g.at(2004) == pytest.approx(5.0 * 9.0)
    assert g.over(20) == pytest.approx(3.0 ** 10)


def test_the_memory_wall_in_the_data():
    g = hardware_growth()
    flops, dram = g["peak FLOPS"].per_2_years, g["DRAM bandwidth"].per_2_years
    assert flops > 2.0 and 1.2 < dram < 2.0 and flops > 1.4 * dram
    assert g["peak FLOPS"].over(20) > 50 * g["DRAM bandwidth"].over(20)
    models = model_growth(until=2020.5)
    assert models.per_2_years > 20 * g["memory capacity"].per_2_years
    rows = growth_table({**g, "models": models})
    assert [r["series"] for r in rows][-1] == "models"


def test_tables_have_sources_and_dates():
    assert len(model_points()) >= 10
    assert all(2017 <= p.year <= 2025 and p.value > 1e7 for p in model_points())
    assert all(not math.isnan(p.value) for p in hardware_points("peak FLOPS"))
    labels = {p.label for p in hardware_points("peak FLOPS")}
    assert "NVIDIA T4" not in labels and "NVIDIA H200 SXM (measured here)" not in labels


def test_errors():
    with pytest.raises(WorkbenchError, match="two dated points"):
        fit_growth([Point(2020, 1.0, "a")])
    with pytest.raises(WorkbenchError, match="Unknown hardware series"):
        hardware_points("latency")
