"""Which fixed-context keys each user query block attends: squeezed attention and baselines.

A selector answers `select(layer, q, context_keys) -> mask`:

    q             (batch, q_heads, q_len, d)   the user queries of this call (post-RoPE)
    context_keys  (batch, kv_heads, n, d)      the fixed context's keys from the cache
    mask          (batch, kv_heads, n_blocks, n) bool: keys kept for each block of queries

All query heads that share a KV head share its key set (GQA), and the queries of one block of
`block_size` share it too (None: one set for the whole call, the paper's granularity). Every
selector spends the same budget, floor(budget * n) of the n context keys per KV head and block
(squeezed: at most that), so they compare fairly:

- `SqueezedSelector`: centroid lookup (one-level or hierarchical); the sink and the observation
  window are always kept and count inside the budget; `allocation` says how the budget is
  shared out (the paper's global threshold drifts with the queries; the others never spend
  more than the budget).
- `StreamingSelector`: the first `n_sink` keys plus the most recent ones (StreamingLLM-like).
- `RandomSelector`: the sink and window plus keys drawn at random (fixed per layer and head).
- `QuestSelector`: the sink and window plus the pages of `page` keys with the highest upper
  bound sum_d max(q_d * max_d, q_d * min_d) on q . k (Quest-like, per block of queries).
- `OracleSelector`: the sink and window plus the keys with the highest true attention (needs
  the full scores, so it saves nothing: the ceiling for any selection at this budget).
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.squeezed.index import SqueezedIndex, check_budget
from workbench.squeezed.lookup import block_count, group_queries


def _fixed_mask(n: int, n_sink: int, window: int, device) -> torch.Tensor:
    """(n,) bool, True on the sink and the observation window."""
    pos = torch.arange(n, device=device)
    return (pos < n_sink) | (pos >= n - window)


def _middle_keep(budget: float, n: int, fixed: int) -> int:
    """How many keys besides the always-kept ones a budget allows (>= 0): the budget's keys
    (rounded down, so the spend never exceeds it) less the always-kept ones."""
    return max(0, min(n - fixed, budget_keys(budget, n) - fixed))


def budget_keys(budget: float, n: int) -> int:
    """Keys a budget allows out of n, rounded down (never more than budget * n)."""
    return min(n, math.floor(budget * n + 1e-9))


class Selector:
    """Base: holds the budget and the selection granularity."""

    name = "selector"

    def __init__(self, budget: float, block_size: int | None = 16):
        self.budget = check_budget(budget)
        if block_size is not None and block_size < 1:
            raise WorkbenchError(f"block_size must be >= 1 or None, got {block_size}.")
        self.block_size = block_size

    def select(self, layer: int, q: torch.Tensor, context_keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all(self, q, context_keys) -> torch.Tensor:
        b, kv, n, _ = context_keys.shape
        nb = block_count(q.shape[2], self.block_size)
        return torch.ones(b, kv, nb, n, dtype=torch.bool, device=q.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget:.4g}, block_size={self.block_size})"


ALLOCATIONS = ("threshold", "capped", "layer", "head")
DEVICE_ALLOCATIONS = ("threshold", "layer")     # those the kernel path (fastpath.py) runs


def top_keys(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """(..., m) scores -> bool mask of the k highest positive scores along the last dim
    (k: an int, or a tensor broadcastable to scores.shape[:-1]). Zero scores (keys never scored,
    e.g. children of pruned coarse centroids) are never kept."""
    m = scores.shape[-1]
    k_max = int(k if isinstance(k, int) else k.max())
    k_max = max(0, min(m, k_max))
    out = torch.zeros_like(scores, dtype=torch.bool)
    if k_max == 0:
        return out
    top = scores.topk(k_max, dim=-1)
    rank_ok = torch.arange(k_max, device=scores.device) < torch.as_tensor(
        k, device=scores.device)[..., None]
    out.scatter_(-1, top.indices, rank_ok & (top.values > 0))
    return out


class SqueezedSelector(Selector):
    """Squeezed Attention: keep the keys whose centroid's estimated attention is highest (plus
    the sink and the window, which count inside the budget).

    allocation: how the budget is shared out.

    - "threshold": the paper's: one global threshold calibrated offline on the observation
      window's queries; each head keeps what passes it. User queries differ from the window's,
      so the spend drifts (it overshot the budget by 10-20% on real text).
    - "capped": the global threshold, but no (KV head, query block) keeps more than the budget
      (the highest estimates win where the threshold would overspend): spend <= budget.
    - "layer": per (layer, query block), the highest estimates pooled over the layer's KV heads
      fill the layer's share; the shares come from calibration (the share of the clustered keys
      each layer keeps under the global threshold, mean = the budget): spend = budget.
    - "head": every (KV head, query block) keeps exactly its budget's highest estimates.
    """

    def __init__(self, index: SqueezedIndex, budget: float, *, hierarchical: bool = False,
                 block_size: int | None = 16, coarse_factor: float = 3.0, vote: str = "max",
                 allocation: str = "threshold"):
        super().__init__(budget, block_size)
        if allocation not in ALLOCATIONS:
            raise WorkbenchError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
        self.index, self.hierarchical, self.vote = index, hierarchical, vote
        self.allocation = allocation
        self.name = "squeezed-hier" if hierarchical else "squeezed"
        self.thresholds = index.thresholds(self.budget, block_size, hierarchical, coarse_factor,
                                           vote)

    def middle_limit(self) -> int:
        """Clustered keys one (KV head, block) may keep: the budget less the sink and window."""
        ix = self.index
        return _middle_keep(self.budget, ix.context_len, ix.n_sink + ix.window)

    def select(self, layer, q, context_keys):
        ix = self.index
        if self.budget >= 1.0:
            return self._all(q, context_keys)
        t = self.thresholds
        p = ix.estimates(layer, q, self.block_size, self.hierarchical, t.coarse,
                         self.vote)                                          # (b, kv, nb, kf)
        labels = ix.labels[layer].to(q.device)                              # (kv, n_clustered)
        b, kv, nb, _ = p.shape
        est = torch.gather(p, 3, labels[None, :, None, :].expand(b, kv, nb, -1))  # (b, kv, nb, m)
        limit = self.middle_limit()
        if self.allocation == "threshold":
            keep = est >= t.fine
        elif self.allocation == "capped":
            keep = est >= t.fine
            over = keep.sum(-1) > limit                                     # (b, kv, nb)
            if bool(over.any()):
                keep = torch.where(over[..., None], top_keys(est, limit), keep)
        elif self.allocation == "head":
            keep = top_keys(est, limit)
        else:                                                               # "layer"
            m = est.shape[-1]
            share = t.layer_fractions[layer] if t.layer_fractions else t.clustered_fraction
            total = min(kv * m, math.floor(share * kv * m))
            pooled = est.permute(0, 2, 1, 3).reshape(b, nb, kv * m)         # (b, nb, kv * m)
            keep = top_keys(pooled, total).reshape(b, nb, kv, m).permute(0, 2, 1, 3)
        sink = keep.new_ones(b, kv, nb, ix.n_sink)
        win = keep.new_ones(b, kv, nb, ix.window)
        return torch.cat([sink, keep, win], dim=3)                          # (b, kv, nb, n)


class StreamingSelector(Selector):
    """The first n_sink keys and the most recent keys of the context (StreamingLLM-like)."""

    name = "streaming"

    def __init__(self, budget: float, n_sink: int = 4, block_size: int | None = 16):
        super().__init__(budget, block_size)
        self.n_sink = n_sink

    def select(self, layer, q, context_keys):
        mask = self._all(q, context_keys)
        n = mask.shape[-1]
        recent = max(0, budget_keys(self.budget, n) - self.n_sink)
        keep = _fixed_mask(n, self.n_sink, recent, q.device)
        return mask & keep


class RandomSelector(Selector):
    """The sink and window plus random keys (the same draw for a layer and head every call)."""

    name = "random"

    def __init__(self, budget: float, n_sink: int = 4, window: int = 64,
                 block_size: int | None = 16, seed: int = 0):
        super().__init__(budget, block_size)
        self.n_sink, self.window, self.seed = n_sink, window, seed

    def select(self, layer, q, context_keys):
        mask = self._all(q, context_keys)
        b, kv, nb, n = mask.shape
        fixed = _fixed_mask(n, self.n_sink, self.window, q.device)
        extra = _middle_keep(self.budget, n, int(fixed.sum()))
        gen = torch.Generator().manual_seed(self.seed * 100003 + layer)
        scores = torch.rand(kv, n, generator=gen).to(q.device).masked_fill(fixed, -1.0)
        chosen = torch.zeros(kv, n, dtype=torch.bool, device=q.device)
        chosen.scatter_(1, scores.topk(extra, dim=1).indices, True)
        return mask & (chosen | fixed)[None, :, None, :]


class QuestSelector(Selector):
    """The sink and window plus the top pages by Quest's upper bound on q . k."""

    name = "quest"

    def __init__(self, budget: float, n_sink: int = 4, window: int = 64, page: int = 16,
                 block_size: int | None = 16):
        super().__init__(budget, block_size)
        self.n_sink, self.window, self.page = n_sink, window, page
        self._pages: dict[int, tuple] = {}

    def _page_bounds(self, layer, context_keys):
        """Per page min and max of each channel over the middle keys (cached per layer)."""
        cached = self._pages.get(layer)
        if cached is not None and cached[0].shape[0] == context_keys.shape[0]:
            return cached
        b, kv, n, d = context_keys.shape
        mid = context_keys[:, :, self.n_sink:n - self.window].float()
        m = mid.shape[2]
        n_pages = math.ceil(m / self.page)
        pad = n_pages * self.page - m
        lo = torch.nn.functional.pad(mid, (0, 0, 0, pad), value=math.inf)
        hi = torch.nn.functional.pad(mid, (0, 0, 0, pad), value=-math.inf)
        kmin = lo.reshape(b, kv, n_pages, self.page, d).amin(3)             # (b, kv, P, d)
        kmax = hi.reshape(b, kv, n_pages, self.page, d).amax(3)
        self._pages[layer] = (kmin, kmax, m)
        return self._pages[layer]

    def select(self, layer, q, context_keys):
        mask = self._all(q, context_keys)
        b, kv, nb, n = mask.shape
        kmin, kmax, m = self._page_bounds(layer, context_keys)
        extra = _middle_keep(self.budget, n, self.n_sink + self.window)
        x, valid = group_queries(q, kv, self.block_size)                    # (b, kv, nb, r, d)
        # sum_d max(q_d * min_d, q_d * max_d) = q+ . max + q- . min  (q+ / q-: positive / negative
        # parts of q), an upper bound on q . k for every key of the page
        bound = (torch.einsum("bhnrd,bhpd->bhnrp", x.clamp_min(0), kmax)
                 + torch.einsum("bhnrd,bhpd->bhnrp", x.clamp_max(0), kmin))  # (b, kv, nb, r, P)
        w = valid.float()[None, None, :, :, None]
        score = (bound * w).sum(3) / w.sum(3)                               # (b, kv, nb, P)
        # whole pages in order of their bound; the last page is cut to spend exactly the budget
        per_key = score.repeat_interleave(self.page, dim=3)[..., :m]        # (b, kv, nb, m)
        keys = torch.zeros(b, kv, nb, m, dtype=torch.bool, device=q.device)
        keys.scatter_(3, per_key.topk(min(extra, m), dim=3).indices, True)
        out = torch.cat([mask.new_ones(b, kv, nb, self.n_sink), keys,
                         mask.new_ones(b, kv, nb, self.window)], dim=3)
        return mask & out


class OracleSelector(Selector):
    """The sink and window plus the keys with the highest true attention probability (averaged
    over the group's heads and the block's queries): the best any selection of this size does."""

    name = "oracle"

    def __init__(self, budget: float, n_sink: int = 4, window: int = 64,
                 block_size: int | None = 16):
        super().__init__(budget, block_size)
        self.n_sink, self.window = n_sink, window

    def select(self, layer, q, context_keys):
        mask = self._all(q, context_keys)
        b, kv, nb, n = mask.shape
        x, valid = group_queries(q, kv, self.block_size)                    # (b, kv, nb, r, d)
        s = torch.einsum("bhnrd,bhkd->bhnrk", x, context_keys.float()) * q.shape[-1] ** -0.5
        w = valid.float()[None, None, :, :, None]
        p = (torch.softmax(s, dim=-1) * w).sum(3) / w.sum(3)                # (b, kv, nb, n)
        fixed = _fixed_mask(n, self.n_sink, self.window, q.device)
        extra = _middle_keep(self.budget, n, int(fixed.sum()))
        chosen = torch.zeros_like(mask)
        chosen.scatter_(3, p.masked_fill(fixed, -1.0).topk(extra, dim=3).indices, True)
        return mask & (chosen | fixed)
