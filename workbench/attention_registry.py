"""The one attention function workbench registers with transformers, and how a model is switched
to it and back (squeezed attention and KVQuant's fused decode both attach this way).

    with attention_state(model, state):      # state.attend(layer, q, k, v, scaling) -> out
        model(ids)                           # every attention layer calls state.attend

transformers looks the attention function up by `config._attn_implementation` in
`AttentionInterface` (a registry; nothing of transformers is copied or patched). The function
finds the active state by the model's config object (each attention module holds a reference to
it), so two models can run different states at once. A custom name receives
`attention_mask=None`: causality is applied here, and padded batches are not supported.
Without a state (e.g. another model that uses the same name) it falls back to dense causal SDPA.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

NAME = "workbench_attention"
_STATES: dict[int, object] = {}
_REGISTERED = False


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor | None:
    """(q_len, k_len) bool, True where query i (at position k_len - q_len + i) may see key j;
    None when every query sees every key (one query at the end)."""
    if q_len == 1:
        return None
    q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return torch.arange(k_len, device=device)[None, :] <= q_pos


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """Causal SDPA with GQA. q (b, hq, q_len, d); k, v (b, kv, k_len, d), the queries being the
    last q_len positions. Returns (b, hq, q_len, d)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    q_len, k_len = q.shape[2], k.shape[2]
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_len, k_len, q.device),
                                          scale=scaling)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered function: (module, q, k, v, mask, scaling) -> ((b, q_len, hq, d), None)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    state = _STATES.get(id(getattr(module, "config", None)))
    if state is None:
        out = dense_causal(query, key, value, scaling)
    else:
        out = state.attend(module.layer_idx, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function with transformers (once per process); returns its name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _attention)
        _REGISTERED = True
    return NAME


def _set_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the config field is what the attention modules read
        model.config._attn_implementation = name


@contextmanager
def attention_state(model, state):
    """Route every attention layer of `model` through `state.attend` inside the block."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise WorkbenchError("This needs a Hugging Face transformers model (one with .config); "
                             "load one with workbench.models.load_model().")
    if id(config) in _STATES:
        raise WorkbenchError(f"This model already runs a workbench attention state "
                             f"({type(_STATES[id(config)]).__name__}); leave that `with` block "
                             f"before entering another.")
    previous = config._attn_implementation or "sdpa"
    _set_implementation(model, register())
    _STATES[id(config)] = state
    try:
        yield state
    finally:
        _STATES.pop(id(config), None)
        _set_implementation(model, previous)
