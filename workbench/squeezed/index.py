"""The offline step: cluster a fixed context's keys per layer and KV head, build the two-level
hierarchy, calibrate the global threshold for a KV budget, save and load it.

    index = build_index(model, context_ids)              # capture + k-means, ~seconds per 4K tokens
    t = index.calibrate(budget=1/8)                      # Thresholds(fine=..., coarse=...)
    index.save("doc.squeezed.safetensors")
    index = SqueezedIndex.load("doc.squeezed.safetensors", model=model, context_ids=context_ids)

Layout of a context of n tokens: the first `n_sink` tokens (the attention sink) and the last
`window` tokens (the observation window) are always attended and not clustered; the
n - n_sink - window keys in between are clustered. Every layer has the same number of fine
(`kf`) and coarse (`kc`) centroids per KV head, so all tensors stack over layers:

    fine        (layers, kv, kf, d)  mean of the unnormalized member keys, sorted by parent
    fine_sizes  (layers, kv, kf)     member counts
    parent      (layers, kv, kf)     coarse cluster of each fine centroid
    coarse      (layers, kv, kc, d), coarse_sizes (layers, kv, kc)  (sizes count keys)
    labels      (layers, kv, n_clustered)  fine cluster of each clustered key
    key_means   (layers, kv, d)            mean of all context keys (checks a cache's context)
    queries     (layers, hq, window, d)    observation-window queries, for calibration

The budget is the fraction of the context's keys a query attends (sink and window included).
One global threshold (over all layers and heads) is calibrated on the window queries so that
the keys whose estimate passes it make up the budget; each head then keeps what its own
estimates pass, so heads with peaked attention keep fewer keys and flat ones more. User queries
are not the window's queries, so applied as is the threshold spends more or less than the
budget (10-20% more on real text here); `SqueezedSelector`'s allocations bound the spend: the
calibration also gives each layer's share (`Thresholds.layer_fractions`) for that.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.squeezed.capture import (
    ContextCapture,
    as_context_ids,
    capture_context,
    context_hash,
    model_fingerprint,
)
from workbench.squeezed.clustering import kmeans_cosine
from workbench.squeezed.lookup import (
    VOTES,
    centroid_estimates,
    hierarchical_estimates,
    weighted_threshold,
)

FORMAT = "workbench.squeezed/1"
_TENSORS = ("fine", "fine_sizes", "parent", "coarse", "coarse_sizes", "labels", "key_means",
            "queries")


def check_budget(budget: float) -> float:
    """A KV budget must be a fraction in (0, 1]."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise WorkbenchError(f"budget must be a number in (0, 1], got {budget!r}.") from None
    if not 0.0 < b <= 1.0 or math.isnan(b):
        raise WorkbenchError(f"budget must be in (0, 1] (the fraction of the fixed context's "
                             f"keys to attend, e.g. 1/8), got {budget!r}.")
    return b


@dataclass(frozen=True)
class Thresholds:
    """Global thresholds on estimated per-key attention for one budget and block size."""

    budget: float
    fine: float               # keep a clustered key when its centroid's estimate >= fine
    coarse: float             # hierarchical: score the children of coarse centroids >= coarse
    clustered_fraction: float  # share of the clustered keys the fine threshold keeps
    # per layer: the share of its clustered keys the fine threshold keeps on the calibration
    # queries (mean over layers = clustered_fraction): the layer shares of allocation="layer"
    layer_fractions: tuple[float, ...] = ()


