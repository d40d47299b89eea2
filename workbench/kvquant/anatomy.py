"""What KVQuant needs to know about a Llama-like Hugging Face model: its attention modules, the
KV geometry, and its rotary embedding (to undo and redo RoPE on keys).

Any decoder whose layers have `self_attn.k_proj` / `self_attn.v_proj` and whose base model has a
`rotary_emb` module with the usual `rotary_emb(x, position_ids) -> (cos, sin)` interface works
(Llama, Mistral, Qwen2, SmolLM, ...). GQA is the normal case: kv_heads may be fewer than heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class KVGeometry:
    """Shape of a model's KV cache: layers, KV heads, query heads, head_dim."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int

    def fp16_bytes_per_token(self) -> int:
        """Bytes one token takes in an fp16 KV cache over all layers (keys and values)."""
        return 2 * 2 * self.layers * self.kv_heads * self.head_dim


def _decoder(model):
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise WorkbenchError(f"{type(model).__name__} has no `.model.layers`: KVQuant works on "
                             "Llama-like decoder models (Llama, Mistral, Qwen2, SmolLM, ...).")
    return base, layers


def attention_modules(model) -> list:
    """The `self_attn` module of every decoder layer; each must have k_proj and v_proj."""
    _, layers = _decoder(model)
    mods = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "k_proj") or not hasattr(attn, "v_proj"):
            raise WorkbenchError(
                f"Layer {i} of {type(model).__name__} has no self_attn.k_proj / v_proj: KVQuant "
                "quantizes those projections' outputs and needs separate key and value "
                "projections (fused qkv models are not supported).")
        mods.append(attn)
    return mods


def geometry(model) -> KVGeometry:
    """The KV geometry from the model's config (checked against its attention modules)."""
    attention_modules(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    q_heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or q_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads
    return KVGeometry(cfg.num_hidden_layers, kv_heads, q_heads, head_dim)


def model_fingerprint(model) -> dict:
    """Identity of a model for calibration files: name, shapes and a checksum of layer 0's k_proj."""
    geo = geometry(model)
    w = attention_modules(model)[0].k_proj.weight.detach().float()
    checksum = float(w.abs().sum()) + float(w[:4].sum())
    return {"model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
            "architecture": type(model).__name__, "layers": geo.layers, "kv_heads": geo.kv_heads,
            "q_heads": geo.q_heads, "head_dim": geo.head_dim,
            "k_proj_checksum": round(checksum, 2)}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dim (the Llama RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """The model's rotary embedding as cos/sin tables by position, with apply and undo.

    cos/sin: (seq, head_dim) float32. `apply(x, cos, sin)` is what the model does to keys;
    `undo` inverts it exactly up to rounding (it also divides out an attention scaling, if the
    RoPE variant has one).
    """

    def __init__(self, model):
        base, _ = _decoder(model)
        self.module = getattr(base, "rotary_emb", None)
        if self.module is None:
            raise WorkbenchError(f"{type(model).__name__} has no `model.rotary_emb`: pre-RoPE key "
                                 "quantization needs the model's rotary embedding.")
        self.head_dim = geometry(model).head_dim
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin_range(self, start: int, stop: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (stop - start, head_dim) of positions start..stop-1: slices of a table
        computed once per power-of-two length (the same numbers: each is one product and one
        cos/sin), so a decode step costs two slices; computed each call for RoPE variants
        that change with the sequence length (dynamic, longrope)."""
        kind = getattr(self.module, "rope_type", "default")
        if not isinstance(kind, str) or "dynamic" in kind or "longrope" in kind:
            return self.cos_sin(torch.arange(start, stop, device=device))
        tab = self._table
        if tab is None or tab[0].shape[0] < stop or tab[0].device != torch.device(device):
            cap = max(1024, 1 << max(0, stop - 1).bit_length())
            tab = self._table = self.cos_sin(torch.arange(cap, device=device))
        return tab[0][start:stop], tab[1][start:stop]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (seq,) long -> cos, sin (seq, head_dim) float32."""
        probe = torch.empty(1, dtype=torch.float32, device=positions.device)
        cos, sin = self.module(probe, positions[None].long())
        return cos[0].float(), sin[0].float()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (..., seq, head_dim) pre-RoPE -> post-RoPE, in x's dtype (computed in float32)."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    @staticmethod
    def undo(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (..., seq, head_dim) post-RoPE -> pre-RoPE (the inverse rotation)."""
        xf = x.float()
        norm = cos * cos + sin * sin                               # 1 unless RoPE is scaled
        return ((xf * cos - rotate_half(xf) * sin) / norm).to(x.dtype)
