"""Run a fixed context through a model once and keep what the offline step needs.

    cap = capture_context(model, context_ids, window=64)
    cap.keys[layer]      # (kv_heads, context_len, d) post-RoPE keys, as the cache holds them
    cap.queries[layer]   # (q_heads, window, d) post-RoPE queries of the last `window` tokens
    cap.cache            # the DynamicCache of the context (reuse it for every user input)

The queries come from the attention function itself (registered through transformers'
attention registry), so they are exactly what attention sees: after RoPE, per query head.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from workbench.attention_registry import attention_state, dense_causal
from workbench.errors import WorkbenchError


@dataclass
class ContextCapture:
    """Keys, observation-window queries and the cache of one fixed context (batch 1)."""

    context_ids: torch.Tensor        # (context_len,) int64
    keys: list[torch.Tensor]         # per layer (kv_heads, context_len, d)
    queries: list[torch.Tensor]      # per layer (q_heads, window, d)
    cache: object                    # transformers DynamicCache holding the context


class _CaptureState:
    """Dense causal attention that also keeps the last `window` queries of every layer."""

    def __init__(self, context_len: int, window: int):
        self.context_len, self.window = context_len, window
        self.queries: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, scaling):
        k_len, q_len = k.shape[2], q.shape[2]
        first = self.context_len - self.window          # first window position
        start = k_len - q_len                            # position of q[:, :, 0]
        lo, hi = max(first, start), min(self.context_len, k_len)
        if lo < hi:
            part = q[0, :, lo - start:hi - start].detach().float().cpu()  # (hq, n, d)
            prev = self.queries.get(layer)
            self.queries[layer] = part if prev is None else torch.cat([prev, part], dim=1)
        return dense_causal(q, k, v, scaling)


def as_context_ids(context_ids) -> torch.Tensor:
    """Token ids as a 1-D int64 CPU tensor (accepts a list, (n,) or (1, n))."""
    ids = torch.as_tensor(context_ids, dtype=torch.long).cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise WorkbenchError(f"The fixed context must be one non-empty sequence of token ids, "
                             f"got shape {tuple(ids.shape)}.")
    return ids


def context_hash(context_ids) -> str:
    """sha256 of the exact token ids (int64, in order): names the fixed context."""
    return hashlib.sha256(as_context_ids(context_ids).numpy().tobytes()).hexdigest()


def model_fingerprint(model) -> str:
    """Names a model by its attention shape and a hash of its first key projection's weights
    (rounded to bfloat16, so the same model in float32 on a CPU or bfloat16 on a GPU matches)."""
    cfg = model.config
    name = None
    for pname, param in model.named_parameters():
        if "k_proj" in pname or "key" in pname:
            name, weight = pname, param
            break
    if name is None:
        name, weight = next(iter(model.named_parameters()))
    digest = hashlib.sha256(weight.detach().to("cpu", torch.bfloat16).view(torch.int16)
                            .numpy().tobytes()).hexdigest()[:16]
    return (f"{cfg.model_type}:{cfg.num_hidden_layers}L:{cfg.num_attention_heads}q:"
            f"{getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads)}kv:{digest}")


def cache_kwargs(model, cache) -> dict:
    """{"cache": cache} where the model's forward takes `cache` (transformers >= 5.2x), else
    {"past_key_values": cache} (older 5.x, e.g. the GPU image's 5.17). Works for generate too."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


@torch.no_grad()
def capture_context(model, context_ids, window: int = 64, chunk: int = 2048) -> ContextCapture:
    """Prefill `context_ids` (dense attention, in chunks of `chunk` tokens) and capture the
    post-RoPE keys of every layer and the queries of the last `window` tokens."""
    from transformers import DynamicCache

    ids = as_context_ids(context_ids)
    n = ids.numel()
    limit = max_positions(model)
    if limit and n > limit:
        raise WorkbenchError(f"The fixed context has {n} tokens; the model allows {limit}.")
    if not 0 < window < n:
        raise WorkbenchError(f"window must be in [1, {n - 1}] for a {n}-token context, "
                             f"got {window}.")
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    state = _CaptureState(n, window)
    with attention_state(model, state):
        for s in range(0, n, chunk):
            model(ids[None, s:s + chunk].to(device), use_cache=True, **cache_kwargs(model, cache))
    keys = [layer.keys[0].detach() for layer in cache.layers]              # (kv, n, d) each
    queries = [state.queries[i] for i in range(len(keys))]
    return ContextCapture(context_ids=ids, keys=keys, queries=queries, cache=cache)


class _QueryState:
    """Dense causal attention that keeps the queries of the user tokens (after the context)."""

    def __init__(self, context_len: int):
        self.context_len = context_len
        self.queries: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, scaling):
        start = k.shape[2] - q.shape[2]
        skip = max(0, self.context_len - start)
        part = q[0, :, skip:].detach().float().cpu()                        # (hq, u, d)
        prev = self.queries.get(layer)
        self.queries[layer] = part if prev is None else torch.cat([prev, part], dim=1)
        return dense_causal(q, k, v, scaling)


@torch.no_grad()
def capture_user_queries(model, cache, user_ids, context_len: int) -> torch.Tensor:
    """Post-RoPE queries of a user input that follows the cached context (dense attention).
    cache: the context's cache (copied, not changed). Returns (layers, q_heads, u, d) float32."""
    import copy

    device = next(model.parameters()).device
    ids = torch.as_tensor(user_ids, dtype=torch.long).reshape(1, -1).to(device)
    state = _QueryState(context_len)
    with attention_state(model, state):
        model(ids, use_cache=True, **cache_kwargs(model, copy.deepcopy(cache)))
    return torch.stack([state.queries[i] for i in range(len(state.queries))])