@dataclass
class SqueezedIndex:
    """Centroids of one fixed context for one model (see the module docstring for shapes)."""

    model: str                 # model_fingerprint(model)
    model_name: str            # config.name_or_path, for people
    context_hash: str          # context_hash(context_ids)
    context_len: int
    n_sink: int
    window: int
    head_dim: int
    q_heads: int
    fine: torch.Tensor
    fine_sizes: torch.Tensor
    parent: torch.Tensor
    coarse: torch.Tensor
    coarse_sizes: torch.Tensor
    labels: torch.Tensor
    key_means: torch.Tensor
    queries: torch.Tensor
    _thresholds: dict = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> int:
        return self.fine.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.fine.shape[1]

    @property
    def n_clustered(self) -> int:
        return self.labels.shape[-1]

    @property
    def scaling(self) -> float:
        return self.head_dim ** -0.5

    def clustered_fraction(self, budget: float) -> float:
        """Share of the clustered keys a budget leaves after the sink and window are kept."""
        budget = check_budget(budget)
        fixed = self.n_sink + self.window
        want = budget * self.context_len - fixed
        if budget < 1.0 and want < 0:
            raise WorkbenchError(
                f"budget {budget:.4g} of a {self.context_len}-token context is "
                f"{budget * self.context_len:.0f} keys, fewer than the {fixed} always kept "
                f"(n_sink {self.n_sink} + window {self.window}). Use a larger budget, or build "
                "the index with a smaller window.")
        return min(1.0, max(0.0, want / self.n_clustered))

    def estimates(self, layer: int, q: torch.Tensor, block_size: int | None,
                  hierarchical: bool = False, coarse_threshold: float = -math.inf,
                  vote: str = "max"):
        """Per-fine-centroid estimates for queries q (b, hq, q_len, d) -> (b, kv, nb, kf)."""
        dev = q.device
        if not hierarchical:
            return centroid_estimates(q, self.fine[layer].to(dev), self.fine_sizes[layer].to(dev),
                                      self.scaling, block_size, vote)
        p, _ = hierarchical_estimates(q, self.fine[layer].to(dev), self.fine_sizes[layer].to(dev),
                                      self.coarse[layer].to(dev),
                                      self.coarse_sizes[layer].to(dev),
                                      self.parent[layer].to(dev), coarse_threshold, self.scaling,
                                      block_size, vote)
        return p

    def calibrate(self, budget: float, block_size: int | None = 16,
                  coarse_factor: float = 3.0, vote: str = "max") -> Thresholds:
        """Global thresholds for `budget`, from the observation-window queries grouped into
        selection blocks of `block_size` (None: all window queries vote as one input).

        The coarse threshold keeps about `coarse_factor` times the budget's clustered keys at the
        coarse level (the recall margin of the hierarchy); the fine threshold is then set on the
        hierarchical estimates. The one-level lookup uses the same fine threshold calibrated on
        one-level estimates (they differ little). `vote`: how the rows of a block combine
        ("mean" or "max", see `lookup`). Cached per (budget, block_size, factor, vote).
        """
        if vote not in VOTES:
            raise WorkbenchError(f"vote must be one of {VOTES}, got {vote!r}.")
        budget = check_budget(budget)
        key = (budget, block_size, coarse_factor, vote)
        if key in self._thresholds:
            return self._thresholds[key]
        f = self.clustered_fraction(budget)
        q = self.queries.float()                                            # (L, hq, W, d)
        coarse_p, coarse_w, flat_p, flat_w = [], [], [], []
        for layer in range(self.layers):
            ql = q[layer][None]                                             # (1, hq, W, d)
            pc = centroid_estimates(ql, self.coarse[layer], self.coarse_sizes[layer],
                                    self.scaling, block_size, vote)         # (1, kv, nb, kc)
            coarse_p.append(pc.flatten())
            coarse_w.append(self.coarse_sizes[layer][None, :, None].expand_as(pc).flatten())
            pf = centroid_estimates(ql, self.fine[layer], self.fine_sizes[layer], self.scaling,
                                    block_size, vote)
            flat_p.append(pf.flatten())
            flat_w.append(self.fine_sizes[layer][None, :, None].expand_as(pf).flatten())
        t_coarse = weighted_threshold(torch.cat(coarse_p), torch.cat(coarse_w).float(),
                                      min(1.0, coarse_factor * f))
        t_flat = weighted_threshold(torch.cat(flat_p), torch.cat(flat_w).float(), f)
        hier_p = [self.estimates(layer, q[layer][None], block_size, True, t_coarse,
                                 vote).flatten() for layer in range(self.layers)]
        t_hier = weighted_threshold(torch.cat(hier_p), torch.cat(flat_w).float(), f)
        result = (Thresholds(budget, t_flat, -math.inf, f, _layer_shares(flat_p, flat_w, t_flat, f)),
                  Thresholds(budget, t_hier, t_coarse, f,
                             _layer_shares(hier_p, flat_w, t_hier, f)))
        self._thresholds[key] = result
        return result

    def thresholds(self, budget: float, block_size: int | None, hierarchical: bool,
                   coarse_factor: float = 3.0, vote: str = "max") -> Thresholds:
        return self.calibrate(budget, block_size, coarse_factor, vote)[int(bool(hierarchical))]

    # --- identity checks ----------------------------------------------------------------------

    def check(self, model=None, context_ids=None) -> None:
        """Raise a WorkbenchError unless `model` and `context_ids` (when given) are the ones this
        index was built for."""
        if model is not None and model_fingerprint(model) != self.model:
            raise WorkbenchError(
                f"These centroids were built for model {self.model_name!r} ({self.model}); the "
                f"model given is {model_fingerprint(model)}. Build an index for this model with "
                "build_index(model, context_ids).")
        if context_ids is not None:
            ids = as_context_ids(context_ids)
            if context_hash(ids) != self.context_hash:
                raise WorkbenchError(
                    f"The fixed context does not match the saved centroids: they were built for "
                    f"a {self.context_len}-token context with hash {self.context_hash[:12]}..., "
                    f"this one has {ids.numel()} tokens and hash {context_hash(ids)[:12]}.... "
                    "Centroids are only valid for the exact tokens they were built from; build "
                    "an index for this context with build_index(model, context_ids).")

    def check_keys(self, layer: int, context_keys: torch.Tensor) -> None:
        """Raise unless context_keys (b, kv, n, d) look like this index's context at `layer`
        (their mean matches the saved mean: a cheap guard against a cache of another text)."""
        if context_keys.shape[2] != self.context_len or context_keys.shape[1] != self.kv_heads:
            raise WorkbenchError(
                f"The cache does not hold this index's context: expected {self.context_len} "
                f"context keys for {self.kv_heads} KV heads, got shape "
                f"{tuple(context_keys.shape)}.")
        mean = context_keys.float().mean(dim=2)                             # (b, kv, d)
        ref = self.key_means[layer].to(mean.device)
        scale = float(ref.abs().max().clamp_min(1e-6))
        if float((mean - ref).abs().max()) > 0.05 * scale:
            raise WorkbenchError(
                f"The fixed context in the cache does not match the saved centroids (layer "
                f"{layer}'s keys differ). The cache must start with exactly the "
                f"{self.context_len} tokens the index was built from.")

    # --- save / load --------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "model": self.model, "model_name": self.model_name,
                "context_hash": self.context_hash,
                "config": json.dumps({k: getattr(self, k) for k in (
                    "context_len", "n_sink", "window", "head_dim", "q_heads")})}

    def save(self, path: str | Path) -> Path:
        """Write the index as one safetensors file (tensors + metadata naming model and context).
        Written to a temporary name and renamed, so an interrupted save leaves nothing behind."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in _TENSORS}
        try:
            save_file(tensors, str(tmp), metadata=self.metadata())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, context_ids=None) -> SqueezedIndex:
        """Read a saved index; with `model` / `context_ids`, refuse any other model or context."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"No saved squeezed index at {path}.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise WorkbenchError(f"{path} is not a squeezed-attention index (format "
                                     f"{meta.get('format')!r}, expected {FORMAT!r}).")
            tensors = {k: f.get_tensor(k) for k in _TENSORS}
        config = json.loads(meta["config"])
        index = cls(model=meta["model"], model_name=meta["model_name"],
                    context_hash=meta["context_hash"], **config, **tensors)
        index.check(model, context_ids)
        return index


