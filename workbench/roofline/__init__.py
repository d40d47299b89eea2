"""Roofline analysis of any transformers model on any accelerator (AI and Memory Wall).

    from workbench.roofline import analyze, get_chip, measure_this_machine
    a = analyze("llama-2-7b", "h200", phase="decode", batch=1, context=4096)
    print(a.summary())                     # intensity vs ridge, bound, time, memory, what fits
    kv_bits_gain("llama-3-8b", "h200", context=32768)   # what a 3-bit KV cache buys

Files, one concept each:
  hardware.py / hardware.csv   the chip catalog (a source per row) and `get_chip`
  microbench.py                `measure_this_machine`: measured ceilings of the machine at hand
  shapes.py / model_configs.json   `model_shape`: any transformers config or model -> shapes
  ops.py                       FLOPs and bytes per operation (prefill, decode, encode)
  analysis.py                  `analyze`: totals, bound, predicted time, memory, max batch/context
  whatif.py                    sweeps and `kv_bits_gain`
  measure.py                   measured vs predicted (this CPU; the committed H200 benchmark)
  trends.py / model_sizes.csv  growth rates fitted from dated tables
  layer.py                     a plain-PyTorch Llama block with a static cache (GPU benchmark)
"""

from workbench.roofline.analysis import Analysis, Footprint, analyze, footprint
from workbench.roofline.hardware import Chip, catalog, chip_names, get_chip
from workbench.roofline.microbench import measure_this_machine
from workbench.roofline.ops import Bits, Op, Workload, count_ops
from workbench.roofline.shapes import (
    ModelShape,
    fuse_projections,
    known_config,
    known_models,
    model_shape,
)
from workbench.roofline.units import format_table
from workbench.roofline.whatif import kv_bits_gain, sweep, sweep_table

__all__ = [
    "Analysis", "Bits", "Chip", "Footprint", "ModelShape", "Op", "Workload", "analyze",
    "catalog", "chip_names", "count_ops", "footprint", "format_table", "fuse_projections",
    "get_chip", "known_config", "known_models", "kv_bits_gain", "measure_this_machine",
    "model_shape", "sweep", "sweep_table",
]
