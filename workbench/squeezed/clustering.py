"""k-means for keys in cosine geometry, batched over heads, in plain PyTorch (CPU or GPU).

Squeezed Attention clusters each head's keys by direction: the keys are L2-normalized, seeded
with k-means++ and refined with spherical k-means (assign each key to the centroid of highest
cosine; the new direction is the normalized mean of its members). What is *kept* per cluster is
the mean of the members' unnormalized keys (so q . centroid is the mean of q . key over the
cluster) and the member count, which weights the cluster in the softmax denominator estimate.

    result = kmeans_cosine(keys, n_clusters=64, generator=torch.Generator().manual_seed(0))
    result.centroids   # (heads, n_clusters, d) mean of unnormalized member keys
    result.sizes       # (heads, n_clusters) member counts (int64; 0 for an empty cluster)
    result.labels      # (heads, n) cluster of each key

All heads are clustered together in batched tensor ops, so one call handles every KV head of a
layer. The work per iteration is one (heads, n, k) score matmul: n * k * d multiply-adds per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError


@dataclass
class Clustering:
    """The result of `kmeans_cosine` for `heads` independent point sets of n points each."""

    centroids: torch.Tensor   # (heads, k, d) mean of the unnormalized members (0 if empty)
    sizes: torch.Tensor       # (heads, k) int64 member counts
    labels: torch.Tensor      # (heads, n) int64 cluster of each point
    directions: torch.Tensor  # (heads, k, d) unit vectors the assignment used
    iterations: int           # iterations run before the assignment stopped changing


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeds in cosine geometry. points: (heads, n, d) unit vectors; weights: optional
    (heads, n) non-negative point weights. Returns (heads, k) int64 indices of the seeds.

    The first seed is drawn in proportion to the weights; each next one in proportion to
    weight * (1 - max cosine to the seeds so far), the cosine distance to the nearest seed.
    """
    heads, n, _ = points.shape
    w = torch.ones(heads, n, dtype=points.dtype, device=points.device) if weights is None \
        else weights.to(points.dtype)
    seeds = torch.empty(heads, k, dtype=torch.long, device=points.device)
    rows = torch.arange(heads, device=points.device)
    seeds[:, 0] = torch.multinomial(w.cpu(), 1, generator=generator).squeeze(1).to(points.device)
    best_cos = torch.full((heads, n), -1.0, dtype=points.dtype, device=points.device)
    for j in range(1, k):
        last = points[rows, seeds[:, j - 1]]                               # (heads, d)
        cos = torch.einsum("hnd,hd->hn", points, last)                     # (heads, n)
        best_cos = torch.maximum(best_cos, cos)
        prob = (w * (1.0 - best_cos).clamp_min(0.0)).cpu()                 # (heads, n)
        dead = prob.sum(dim=1) <= 0                                        # every point covered
        prob[dead] = w[dead].cpu() + 1e-12
        seeds[:, j] = torch.multinomial(prob, 1, generator=generator).squeeze(1).to(points.device)
    return seeds


def kmeans_cosine(points: torch.Tensor, n_clusters: int, *, iterations: int = 25,
                  generator: torch.Generator | None = None,
                  weights: torch.Tensor | None = None) -> Clustering:
    """Spherical k-means with k-means++ seeds, batched over the first dim.

    points: (heads, n, d) float, unnormalized (keys, or centroids for the coarse level).
    weights: optional (heads, n) counts (a coarse level clusters fine centroids weighted by their
    sizes, so its centroid is the mean of all keys below it). Returns a `Clustering`.
    """
    if points.dim() != 3:
        raise WorkbenchError(f"kmeans_cosine: points must be (heads, n, d), got "
                             f"{tuple(points.shape)}.")
    heads, n, d = points.shape
    if not 1 <= n_clusters <= n:
        raise WorkbenchError(f"kmeans_cosine: n_clusters must be in [1, {n}] for {n} points, "
                             f"got {n_clusters}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    x = points.float()
    unit = _normalize(x)                                                   # (heads, n, d)
    w = None if weights is None else weights.float()
    seeds = kmeans_plus_plus(unit, n_clusters, gen, w)
    directions = torch.gather(unit, 1, seeds[..., None].expand(-1, -1, d))  # (heads, k, d)
    labels = torch.full((heads, n), -1, dtype=torch.long, device=x.device)
    ones = torch.ones(heads, n, device=x.device) if w is None else w
    done = iterations
    for it in range(1, iterations + 1):
        new = torch.einsum("hnd,hkd->hnk", unit, directions).argmax(dim=-1)  # (heads, n)
        if torch.equal(new, labels):
            done = it
            break
        labels = new
        sums = torch.zeros(heads, n_clusters, d, device=x.device)
        sums.scatter_add_(1, labels[..., None].expand(-1, -1, d), unit * ones[..., None])
        norms = sums.norm(dim=-1, keepdim=True)                            # (heads, k, 1)
        # An empty cluster keeps its old direction (it may win points back next iteration).
        directions = torch.where(norms > 1e-12, sums / norms.clamp_min(1e-12), directions)
    # What lookup uses: the (weighted) mean of the unnormalized members, and the member counts.
    sums = torch.zeros(heads, n_clusters, d, device=x.device)
    sums.scatter_add_(1, labels[..., None].expand(-1, -1, d), x * ones[..., None])
    counts = torch.zeros(heads, n_clusters, device=x.device)
    counts.scatter_add_(1, labels, ones)
    centroids = sums / counts.clamp_min(1e-12)[..., None]
    return Clustering(centroids=centroids.to(points.dtype), sizes=counts.round().long(),
                      labels=labels, directions=directions, iterations=done)
