"""GPU/CPU benchmarks. `benchmarks.harness` times a callable and writes JSON to results/; each
`bench_*.py` module checks correctness on the device first, then times kernel vs baselines
(`python -m benchmarks.bench_lse_merge`)."""
