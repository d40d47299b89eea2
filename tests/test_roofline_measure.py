"""Predicted vs measured: the committed H200 benchmark, and the CPU measurement path."""

import pytest

from workbench.roofline.measure import (
    chip_from_benchmark,
    compare,
    framework_latency,
    gpu_comparison,
    load_benchmark,
    measure_speed,
)
from workbench.roofline.units import format_table


def test_h200_benchmark_json_is_complete():
    bench = load_benchmark()
    assert bench["environment"]["device"] == "NVIDIA H200"
    assert {"torch", "date", "cuda"} <= set(bench["environment"])
    assert all(r["rel_err_vs_fp32"] < 2e-2 for r in bench["rows"])   # checked before timed
    assert {r["phase"] for r in bench["rows"]} == {"decode", "prefill"}
    assert chip_from_benchmark(bench).bandwidth > 3e12


def test_h200_decode_predictions_within_20_percent():
    rows = gpu_comparison()
    decode = [r for r in rows if r["phase"] == "decode"]
    assert len(decode) >= 10
    assert all(0.8 <= r["ratio"] <= 1.2 for r in decode), format_table(decode)
    assert all(0.8 <= r["ratio"] <= 1.2 for r in rows if r["phase"] == "prefill")
    eager = gpu_comparison(measured="eager_ms")
    assert min(r["ratio"] for r in eager) < 0.6     # eager launches: far off at batch 1


def test_compare_and_speed_on_the_embedded_model():
    from workbench.models import load_model

    model, tokenizer = load_model(device="cpu")
    rows = measure_speed(model, tokenizer, contexts=(16,), decode_steps=2, repeats=1)
    assert [r["phase"] for r in rows] == ["prefill", "decode"]
    assert all(r["seconds"] > 0 and r["tok_s"] > 0 for r in rows)
    table = compare(model, "h200", rows)
    assert table[1]["bound"] == "memory" and table[1]["ratio"] < 1   # a CPU is no H200
    overhead = framework_latency(model, steps=2)
    assert overhead["ops"] > 300 and 0 < overhead["latency_s"] < 1e-2


def test_measure_speed_refuses_too_long_contexts():
    from workbench.errors import WorkbenchError
    from workbench.models import load_model

    model, tokenizer = load_model(device="cpu")
    with pytest.raises(WorkbenchError, match="longer than the model allows"):
        measure_speed(model, tokenizer, contexts=(9000,))
