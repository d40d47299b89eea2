"""What-if questions on top of `analyze`: sweeps, and what a lower-bit KV cache buys.

    rows = kv_bits_gain("llama-3-8b", "h200", context=32768)   # 16 vs 8/4/3/2-bit KV
    runs = sweep("llama-2-7b", "h200", "batch", [1, 4, 16, 64], context=4096)
    print(format_table(sweep_table(runs, "batch")))

`kv_bits_gain` is the comparison the KV-quantization notebook reuses: for each KV width, the
bytes of the cache, the predicted decode step time and tokens/s at (batch, context), and the
longest context / largest batch that fit next to the weights. Bit widths are effective bits
per element: pass 3.25 for 3-bit codes plus one fp16 scale per 64 values, and so on.
"""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.roofline.analysis import Analysis, analyze
from workbench.roofline.hardware import Chip
from workbench.roofline.shapes import model_shape

SWEEPABLE = ("batch", "context", "w_bits", "a_bits", "kv_bits", "flash", "phase")


def sweep(model, chip: str | Chip, vary: str, values, **kwargs) -> list[Analysis]:
    """One `analyze` per value of `vary` (batch, context, w_bits, a_bits, kv_bits, flash)."""
    if vary not in SWEEPABLE:
        raise WorkbenchError(f"Cannot sweep {vary!r}; sweepable: {', '.join(SWEEPABLE)}.")
    shape = model_shape(model)
    return [analyze(shape, chip, **{**kwargs, vary: v}) for v in values]


def sweep_table(analyses: list[Analysis], vary: str) -> list[dict]:
    """Rows: the swept value, time per pass, tokens/s, intensity, bound, memory, fits."""
    rows = []
    for a in analyses:
        value = getattr(a.workload, vary, None)
        if value is None:
            value = getattr(a.bits, vary.replace("_bits", ""), None) if vary.endswith("_bits") \
                else getattr(a, vary, None)
        rows.append({vary: value, "ms / pass": round(a.time * 1e3, 3),
                     "tok/s": round(a.tokens_per_s, 1), "FLOP/B": round(a.intensity, 2),
                     "bound": a.bound, "memory GB": round(a.memory.total / 1e9, 2),
                     "fits": a.memory.fits})
    return rows


def kv_bits_gain(model, chip: str | Chip = "h200", context: int = 32768, batch: int = 1,
                 bits=(16, 8, 4, 3, 2), w_bits: float = 16, a_bits: float = 16,
                 memory_fraction: float = 0.9, flash: bool = True) -> list[dict]:
    """What each KV-cache width buys at (batch, context): bytes, decode speed, what fits.

    Returns one row per width: kv_bits, KV cache GB, decode ms per step, tokens/s (whole
    batch), speedup over the first width, and the longest context (at `batch`) and largest
    batch (at `context`) that fit in `memory_fraction` of the chip's memory with the weights.
    """
    shape = model_shape(model)
    if not shape.is_decoder:
        raise WorkbenchError(f"{shape.name} is an encoder: it keeps no KV cache.")
    rows, base = [], None
    for kv in bits:
        a = analyze(shape, chip, phase="decode", batch=batch, context=context, w_bits=w_bits,
                    a_bits=a_bits, kv_bits=kv, flash=flash, memory_fraction=memory_fraction)
        base = base or a.time
        rows.append({"kv_bits": kv, "KV GB": round(a.memory.kv_cache / 1e9, 3),
                     "decode ms": round(a.time * 1e3, 3), "tok/s": round(a.tokens_per_s, 1),
                     "speedup": round(base / a.time, 2), "max context": a.max_context,
                     "max batch": a.max_batch, "fits": a.memory.fits})
    return rows
