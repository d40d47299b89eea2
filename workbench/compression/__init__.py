"""Prompt compression: extractive, abstractive and token-pruning methods behind one interface.

    from workbench.compression import compress, METHODS, Target
    r = compress(document, "What is the access code?", target=8, method="sentence-bm25")
    r.text, r.kept_spans, r.requested_ratio, r.achieved_ratio, r.seconds

Methods: none, truncate; sentence-/paragraph- x bm25/minilm/lm (extractive); abstractive;
llmlingua, longllmlingua (token pruning). The achieved ratio matches the requested one within
5% (see base.py); the benchmark lives in `workbench.compression.benchmark`.
"""

from workbench.compression.base import TOLERANCE, CompressionResult, Compressor, Target
from workbench.compression.methods import DESCRIPTIONS, METHODS, compress, get_compressor

__all__ = ["CompressionResult", "Compressor", "DESCRIPTIONS", "METHODS", "TOLERANCE", "Target",
           "compress", "get_compressor"]
