"""Online squeezed attention on a loaded Hugging Face model.

    index = build_index(model, context_ids)
    with squeezed_attention(model, index, budget=1/8) as sq:     # hierarchical=, block_size=
        out = model.generate(torch.cat([context_ids, user_ids])[None], max_new_tokens=20)
    sq.kept_fraction()                                            # budget actually spent

Inside the block every attention layer of the model splits the keys it sees into the fixed
context (the first `context_len` positions of the cache) and the user tokens after it:

- queries at context positions (the context being prefilled) get plain causal attention, so the
  context can be prefilled inside the block, or reused from a cache prefilled outside it;
- queries at user positions attend (1) the context keys their selector keeps for their block of
  queries and KV head, and (2) all earlier user tokens, causally; the two partial results are
  merged by log-sum-exp (`kernels.lse_merge`). Prefill (many user tokens) and decode (one per
  step) take the same path.

On CPU tensors the context part is a masked dense computation in PyTorch (same result as the
gathered sparse kernel, easier to read); on CUDA tensors it runs the Triton kernels of
`kernels.squeezed_attention` on the kept indices (`backend` as in `kernels.dispatch`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from kernels.lse_merge import merge_attention_partials
from workbench.attention_registry import attention_state, dense_causal
from workbench.errors import WorkbenchError
from workbench.squeezed.capture import max_positions
from workbench.squeezed.index import SqueezedIndex
from workbench.squeezed.lookup import block_count
from workbench.squeezed.selectors import DEVICE_ALLOCATIONS, Selector, SqueezedSelector


def selection_block(q_len: int, block_size: int | None) -> int:
    """Queries per selection block (the last block may be shorter)."""
    nb = block_count(q_len, block_size)
    return math.ceil(q_len / nb) if block_size is None else min(block_size, q_len)


def masked_context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor, block_size: int | None, scaling: float):
    """Attention of q over the context keys that `mask` keeps, with its log-sum-exp.

    q (b, hq, q_len, d); k, v (b, kv, n, d); mask (b, kv, n_blocks, n) bool, one key set per
    block of queries. Returns (o (b, hq, q_len, d) in q.dtype, lse (b, hq, q_len) float32;
    a query with no kept key gets lse -inf and o 0). Computes in float32.
    """
    b, hq, q_len, d = q.shape
    kv = k.shape[1]
    g = hq // kv
    bs = selection_block(q_len, block_size)
    blk = torch.arange(q_len, device=q.device) // bs                        # (q_len,)
    x = q.float().reshape(b, kv, g, q_len, d)
    s = torch.einsum("bhgqd,bhnd->bhgqn", x, k.float()) * scaling           # (b, kv, g, q, n)
    s = s.masked_fill(~mask[:, :, blk][:, :, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)                                        # (b, kv, g, q)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    o = torch.einsum("bhgqn,bhnd->bhgqd", p, v.float())
    return o.reshape(b, hq, q_len, d).to(q.dtype), lse.reshape(b, hq, q_len)


def causal_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float):
    """Causal attention of the last q_len positions over k_len keys, with log-sum-exp.
    q (b, hq, q_len, d); k, v (b, kv, k_len, d). Returns (o (b, hq, q_len, d), lse (b, hq, q_len))."""
    b, hq, q_len, d = q.shape
    kv, k_len = k.shape[1], k.shape[2]
    g = hq // kv
    x = q.float().reshape(b, kv, g, q_len, d)
    s = torch.einsum("bhgqd,bhnd->bhgqn", x, k.float()) * scaling           # (b, kv, g, q, k_len)
    q_pos = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
    s = s.masked_fill(torch.arange(k_len, device=q.device)[None, :] > q_pos, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhgqn,bhnd->bhgqd", torch.exp(s - lse[..., None]), v.float())
    return o.reshape(b, hq, q_len, d).to(q.dtype), lse.reshape(b, hq, q_len)


class SqueezedAttention:
    """The state the registered attention function calls: `attend(layer, q, k, v, scaling)`."""

    def __init__(self, selector: Selector, context_len: int, *, max_len: int = 0,
                 index: SqueezedIndex | None = None, backend: str = "auto"):
        self.selector, self.context_len, self.max_len = selector, context_len, max_len
        self.index, self.backend = index, backend
        self._checked: set[int] = set()
        self.kept: dict[int, list[float]] = {}       # layer -> kept fraction per call
        self.kept_by_head: dict[int, torch.Tensor] = {}  # layer -> (kv,) sum of kept fractions
        self.calls: dict[int, int] = {}

    def attend(self, layer, q, k, v, scaling):
        k_len, q_len = k.shape[2], q.shape[2]
        n = self.context_len
        if self.max_len and k_len > self.max_len:
            raise WorkbenchError(
                f"The fixed context ({n} tokens) plus the user input reach {k_len} tokens; the "
                f"model allows {self.max_len}. Shorten the user input or the context.")
        start = k_len - q_len                                  # position of the first query
        if k_len <= n or start + q_len <= n:                   # still prefilling the context
            return dense_causal(q, k, v, scaling)
        outs = []
        if start < n:                                          # context queries of this call
            outs.append(dense_causal(q[:, :, :n - start], k[:, :, :n], v[:, :, :n], scaling))
            q = q[:, :, n - start:]
        if self.index is not None and layer not in self._checked:
            self.index.check_keys(layer, k[:, :, :n])
            self._checked.add(layer)
        outs.append(self._user_attention(layer, q, k, v, scaling))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _record(self, layer, frac: torch.Tensor) -> None:
        """frac (kv,): the share of the context kept per KV head in this call."""
        self.kept.setdefault(layer, []).append(float(frac.mean()))
        self.kept_by_head[layer] = self.kept_by_head.get(layer, 0) + frac.float().cpu()
        self.calls[layer] = self.calls.get(layer, 0) + 1

    def _fast_path(self, layer, q, k, v):
        """The kernel path (CUDA, squeezed selector): lookup and selection on the device."""
        from workbench.squeezed.fastpath import DevicePlan, fast_squeezed_attention

        sel = self.selector
        key = (str(q.device), q.dtype)
        if getattr(self, "_plan_key", None) != key:
            self._plan = DevicePlan.from_index(sel.index, sel.budget,
                                               hierarchical=sel.hierarchical,
                                               block_size=sel.block_size, device=q.device,
                                               dtype=q.dtype, allocation=sel.allocation,
                                               vote=sel.vote)
            self._plan_key = key
        out, counts = fast_squeezed_attention(self._plan, layer, q, k, v, sel.block_size,
                                              backend=self.backend, return_counts=True)
        self._record(layer, counts.float().mean(dim=(0, 2)) / self.context_len)
        return out

    def _user_attention(self, layer, q, k, v, scaling):
        n = self.context_len
        kernels = (q.is_cuda and self.backend != "torch") or self.backend == "triton"
        # the device plan applies the global threshold or the per-layer allocation (whole
        # clusters); "capped" and "head" go through the mask path, with kernels on CUDA
        if (kernels and isinstance(self.selector, SqueezedSelector)
                and self.selector.allocation in DEVICE_ALLOCATIONS):
            return self._fast_path(layer, q, k, v)
        k_ctx, v_ctx = k[:, :, :n], v[:, :, :n]
        mask = self.selector.select(layer, q, k_ctx)            # (b, kv, nb, n)
        self._record(layer, mask.float().mean(dim=(0, 2, 3)))   # (kv,)
        block = self.selector.block_size
        if kernels:
            from kernels.squeezed_attention import squeezed_context_attention

            o_ctx, lse_ctx = squeezed_context_attention(q, k_ctx, v_ctx, mask, block, scaling,
                                                        backend=self.backend)
        else:
            o_ctx, lse_ctx = masked_context_attention(q, k_ctx, v_ctx, mask, block, scaling)
        o_usr, lse_usr = causal_attention_with_lse(q, k[:, :, n:], v[:, :, n:], scaling)
        merged, _ = merge_attention_partials(torch.stack([o_ctx, o_usr], dim=-2),
                                             torch.stack([lse_ctx, lse_usr], dim=-1),
                                             backend=self.backend)
        return merged

    def kept_fraction(self) -> float:
        """Mean fraction of the context's keys kept, over layers, heads, blocks and calls."""
        values = [x for xs in self.kept.values() for x in xs]
        return sum(values) / len(values) if values else float("nan")

    def kept_per_head(self) -> torch.Tensor:
        """(layers, kv_heads) mean kept fraction per head over the calls so far."""
        layers = sorted(self.kept_by_head)
        return torch.stack([self.kept_by_head[i] / self.calls[i] for i in layers])


