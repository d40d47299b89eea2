"""KVQuant: calibrated non-uniform KV-cache quantization with a real packed cache.

    from workbench.kvquant import KVQuantCache, load_calibration, method
    model, tok = load_model()
    calib = load_calibration(model)                 # committed calibration of the embedded model
    cache = KVQuantCache(model, "nuq3-1%", calib)   # packed 3-bit codes + 1% sparse outliers
    model.generate(ids, past_key_values=cache, max_new_tokens=40)
    cache = KVQuantCache(model, "nuq3-1%", calib, recent_window=64)   # fast generate on a GPU
    with fused_decode(model, cache):                # decode reads the packed codes directly
        model.generate(ids, past_key_values=cache, max_new_tokens=40)

Files: `methods` (switchable settings, baselines, ablations), `levels` (uniform / NF / k-means
levels, Q-Norm), `packing` (bit planes), `quantize` (reference quantizers; KVQuant's values in the Hadamard
basis of `kernels.hadamard`), `anatomy` (model
parts, RoPE undo/redo), `calibration` (Fisher, ranges, histograms; save/load), `cache` (the
transformers Cache), `evaluate` (perplexity tables; `python -m workbench.kvquant.evaluate`),
`fused` (the cache as the fused decode kernel's input), `attend` (`fused_decode`: the kernel inside
`model.generate`).
"""

from workbench.kvquant.anatomy import KVGeometry, Rotary, geometry
from workbench.kvquant.attend import FusedDecode, fused_decode
from workbench.kvquant.cache import KVQuantCache, KVQuantLayer
from workbench.kvquant.calibration import Calibration, calibrate
from workbench.kvquant.evaluate import (
    check_targets,
    evaluate,
    forward_with_cache,
    heldout_windows,
    kl_to_reference,
    load_calibration,
    markdown_table,
    perplexity,
)
from workbench.kvquant.levels import SUPPORTED_BITS, kmeans_levels, nf_levels, uniform_levels
from workbench.kvquant.methods import QuantSpec, ablation, leave_one_out, method
from workbench.kvquant.quantize import LayerTables, Quantized, dequantize, quantize

__all__ = [
    "KVGeometry", "Rotary", "geometry",
    "FusedDecode", "fused_decode",
    "KVQuantCache", "KVQuantLayer",
    "Calibration", "calibrate",
    "check_targets", "evaluate", "forward_with_cache", "heldout_windows", "kl_to_reference",
    "load_calibration", "markdown_table", "perplexity",
    "SUPPORTED_BITS", "kmeans_levels", "nf_levels", "uniform_levels",
    "QuantSpec", "ablation", "leave_one_out", "method",
    "LayerTables", "Quantized", "dequantize", "quantize",
]