def _layer_shares(p: list[torch.Tensor], w: list[torch.Tensor], threshold: float,
                  fraction: float) -> tuple[float, ...]:
    """Per layer, the key-weighted share of estimates p >= threshold, rescaled so that the mean
    over layers is `fraction` exactly (ties at the threshold can shift it a little) and capped
    at 1."""
    if fraction >= 1.0:
        return tuple(1.0 for _ in p)
    raw = torch.tensor([float((wl.float() * (pl >= threshold)).sum() / wl.float().sum())
                        for pl, wl in zip(p, w, strict=True)], dtype=torch.float64)
    shares = raw * (fraction / raw.mean().clamp_min(1e-12))
    for _ in range(10):                       # cap at 1 and hand the excess to the other layers
        over = shares > 1.0
        if not bool(over.any()):
            break
        excess = float((shares[over] - 1.0).sum())
        shares[over] = 1.0
        free = ~over & (shares < 1.0)
        shares[free] += excess * shares[free] / shares[free].sum().clamp_min(1e-12)
    return tuple(float(x) for x in shares.clamp(0.0, 1.0))


def _cluster_layer(keys: torch.Tensor, n_fine: int, n_coarse: int, iterations: int,
                   gen: torch.Generator, n_outliers: int = 0) -> dict[str, torch.Tensor]:
    """keys (kv, n, d) -> fine/coarse centroids with fine centroids sorted by parent.

    n_outliers: the keys that fit their cluster worst (lowest cosine to its direction) leave it
    and become clusters of their own (size 1, centroid = the key), so a rare key (a name, a
    number) is scored exactly instead of being averaged into a cluster of common ones.
    """
    fine = kmeans_cosine(keys, n_fine, iterations=iterations, generator=gen)
    centroids, sizes, labels = fine.centroids, fine.sizes, fine.labels
    if n_outliers:
        kv, n, d = keys.shape
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        fit = (unit * torch.gather(fine.directions, 1, labels[..., None].expand(-1, -1, d))
               ).sum(-1)                                                    # (kv, n) cosine
        out = fit.topk(n_outliers, dim=1, largest=False).indices            # (kv, n_out)
        rows = torch.arange(kv, device=keys.device)[:, None]
        sizes = sizes.clone()
        sizes.scatter_add_(1, labels[rows, out], -torch.ones_like(out))
        member = torch.ones(kv, n, dtype=torch.bool, device=keys.device)
        member[rows, out] = False
        sums = torch.zeros(kv, n_fine, d, device=keys.device).scatter_add_(
            1, labels[..., None].expand(-1, -1, d), keys.float() * member[..., None])
        centroids = torch.where(sizes[..., None] > 0, sums / sizes.clamp_min(1)[..., None], 0.0)
        centroids = torch.cat([centroids, keys[rows, out].float()], 1)     # (kv, kf + n_out, d)
        sizes = torch.cat([sizes, torch.ones_like(out)], 1)
        labels = labels.clone()
        labels[rows, out] = n_fine + torch.arange(n_outliers, device=keys.device)[None, :].expand(kv, -1)
    n_all = centroids.shape[1]
    coarse = kmeans_cosine(centroids, min(n_coarse, n_all), iterations=iterations,
                           generator=gen, weights=sizes.float())
    parent = coarse.labels                                                  # (kv, kf)
    order = torch.argsort(parent, dim=1, stable=True)                       # children contiguous
    rank = torch.argsort(order, dim=1)                                      # old id -> new id
    d = keys.shape[-1]
    coarse_sizes = torch.zeros(keys.shape[0], coarse.centroids.shape[1], dtype=torch.long,
                               device=keys.device)
    coarse_sizes.scatter_add_(1, parent, sizes)
    return {
        "fine": torch.gather(centroids, 1, order[..., None].expand(-1, -1, d)),
        "fine_sizes": torch.gather(sizes, 1, order),
        "parent": torch.gather(parent, 1, order),
        "coarse": coarse.centroids,
        "coarse_sizes": coarse_sizes,
        "labels": torch.gather(rank, 1, labels),
    }


