"""The chip catalog, datasheet ridge points, lookups, and the measured ceilings."""

import json

import pytest

from workbench.errors import WorkbenchError
from workbench.roofline import catalog, get_chip
from workbench.roofline.measure import GPU_RESULTS

# every chip of shared/facts/hardware.md: key -> (dense 16-bit TFLOP/s, GB/s, memory GB)
HARDWARE_MD = {
    "p100": (21.2, 732, 16), "v100": (125, 900, 32), "t4": (65, 320, 16), "a100": (312, 2039, 80),
    "h100": (989, 3350, 80), "h200": (989, 4800, 141), "b200": (2250, 8000, 180),
    "l4": (121, 300, 24), "rtx4090": (165, 1008, 24), "mi250x": (383, 3277, 128),
    "mi300x": (1307, 5300, 192), "tpu-v3": (123, 900, 32), "tpu-v4": (275, 1200, 32),
    "tpu-v5e": (197, 819, 16), "tpu-v5p": (459, 2765, 95),
}


def test_every_hardware_md_chip_is_in_the_catalog_with_its_figures():
    for key, (tflops, gbs, gb) in HARDWARE_MD.items():
        chip = get_chip(key)
        assert chip.flops_for(16) == pytest.approx(tflops * 1e12), key
        assert chip.bandwidth == pytest.approx(gbs * 1e9), key
        assert chip.memory == pytest.approx(gb * 1e9), key


def test_catalog_rows_are_sane_and_sourced():
    keys = [c.key for c in catalog()]
    assert len(keys) == len(set(keys))
    for c in catalog():
        assert c.source.strip(), c.key
        assert 2006 <= c.year <= 2026 and c.kind in ("gpu", "tpu", "cpu")
        assert c.bandwidth > 5e10 and c.memory >= 1e9 and c.peak_flops > 1e11
        assert c.tier in ("flagship", "inference", "consumer", "measured")


def test_ridge_points_quoted_in_hardware_md():
    for key, ridge in {"a100": 153, "h100": 295, "h200": 206, "b200": 281, "mi300x": 247}.items():
        assert get_chip(key).ridge(16) == pytest.approx(ridge, rel=0.01)


def test_bit_width_fallbacks():
    h200, v100 = get_chip("h200"), get_chip("v100")
    assert h200.flops_for(8) == pytest.approx(1979e12)
    assert h200.flops_for(4) == h200.flops_for(8)        # no 4-bit units: next wider
    assert v100.flops_for(8) == v100.flops_for(16)       # no 8-bit units listed
    assert h200.flops_for(32) == pytest.approx(67e12)    # fp32 runs off the matrix units
    assert get_chip("tpu-v4").flops_for(32) == pytest.approx(275e12)  # nothing wider listed


def test_lookup_by_name_and_clear_errors():
    assert get_chip("NVIDIA H200 SXM").key == "h200"
    assert get_chip("H-100").key == "h100"
    with pytest.raises(WorkbenchError, match="Did you mean 'h200'"):
        get_chip("h300")
    with pytest.raises(WorkbenchError, match="matches several"):
        get_chip("tpu")
    with pytest.raises(WorkbenchError, match="a name like"):
        get_chip(200)


def test_measured_h200_row_comes_from_the_committed_benchmark():
    bench = json.loads(GPU_RESULTS.read_text())
    c = bench["meta"]["ceilings"]
    chip = get_chip("h200-measured")
    assert chip.measured and "roofline_h200.json" in chip.source
    assert chip.bandwidth == pytest.approx(c["bandwidth_Bps"], rel=1e-3)
    assert chip.flops_for(16) == pytest.approx(c["matrix16_flops"], rel=1e-3)
    assert chip.op_latency == pytest.approx(c["op_latency_s"], rel=1e-2)
    assert chip.bandwidth < get_chip("h200").bandwidth   # datasheets overpromise


def test_measure_this_machine_on_cpu():
    from workbench.roofline import measure_this_machine

    chip = measure_this_machine("cpu")
    assert chip.kind == "cpu" and chip.measured
    assert 1e8 < chip.bandwidth < 1e12 and 1e8 < chip.flops_for(32) < 1e13
    assert chip.op_latency >= 0 and chip.memory > 1e9
    assert set(chip.extra) >= {"copy_Bps", "stream", "fp32_flops"}