@contextmanager
def squeezed_attention(model, method: SqueezedIndex | Selector, budget: float | None = None, *,
                       hierarchical: bool = False, block_size: int | None = 16,
                       vote: str = "max", allocation: str = "layer", context_ids=None,
                       backend: str = "auto", coarse_factor: float = 3.0):
    """Turn squeezed attention on for `model` inside the block; yields the `SqueezedAttention`.

    method: a `SqueezedIndex` (with `budget`, `hierarchical`, `block_size`, `vote`: how the
    query rows of a block (a KV head's query heads x the block's queries) combine their
    estimates, "max" (the default: a key that one of them needs is kept; over 9 contexts at 1/4
    it kept 54 of 138 far-back items against 49 for the paper's "mean" and 57 for dense, at a
    lower perplexity cost, benchmarks/results/squeezed_quality_vote_max.json) or "mean", and
    `allocation`: how the budget is shared
    out, see `SqueezedSelector`; the default "layer" spends exactly the budget over the model,
    "capped" at most the budget in every KV head and block), or any `Selector`
    (a baseline) together with `context_ids` or an index's context length. context_ids, when
    given, are checked against the index (a clear error for another context). coarse_factor
    (hierarchical): the coarse level keeps about this many times the budget's keys, whose fine
    centroids are then scored.
    """
    if isinstance(method, SqueezedIndex):
        if budget is None:
            raise WorkbenchError("squeezed_attention(model, index, budget=...): give the KV "
                                 "budget, a fraction in (0, 1] such as 1/8.")
        method.check(model, context_ids)
        index = method
        selector = SqueezedSelector(index, budget, hierarchical=hierarchical,
                                    block_size=block_size, vote=vote, allocation=allocation,
                                    coarse_factor=coarse_factor)
        context_len = index.context_len
    elif isinstance(method, Selector):
        index = None
        selector = method
        if context_ids is None:
            raise WorkbenchError("A baseline selector needs context_ids (the fixed context).")
        context_len = int(torch.as_tensor(context_ids).numel())
    else:
        raise WorkbenchError(f"squeezed_attention takes a SqueezedIndex or a Selector, not "
                             f"{type(method).__name__}.")
    state = SqueezedAttention(selector, context_len, max_len=max_positions(model), index=index,
                              backend=backend)
    with attention_state(model, state):
        yield state
