"""Centroid lookup: estimate each fixed-context key's attention from its cluster's centroid.

For a query q and centroids c_k with sizes N_k (one layer, one KV head):

    s_k = q . c_k * scaling                       (scaling = 1/sqrt(head_dim))
    p_k = exp(s_k) / sum_j N_j exp(s_j)           estimated attention probability of ONE key of k

Summed over a cluster's N_k keys, p_k * N_k estimates the attention mass the cluster gets; p_k
itself is what each member key gets, and a key is kept when p_k of its cluster passes a threshold.
Under GQA the query heads that share a KV head vote together, and so do the queries of one
selection block: one key set per (KV head, block of queries). The paper averages their p
(vote="mean", these functions' default); `squeezed_attention` takes their max by default
(vote="max": a key that one head needs is not averaged away by the others).

Hierarchical lookup (two levels). Coarse centroids cover the fine ones. Score the coarse level,
keep coarse clusters whose p passes the coarse threshold, then score ONLY the fine centroids
under kept coarse ones (gathered by index: the pruned children are never touched). The softmax
denominator of the fine level uses the scored fine centroids plus the pruned coarse centroids
(which stand in for all the keys below them), so the estimates stay on the same scale as the
one-level lookup and one threshold serves both.

Shapes: queries (batch, q_heads, q_len, d); centroids (kv_heads, k, d); sizes (kv_heads, k);
estimates (batch, kv_heads, n_blocks, k). All in float32.
"""

from __future__ import annotations

import math

import torch


def block_count(q_len: int, block_size: int | None) -> int:
    """Selection blocks for q_len queries: 1 for block_size None (one set for the whole input)."""
    return 1 if block_size is None or block_size >= q_len else math.ceil(q_len / block_size)


def group_queries(q: torch.Tensor, kv_heads: int, block_size: int | None) -> tuple:
    """(batch, q_heads, q_len, d) -> (batch, kv_heads, n_blocks, group * block, d) plus a
    validity mask (n_blocks, group * block) for the padded last block."""
    b, hq, q_len, d = q.shape
    g = hq // kv_heads
    nb = block_count(q_len, block_size)
    bs = math.ceil(q_len / nb) if block_size is None else min(block_size, q_len)
    pad = nb * bs - q_len
    x = q.float().reshape(b, kv_heads, g, q_len, d)
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    x = x.reshape(b, kv_heads, g, nb, bs, d).permute(0, 1, 3, 2, 4, 5)    # (b, kv, nb, g, bs, d)
    valid = (torch.arange(nb * bs, device=q.device) < q_len).reshape(nb, 1, bs).expand(nb, g, bs)
    return x.reshape(b, kv_heads, nb, g * bs, d), valid.reshape(nb, g * bs)


VOTES = ("mean", "max")


def _mean_over_queries(p: torch.Tensor, valid: torch.Tensor, vote: str = "mean") -> torch.Tensor:
    """p (b, kv, nb, rows, k) over the valid rows of each block -> (b, kv, nb, k): their mean
    (the paper's vote), or their max (a key that any query of the block needs is kept)."""
    w = valid.to(p.dtype)[None, None, :, :, None]                           # (1, 1, nb, rows, 1)
    if vote == "max":
        return (p * w).amax(dim=3)
    return (p * w).sum(dim=3) / w.sum(dim=3).clamp_min(1.0)


def log_sizes(sizes: torch.Tensor) -> torch.Tensor:
    """log N_k, -inf for empty clusters (they hold no key and add nothing to the denominator)."""
    return torch.log(sizes.float())


