"""Check the roofline against reality: measured tokens/s next to predicted, as ratios.

    chip = measure_this_machine()                       # the ceilings of the machine at hand
    rows = measure_speed(model, tokenizer, contexts=(64, 256, 1024))   # real model, real text
    table = compare(model, chip, rows)                  # predicted / measured per row
    h200 = gpu_comparison()                             # the committed H200 benchmark JSON

Measured on a Hugging Face causal LM with its own forward pass and a `DynamicCache`, prompts
cut from real text (`workbench.data.text`, the Python language reference). Prefill: one forward
pass over the prompt (logits for the last token only, as generation does). Decode: greedy steps
after that prompt; one step's time is the fastest of the steps (on a shared CPU the fastest is
the least disturbed; the same rule measured the ceilings).
A ratio predicted/measured below 1 means the model ran slower than the roofline says.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.roofline.analysis import analyze
from workbench.roofline.hardware import Chip, get_chip
from workbench.roofline.shapes import fuse_projections, known_config, model_shape

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GPU_RESULTS = RESULTS / "roofline_h200.json"


def model_bits(model) -> int:
    """Bits per element of the model's parameters (32 for float32, 16 for bf16/fp16)."""
    return next(model.parameters()).element_size() * 8


def measure_speed(model, tokenizer, contexts=(64, 256, 1024), decode_steps: int = 8,
                  batch: int = 1, repeats: int = 2) -> list[dict]:
    """Prefill and decode times of `model` at each prompt length, on real text.

    Returns rows {phase, batch, context, seconds, tok_s}: one prefill row per context (fastest
    of `repeats`), one decode row per context (fastest of `decode_steps` steps per repeat).
    """
    import torch
    from transformers import DynamicCache

    from workbench.data.text import text_chunks

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(contexts) + decode_steps > limit:
        raise WorkbenchError(f"Context {max(contexts)} + {decode_steps} steps is longer than the "
                             f"model allows ({limit} positions).")
    device = next(model.parameters()).device
    rows = []
    for ctx in contexts:
        ids = text_chunks(tokenizer, ctx, batch).to(device)  # (batch, ctx) real text
        prefill, step = float("inf"), float("inf")
        for _ in range(repeats):
            cache = DynamicCache(config=model.config)
            with torch.inference_mode():
                t = time.perf_counter()
                out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
                prefill = min(prefill, time.perf_counter() - t)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
                for _ in range(decode_steps):
                    t = time.perf_counter()
                    out = model(nxt, cache=cache, use_cache=True)
                    step = min(step, time.perf_counter() - t)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        rows.append({"phase": "prefill", "batch": batch, "context": ctx, "seconds": prefill,
                     "tok_s": batch * ctx / prefill})
        rows.append({"phase": "decode", "batch": batch, "context": ctx, "seconds": step,
                     "tok_s": batch / step})
    return rows


