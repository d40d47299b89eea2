"""What the KV distribution explorer shows, computed: captured keys/values of a real text window,
per-method reconstruction errors, and the memory a KV cache needs at each bit width.

    kv = capture_kv(model, ids)                 # per layer: pre-/post-RoPE keys, values
    errors = reconstruction_errors(kv, layer, calibration, bits=3)
    rows = max_context("llama-3-8b", "h200")    # longest context that fits, per method
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.kvquant.anatomy import Rotary, attention_modules, geometry
from workbench.kvquant.calibration import default_tables
from workbench.kvquant.methods import method
from workbench.kvquant.quantize import dequantize, quantize


@dataclass
class CapturedKV:
    """Keys and values of one window, per layer: (layers, H, T, D) float32 each."""

    keys_pre: torch.Tensor
    keys_post: torch.Tensor
    values: torch.Tensor


@torch.no_grad()
def capture_kv(model, ids: torch.Tensor) -> CapturedKV:
    """Run `ids` (T,) or (1, T) through the model and keep every layer's k_proj / v_proj output
    (pre-RoPE keys, values) and the keys after RoPE."""
    geo, attn = geometry(model), attention_modules(model)
    ids = torch.as_tensor(ids).reshape(1, -1)
    grab: dict = {}
    hooks = [m.k_proj.register_forward_hook(lambda _m, _i, o, i=i: grab.__setitem__(("k", i), o))
             for i, m in enumerate(attn)]
    hooks += [m.v_proj.register_forward_hook(lambda _m, _i, o, i=i: grab.__setitem__(("v", i), o))
              for i, m in enumerate(attn)]
    try:
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    t = ids.shape[1]

    def stack(kind):
        return torch.stack([grab[(kind, i)][0].float().view(t, geo.kv_heads, geo.head_dim)
                            .transpose(0, 1).cpu() for i in range(geo.layers)])

    k_pre, v = stack("k"), stack("v")
    cos, sin = Rotary(model).cos_sin(torch.arange(t))
    return CapturedKV(k_pre, Rotary.apply(k_pre, cos, sin), v)


def reconstruction_errors(kv: CapturedKV, layer: int, calibration, bits: int = 3) -> list[dict]:
    """Relative error ||x - dequant(quant(x))|| / ||x|| of one layer's keys and values for
    ATOM-like, KIVI-like, nuq<b> and nuq<b>-1% (the sink token is left out of the error)."""
    rows = []
    for spec in (method("atom", bits), method("kivi", bits), method(f"nuq{bits}"),
                 method(f"nuq{bits}-1%")):
        tables = (calibration.tables(layer, spec) if spec.needs_calibration
                  else default_tables(spec))
        row = {"method": spec.name}
        t = kv.values.shape[2] // spec.key_token_group * spec.key_token_group
        for kind, x in (("keys", kv.keys_pre if spec.pre_rope else kv.keys_post),
                        ("values", kv.values)):
            x = x[layer][None, :, :t]                                  # (1, H, T, D)
            q = quantize(x, spec, kind[0], tables)
            err = dequantize(q, spec, kind[0], tables) - x
            row[kind] = float(err[:, :, 1:].norm() / x[:, :, 1:].norm())
        rows.append(row)
    return rows


def bits_per_element(bits: int | None, head_dim: int, outlier_fraction: float) -> float:
    """Storage per K/V element in the fused kernel's layout: codes + the values' fp16 zero and
    scale per token (averaged over keys and values) + 4 bytes per sparse entry."""
    if bits is None:
        return 16.0
    return bits + 16.0 / head_dim + 32.0 * outlier_fraction


def max_context(model: str, chip: str = "h200", batch: int = 1, weight_bits: int = 16,
                usable: float = 0.9) -> list[dict]:
    """Longest context whose KV cache fits next to the weights, for fp16 and nuq2/3/4-1%.

    Uses the roofline module's model shapes and chip memory; `usable` is the fraction of the
    device memory given to weights + KV cache.
    """
    from workbench.roofline import get_chip, model_shape

    shape, dev = model_shape(model), get_chip(chip)
    free = usable * dev.memory - shape.params * weight_bits / 8
    rows = []
    for name, b, f in (("fp16", None, 0.0), ("nuq4-1%", 4, 0.01), ("nuq3-1%", 3, 0.01),
                       ("nuq2-1%", 2, 0.01)):
        per_token = shape.kv_elements_per_token() * bits_per_element(b, shape.head_dim, f) / 8
        rows.append({"method": name, "bits_per_element": bits_per_element(b, shape.head_dim, f),
                     "kv_bytes_per_token": per_token,
                     "max_context": max(0, int(free / (per_token * batch)))})
    return rows