@torch.no_grad()
def build_index(model, context_ids=None, *, capture: ContextCapture | None = None,
                n_sink: int = 4, window: int = 64, centroid_ratio: float = 0.05,
                coarse_ratio: float = 0.125, outlier_ratio: float = 0.0,
                iterations: int = 20, seed: int = 0) -> SqueezedIndex:
    """Capture the context's keys (unless `capture` is given) and cluster them.

    centroid_ratio: fine centroids per clustered key (the paper: ~5%); coarse_ratio: coarse
    centroids per fine centroid; outlier_ratio: share of the clustered keys that fit their
    cluster worst and become singleton clusters (0: plain k-means, the paper's). k-means runs on
    the keys' device (CPU or GPU).
    """
    if capture is None:
        if context_ids is None:
            raise WorkbenchError("build_index needs context_ids (or a capture).")
        capture = capture_context(model, context_ids, window=window)
    elif capture.queries[0].shape[1] != window:
        raise WorkbenchError(f"The capture holds {capture.queries[0].shape[1]} window queries, "
                             f"not window={window}.")
    ids = capture.context_ids
    n = ids.numel()
    n_clustered = n - n_sink - window
    if n_sink < 0 or n_clustered < 2:
        raise WorkbenchError(f"A {n}-token context leaves {n_clustered} keys to cluster after "
                             f"n_sink={n_sink} and window={window}; use a longer context.")
    n_fine = max(2, min(n_clustered, round(centroid_ratio * n_clustered)))
    n_coarse = max(1, min(n_fine, round(coarse_ratio * n_fine)))
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {k: [] for k in _TENSORS[:-2]}
    for keys in capture.keys:                                               # (kv, n, d)
        mid = keys[:, n_sink:n - window].float()                            # (kv, n_clustered, d)
        n_out = round(outlier_ratio * n_clustered)
        for k, v in _cluster_layer(mid, n_fine, n_coarse, iterations, gen, n_out).items():
            parts[k].append(v.cpu())
    cfg = model.config
    return SqueezedIndex(
        model=model_fingerprint(model), model_name=str(getattr(cfg, "name_or_path", "")),
        context_hash=context_hash(ids), context_len=n, n_sink=n_sink, window=window,
        head_dim=capture.keys[0].shape[-1], q_heads=capture.queries[0].shape[0],
        queries=torch.stack(capture.queries).float(),
        key_means=torch.stack([k.float().mean(dim=1).cpu() for k in capture.keys]),
        **{k: torch.stack(v) for k, v in parts.items()})