def framework_latency(model, context: int = 64, steps: int = 8, width: int = 64) -> dict:
    """Fixed cost per operation of this software stack, from the same model at a tiny width.

    Builds `model`'s architecture with random weights at hidden size `width` (same depth, same
    modules, same Python code path), times its decode step, and divides by the number of ops
    the roofline counts for that step: what each op costs when it moves almost no bytes
    (dispatch, Python, thread wake-up). Returns {seconds_per_step, ops, latency_s}.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = copy.deepcopy(model.config)
    heads = max(1, width // 32)
    kv = max(1, heads * getattr(cfg, "num_key_value_heads", heads) // cfg.num_attention_heads)
    for key, value in {"hidden_size": width, "intermediate_size": 2 * width,
                       "num_attention_heads": heads, "num_key_value_heads": kv,
                       "head_dim": width // heads, "vocab_size": 512}.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    torch.manual_seed(0)
    tiny = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 512, (1, context))
    best = float("inf")
    with torch.inference_mode():
        cache = DynamicCache(config=cfg)
        out = tiny(ids, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t = time.perf_counter()
            out = tiny(nxt, cache=cache, use_cache=True)
            best = min(best, time.perf_counter() - t)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    a = analyze(tiny, get_chip("h200"), phase="decode", context=context)
    ops = sum(c.op.count for c in a.costs)
    return {"seconds_per_step": best, "ops": ops, "latency_s": best / ops}


def compare(model, chip: Chip | str, rows: list[dict], bits: int | None = None,
            flash: bool = True, blocks_only: bool = False) -> list[dict]:
    """Each measured row with its predicted time on `chip` and the ratio predicted/measured.

    model: what was measured (a loaded model, config, name or ModelShape). bits: its weight,
    activation and KV width (default: read from a loaded model, else 16).
    """
    if bits is None:
        bits = model_bits(model) if hasattr(model, "parameters") else 16
    shape = model_shape(model)
    out = []
    for r in rows:
        a = analyze(shape, chip, phase=r["phase"], batch=r["batch"], context=r["context"],
                    w_bits=bits, a_bits=bits, kv_bits=bits, flash=flash, blocks_only=blocks_only)
        out.append({"phase": r["phase"], "batch": r["batch"], "context": r["context"],
                    "measured ms": round(r["seconds"] * 1e3, 3),
                    "predicted ms": round(a.time * 1e3, 3),
                    "ratio": round(a.time / r["seconds"], 2), "bound": a.bound,
                    "FLOP/B": round(a.intensity, 1)})
    return out


def load_benchmark(path: str | Path = GPU_RESULTS) -> dict:
    """A benchmark JSON written by benchmarks/bench_roofline_*.py."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"No benchmark results at {path}. Run the benchmark script that "
                             "writes it (see benchmarks/bench_roofline_gpu.py).")
    return json.loads(path.read_text())


def chip_from_benchmark(bench: dict, base: str = "h200") -> Chip:
    """The catalog chip with the ceilings that benchmark measured swapped in."""
    c = bench["meta"]["ceilings"]
    if "error" in c:
        raise WorkbenchError(f"The benchmark could not measure ceilings: {c['error']}")
    return get_chip(base).with_ceilings(bandwidth=c["bandwidth_Bps"], flops16=c["matrix16_flops"],
                                        op_latency=c["op_latency_s"])


def gpu_comparison(bench: dict | None = None, measured: str = "compiled_graph_ms",
                   chip: Chip | str | None = None) -> list[dict]:
    """Predicted vs measured for every case of the H200 block benchmark.

    measured: which timing to compare against: 'compiled_graph_ms' (torch.compile + CUDA graph,
    the fused kernels a serving engine runs; the default), 'graph_ms' (eager kernels in a CUDA
    graph) or 'eager_ms' (eager PyTorch, launch overhead included). The block is priced with
    fused projections (its layout) and the ceilings the same run measured, unless `chip` is given.
    """
    bench = bench or load_benchmark()
    chip = chip_from_benchmark(bench) if chip is None else get_chip(chip)
    out = []
    for r in bench["rows"]:
        if measured not in r:
            continue
        shape = fuse_projections(model_shape(known_config(r["model"], num_hidden_layers=1)))
        a = analyze(shape, chip, phase=r["phase"], batch=r["batch"], context=r["context"],
                    blocks_only=True)
        ms = r[measured]
        out.append({"model": r["model"], "phase": r["phase"], "batch": r["batch"],
                    "context": r["context"], "measured ms": round(ms, 4),
                    "predicted ms": round(a.time * 1e3, 4), "ratio": round(a.time * 1e3 / ms, 2),
                    "bound": a.bound, "FLOP/B": round(a.intensity, 1),
                    "achieved GB/s": round(a.bytes / (ms * 1e-3) / 1e9),
                    "achieved TFLOP/s": round(a.flops / (ms * 1e-3) / 1e12, 1)})
    return out
