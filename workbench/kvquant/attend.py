"""KVQuant's fused decode inside `model.generate`: one query token attends to the packed cache
through `kernels.kvquant_decode` (the Triton kernel on a GPU, its PyTorch reference elsewhere).

    cache = KVQuantCache(model, "nuq3-1%", calibration)
    with fused_decode(model, cache):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=50)

Inside the block every attention layer of `model` runs through workbench's registered attention
function (`workbench.attention_registry`; nothing of transformers is copied). A step with one
query token (decode) skips the dequantized copy of the cache: the kernel reads the packed codes,
ranges and sparse outliers of the quantized tokens (`KVQuantLayer.packed`, made once per flush
of the cache's recent window; its block-CSR of outliers grows block by block,
`fused.GrowingPack`); attention over the recent (unquantized) window
(`kernels.window_decode.window_attention`, one launch on a GPU) gives a partial that the
kernel's split merge takes as one more part (one log-sum-exp merge launch for both). A step
with several query tokens (prefill) attends to the dequantized cache with causal SDPA, as
outside the block. Both see the same keys and values as the cache gives
without the block; the numbers differ only by rounding. Needs KVQuant's pre-RoPE nuq methods
(calibrated per-channel key ranges) and a head_dim the kernel takes (a power of two, 32-256);
batches of equal-length prompts only (no padding mask).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from kernels.kvquant_decode import kvquant_decode_attention
from kernels.window_decode import window_attention
from workbench.attention_registry import attention_state, dense_causal
from workbench.errors import WorkbenchError


class FusedDecode:
    """The attention state of `fused_decode`: `attend(layer, q, k, v, scaling)`."""

    def __init__(self, cache, backend: str = "auto"):
        self.cache, self.backend = cache, backend
        self.fused_steps = 0                       # decode layer-steps run by the fused kernel

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """q (B, Hq, n, D) post-RoPE; k, v what the cache returned. Returns (B, Hq, n, D)."""
        if q.shape[2] != 1:
            return dense_causal(q, k, v, scaling)
        layer = self.cache.layers[layer_idx]
        d = q.shape[-1]
        packed, recent = layer.packed(), layer.recent()
        window = None
        if recent is not None:          # one launch on a GPU: (o, lse) float32 partial
            window = window_attention(q[:, :, 0], *recent, scaling, backend=self.backend)
        if packed is None:
            return window[0].to(q.dtype)[:, :, None]
        # the kernel scales scores by 1/sqrt(D); a model with another scaling gets it via q
        qs = q[:, :, 0] * (scaling * math.sqrt(d)) if scaling != d ** -0.5 else q[:, :, 0]
        self.fused_steps += 1
        out = kvquant_decode_attention(qs, packed, backend=self.backend, extra_partial=window)
        return out[:, :, None]                               # the window merged with the splits


def check_fusable(cache) -> None:
    """Clear errors for caches the fused kernel cannot read."""
    spec = cache.spec
    if spec.is_fp16 or not spec.pre_rope or spec.key_axis != "channel" or \
            spec.key_ranges != "calibrated":
        raise WorkbenchError(f"fused_decode needs KVQuant's pre-RoPE keys with calibrated "
                             f"per-channel ranges (e.g. 'nuq3-1%'), not {spec.name!r}.")
    d = cache.geometry.head_dim
    if d < 32 or d > 256 or d & (d - 1):
        raise WorkbenchError(f"fused_decode: the kernel takes head_dim a power of two from 32 "
                             f"to 256; this model has {d}.")


@contextmanager
def fused_decode(model, cache, backend: str = "auto"):
    """Decode steps of `model` with `cache` (a `KVQuantCache`) read the packed codes through the
    fused kernel inside the block (module docstring). backend: "auto" (Triton on a GPU, the
    PyTorch reference elsewhere), "triton" or "torch". Yields the `FusedDecode` state."""
    check_fusable(cache)
    for layer in cache.layers:
        layer.start_fused()
    state = FusedDecode(cache, backend)
    try:
        with attention_state(model, state):
            yield state
    finally:
        for layer in cache.layers:
            layer.stop_fused()