def centroid_estimates(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor,
                       scaling: float, block_size: int | None = None,
                       vote: str = "mean") -> torch.Tensor:
    """One-level lookup. q (b, hq, q_len, d); centroids (kv, k, d); sizes (kv, k).
    Returns p (b, kv, n_blocks, k): estimated attention of one key of each cluster, averaged
    over the query heads of the group and the queries of the block."""
    kv = centroids.shape[0]
    x, valid = group_queries(q, kv, block_size)                             # (b, kv, nb, r, d)
    s = torch.einsum("bhnrd,hkd->bhnrk", x, centroids.float()) * scaling    # (b, kv, nb, r, k)
    log_den = torch.logsumexp(s + log_sizes(sizes)[None, :, None, None, :], dim=-1,
                              keepdim=True)                                 # (b, kv, nb, r, 1)
    return _mean_over_queries(torch.exp(s - log_den), valid, vote)


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask-to-index compaction (reference). mask (..., n) bool -> (indices (..., m) int64 of
    the True positions in increasing order, padded with -1; counts (...,) int64), m = max count.
    """
    counts = mask.sum(dim=-1)                                               # (...,)
    m = int(counts.max()) if counts.numel() else 0
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :m]
    valid = torch.arange(m, device=mask.device) < counts[..., None]
    return torch.where(valid, order, -1), counts


def hierarchical_estimates(q: torch.Tensor, fine: torch.Tensor, fine_sizes: torch.Tensor,
                           coarse: torch.Tensor, coarse_sizes: torch.Tensor,
                           parent: torch.Tensor, coarse_threshold: float, scaling: float,
                           block_size: int | None = None,
                           vote: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level lookup that scores only the children of kept coarse centroids.

    q (b, hq, q_len, d); fine (kv, kf, d) and fine_sizes (kv, kf); coarse (kv, kc, d) and
    coarse_sizes (kv, kc); parent (kv, kf) int64, the coarse cluster of each fine centroid.
    Returns (p (b, kv, nb, kf) with 0 for fine centroids that were never scored,
    scored (b, kv, nb) int64: how many fine centroids were scored per block).
    """
    kv, kf, d = fine.shape
    x, valid = group_queries(q, kv, block_size)                             # (b, kv, nb, r, d)
    b, _, nb, r, _ = x.shape
    s_c = torch.einsum("bhnrd,hkd->bhnrk", x, coarse.float()) * scaling     # (b, kv, nb, r, kc)
    log_nc = log_sizes(coarse_sizes)[None, :, None, None, :]
    p_c = _mean_over_queries(torch.exp(s_c - torch.logsumexp(s_c + log_nc, -1, keepdim=True)),
                             valid, vote)                                         # (b, kv, nb, kc)
    keep_c = p_c >= coarse_threshold                                        # (b, kv, nb, kc)
    cand = torch.gather(keep_c, 3, parent[None, :, None, :].expand(b, kv, nb, kf))
    idx, counts = compact(cand)                                             # (b, kv, nb, m)
    safe = idx.clamp_min(0)
    heads = torch.arange(kv, device=q.device)[None, :, None, None]
    c_f = fine.float()[heads, safe]                                         # (b, kv, nb, m, d)
    log_nf = torch.where(idx >= 0, log_sizes(fine_sizes)[heads, safe], -math.inf)
    s_f = torch.einsum("bhnrd,bhnmd->bhnrm", x, c_f) * scaling              # (b, kv, nb, r, m)
    pruned = log_nc.expand(b, kv, nb, 1, -1).masked_fill(keep_c[:, :, :, None, :], -math.inf)
    log_den = torch.logsumexp(torch.cat([s_f + log_nf[:, :, :, None, :], s_c + pruned], -1),
                              dim=-1, keepdim=True)                         # (b, kv, nb, r, 1)
    p_f = _mean_over_queries(torch.exp(s_f - log_den), valid, vote)               # (b, kv, nb, m)
    p_f = torch.where(idx >= 0, p_f, 0.0)
    p = torch.zeros(b, kv, nb, kf + 1, device=q.device)
    p.scatter_(3, torch.where(idx >= 0, idx, kf), p_f)                      # pads land in col kf
    return p[..., :kf], counts


def weighted_threshold(values: torch.Tensor, weights: torch.Tensor, keep_fraction: float) -> float:
    """The threshold t such that values >= t carry `keep_fraction` of the total weight.

    values, weights: same shape (flattened). Each value stands for `weight` keys, so this is a
    quantile over keys, not over centroids. keep_fraction >= 1 gives -inf (keep all).
    """
    if keep_fraction >= 1.0:
        return -math.inf
    v = values.flatten().double()
    w = weights.flatten().double()
    order = torch.argsort(v, descending=True)
    cum = torch.cumsum(w[order], 0)
    target = keep_fraction * float(cum[-1])
    goal = torch.tensor([target], dtype=cum.dtype, device=cum.device)
    pos = int(torch.searchsorted(cum, goal).item())
    pos = min(pos, v.numel() - 1)
    return float(v[order[pos]])
