"""The kernel path of squeezed attention: lookup, index selection and sparse attention, all on
the device, no key-level mask and no host sync.

    plan = DevicePlan.from_index(index, budget=1/8, hierarchical=True, device="cuda",
                                 dtype=torch.bfloat16)
    o = fast_squeezed_attention(plan, layer, q, k, v, block_size=16)   # (b, hq, q_len, d)

Allocations: "threshold" (the paper's global threshold, fused into the keep kernel) and
"layer" (the evaluated default of `squeezed_attention`: estimates out of the same kernels, then
an argsort per query block pooled over the layer's KV heads keeps whole clusters while they fit
the layer's share; spend <= budget, no host sync).

Steps for one layer (launches), decode: centroid keep flags (one-level: 2 launches over tiles
of centroids, `centroid_keep`; hierarchical: coarse scoring, candidate compaction, gathered fine
scoring + a few small PyTorch ops) -> one gathered sparse attention launch over the kept
context keys (a split per chunk of the context, which first compacts its kept positions
straight from kept centroids and 2-byte labels: `select_and_attend`) and the user tokens
(causal) -> one LSE merge. Prefill (`kernels.squeezed_prefill`): one-level keep flags in one
launch with the query rows stationary (`prefill_keep`) -> `select_chunks` + a pack into one
flat list per query block (`select_flat`) -> one gathered FlashAttention launch over 64-row
tiles (a GQA group's query heads stacked into the rows) covering the user tokens, no merge
(`sparse_prefill`): 5.0x / 5.3x dense SDPA at 128K, 1/8, one key set, Llama-2 / Llama-3 shape
on the H200 (benchmarks/results/squeezed_nvidia_h200.json). Bytes that grow with the context, per KV head: fine
centroids (one-level: 5% of the keys' K bytes; hierarchical: the coarse level plus the kept
coarse centroids' children), labels (2 bytes per key), and the kept K/V rows
(budget * n * 2 * d * itemsize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.squeezed_attention import select_and_attend, sparse_attention
from kernels.squeezed_lookup import block_layout, block_rows, centroid_scores, compact_mask
from kernels.squeezed_prefill import prefill_keep, select_flat, sparse_prefill
from kernels.squeezed_select import centroid_keep, select_chunks
from workbench.errors import WorkbenchError
from workbench.squeezed.index import SqueezedIndex
from workbench.squeezed.selectors import DEVICE_ALLOCATIONS

# Prefill blocks with fewer query rows (query heads of a KV head's group x queries of a block)
# attend through the chunked kernel: a 16-row block of Llama-2 (1 query head per KV head, block
# 16) ran slower in the 64-row tiles of `sparse_prefill` (1.78 vs 1.34 ms at 128K, 1/8, H200).
PREFILL_MIN_ROWS = 64


@dataclass
class DevicePlan:
    """Centroids and thresholds of one index at one budget, on the device, per layer."""

    fine: torch.Tensor            # (layers, kv, kf, d) in the model dtype
    fine_log_sizes: torch.Tensor  # (layers, kv, kf) float32
    coarse: torch.Tensor          # (layers, kv, kc, d)
    coarse_log_sizes: torch.Tensor
    parent: torch.Tensor          # (layers, kv, kf) int64
    labels: torch.Tensor          # (layers, kv, n_mid) int16 (int32 past 32767 centroids)
    fine_threshold: float
    coarse_threshold: float
    hierarchical: bool
    context_len: int
    n_sink: int
    window: int
    scaling: float
    # allocation "threshold" (the paper's global threshold) or "layer" (per layer and query
    # block, the best centroids pooled over the KV heads while their keys fit the layer's
    # share of the clustered keys: spend <= budget); see workbench.squeezed.selectors
    allocation: str = "threshold"
    layer_shares: tuple[float, ...] = ()
    member_counts: torch.Tensor | None = None    # (layers, kv, kf) float32: labelled keys
    # clustered layout (workbench.squeezed.layout): labels sorted, order (layers, kv, n_mid)
    # int64 is the permutation of the context's middle rows that sorts them; None: positions
    order: torch.Tensor | None = None
    vote: str = "max"             # how a block's query rows combine estimates ("mean" / "max")

    @classmethod
    def from_index(cls, index: SqueezedIndex, budget: float, *, hierarchical: bool = False,
                   block_size: int | None = 16, device="cuda",
                   dtype: torch.dtype = torch.bfloat16,
                   allocation: str = "threshold", vote: str = "max") -> DevicePlan:
        if allocation not in DEVICE_ALLOCATIONS:
            raise WorkbenchError(f"The device path supports allocation {DEVICE_ALLOCATIONS}, "
                                 f"not {allocation!r}.")
        t = index.thresholds(budget, block_size, hierarchical, vote=vote)
        lab_dtype = torch.int16 if index.fine.shape[2] < 2 ** 15 else torch.int32
        labels = index.labels.long()
        counts = torch.zeros(index.fine.shape[:3], dtype=torch.float32).scatter_add_(
            2, labels, torch.ones(labels.shape))                           # (L, kv, kf)
        shares = tuple(t.layer_fractions) or (t.clustered_fraction,) * index.fine.shape[0]
        return cls(
            fine=index.fine.to(device, dtype), fine_log_sizes=index.fine_sizes.float().log()
            .to(device), coarse=index.coarse.to(device, dtype),
            coarse_log_sizes=index.coarse_sizes.float().log().to(device),
            parent=index.parent.to(device), labels=index.labels.to(device, lab_dtype),
            fine_threshold=t.fine, coarse_threshold=t.coarse, hierarchical=hierarchical,
            context_len=index.context_len, n_sink=index.n_sink, window=index.window,
            scaling=index.scaling, allocation=allocation, layer_shares=shares,
            member_counts=counts.to(device), vote=vote)



def layer_allocation(p: torch.Tensor, members: torch.Tensor, share: float,
                     n_clustered: int) -> torch.Tensor:
    """keep (b, kv, nb, kf) bool: per (batch, query block), centroids in decreasing estimate,
    pooled over the layer's KV heads, while their keys fit floor(share * kv * n_clustered)
    (whole clusters: the spend never passes the share, and falls short by less than one
    cluster). Unscored centroids (estimate 0) are never kept. p (b, kv, nb, kf) float32,
    members (kv, kf) keys per centroid. All on the device, no host sync."""
    b, kv, nb, kf = p.shape
    total = min(kv * n_clustered, math.floor(share * kv * n_clustered))
    pooled = p.permute(0, 2, 1, 3).reshape(b, nb, kv * kf)                  # (b, nb, kv*kf)
    order = pooled.argsort(dim=-1, descending=True)
    sizes = members.reshape(1, 1, kv * kf).expand(b, nb, -1)
    fits = (torch.gather(sizes, -1, order).cumsum(-1) <= total) \
        & (torch.gather(pooled, -1, order) > 0)
    keep = torch.zeros_like(fits).scatter_(-1, order, fits)
    return keep.reshape(b, nb, kv, kf).permute(0, 2, 1, 3)


def pruned_coarse_lse(q: torch.Tensor, coarse: torch.Tensor, coarse_log_sizes: torch.Tensor,
                      keep_c: torch.Tensor, scaling: float, block_size: int | None):
    """log sum over pruned coarse centroids of N_c exp(s_c), per query row of each block:
    the denominator mass that the unscored fine centroids stand for.
    q (b, hq, q_len, d); coarse (kv, kc, d); keep_c (b, kv, nb, kc) -> (b, kv, nb, group * bs)."""
    x, _ = block_rows(q.float(), coarse.shape[0], block_size)               # (b, kv, nb, r, d)
    s = torch.einsum("bhnrd,hkd->bhnrk", x, coarse.float()) * scaling      # (b, kv, nb, r, kc)
    s = s + coarse_log_sizes[None, :, None, None, :]
    return torch.logsumexp(s.masked_fill(keep_c[:, :, :, None, :], -math.inf), dim=-1)


def centroid_estimates(plan: DevicePlan, layer: int, q: torch.Tensor,
                       block_size: int | None, backend: str = "auto",
                       rows: bool = False) -> torch.Tensor:
    """(b, kv, nb, kf) float32: estimated attention per key of every fine centroid (0 for the
    children of pruned coarse centroids, hierarchical). rows: one-level estimates from the
    prefill kernel (`kernels.squeezed_prefill.prefill_keep`, query rows stationary)."""
    if not plan.hierarchical:
        if rows:
            return prefill_keep(q, plan.fine[layer], plan.fine_log_sizes[layer], plan.scaling,
                                block_size, None, backend=backend, vote=plan.vote)
        return centroid_keep(q, plan.fine[layer], plan.fine_log_sizes[layer], plan.scaling,
                             block_size, None, backend=backend, vote=plan.vote)
    pc = centroid_scores(q, plan.coarse[layer], plan.coarse_log_sizes[layer], plan.scaling,
                         block_size, backend=backend, vote=plan.vote)       # (b, kv, nb, kc)
    keep_c = pc >= plan.coarse_threshold
    b, kv, nb, _ = keep_c.shape
    kf = plan.fine.shape[2]
    cand = torch.gather(keep_c, 3, plan.parent[layer][None, :, None, :].expand(b, kv, nb, kf))
    cidx, ccnt = compact_mask(cand, backend=backend)                        # (b, kv, nb, kf)
    extra = pruned_coarse_lse(q, plan.coarse[layer], plan.coarse_log_sizes[layer], keep_c,
                              plan.scaling, block_size)
    pf = centroid_scores(q, plan.fine[layer], plan.fine_log_sizes[layer], plan.scaling,
                         block_size, indices=cidx, counts=ccnt, extra_lse=extra,
                         backend=backend, vote=plan.vote)                   # (b, kv, nb, kf)
    valid = torch.arange(kf, device=q.device) < ccnt[..., None]
    p = torch.zeros(b, kv, nb, kf + 1, dtype=pf.dtype, device=q.device)
    p.scatter_(3, torch.where(valid, cidx.long(), kf), torch.where(valid, pf, 0.0))
    return p[..., :kf]


def kept_centroids(plan: DevicePlan, layer: int, q: torch.Tensor, block_size: int | None,
                   backend: str = "auto", rows: bool = False,
                   keep_tuning: dict | None = None) -> torch.Tensor:
    """(b, kv, nb, kf) bool: the fine centroids the plan's allocation keeps. rows: one-level
    lookups through the prefill kernel (`prefill_keep`; the same flags). keep_tuning: keyword
    settings of the one-level `centroid_keep` (fuse_lse, block_k, num_warps), for benchmarks."""
    if plan.allocation == "layer":
        p = centroid_estimates(plan, layer, q, block_size, backend, rows)
        return layer_allocation(p, plan.member_counts[layer], plan.layer_shares[layer],
                                plan.labels.shape[-1])
    if not plan.hierarchical and rows:
        return prefill_keep(q, plan.fine[layer], plan.fine_log_sizes[layer], plan.scaling,
                            block_size, plan.fine_threshold, backend=backend, vote=plan.vote)
    if not plan.hierarchical:                   # fused: estimates never leave the kernel
        return centroid_keep(q, plan.fine[layer], plan.fine_log_sizes[layer], plan.scaling,
                             block_size, plan.fine_threshold, backend=backend, vote=plan.vote,
                             **(keep_tuning or {}))
    p = centroid_estimates(plan, layer, q, block_size, backend)
    return (p >= plan.fine_threshold) & (p > 0)


def fast_squeezed_attention(plan: DevicePlan, layer: int, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, block_size: int | None = 16,
                            backend: str = "auto", return_counts: bool = False,
                            fused_select: bool | None = None, chunk: int | None = None,
                            tuning: dict | None = None, prefill: str | None = None):
    """Squeezed attention of user queries q (b, hq, q_len, d), the last q_len of the keys
    k, v (b, kv, n + u, d) whose first n = plan.context_len are the fixed context.

    Decode (one query) and `fused_select` True/False: the chunked path. Context positions are
    selected chunk by chunk, inside the attention launch (`select_and_attend`, fused_select
    True, the default for decode: 2.21x vs 1.94x dense at 128K, 1/8, Llama-3 shape on the H200)
    or in a separate `select_chunks` launch (False), one split per chunk, then the LSE merge.
    chunk: context positions per split (default: `chunk_size`'s).

    Prefill (q_len > 1) by default: `kernels.squeezed_prefill`, shaped for tensor cores:
    centroid flags with the query rows stationary (`prefill_keep`), one flat kept list per
    block (`select_flat`), and a gathered FlashAttention over 64-row tiles that covers the user
    tokens too (`sparse_prefill`); blocks of fewer than PREFILL_MIN_ROWS query rows keep the
    flags of `prefill_keep` but attend through `select_chunks` + the chunked kernel. prefill
    "rows" forces the prefill kernels, "chunks" the chunked path of decode throughout (the same
    function, other kernels).
    tuning: launch settings of the attention kernel, for benchmarks (see `sparse_attention`);
    its keys "fuse_lse", "keep_block_k" and "keep_warps" go to the one-level lookup instead
    (`centroid_keep`'s fuse_lse, block_k, num_warps).
    Returns (b, hq, q_len, d), and with return_counts also the kept counts (b, kv, n_blocks)."""
    n = plan.context_len
    q_len = q.shape[2]
    u = k.shape[2] - n
    if prefill not in (None, "rows", "chunks"):
        raise WorkbenchError(f"fast_squeezed_attention: prefill must be 'rows' or 'chunks', "
                             f"not {prefill!r}.")
    rows = q_len > 1 and fused_select is None and prefill != "chunks"
    tuning = dict(tuning or {})
    keep_tuning = {name: tuning.pop(key) for key, name in (
        ("fuse_lse", "fuse_lse"), ("keep_block_k", "block_k"), ("keep_warps", "num_warps"))
        if key in tuning}
    keep = kept_centroids(plan, layer, q, block_size, backend, rows=rows,
                          keep_tuning=keep_tuning)
    if rows and prefill is None:   # blocks of fewer than 64 query rows: the chunked attention
        _, bs = block_layout(q_len, block_size)
        rows = q.shape[1] // k.shape[1] * bs >= PREFILL_MIN_ROWS
        fused_select = None if rows else False
    if rows:
        idx, cnt = select_flat(keep, plan.labels[layer], n, plan.n_sink, plan.window,
                               backend=backend)
        out, _ = sparse_prefill(q, k, v, idx, cnt, block_size, plan.scaling,
                                causal_start=n + u - q_len, user_start=n, user_len=u,
                                backend=backend, tuning=tuning)
        return (out, cnt) if return_counts else out
    if fused_select is None:
        fused_select = q_len == 1
    # one launch: kept context keys chunk by chunk + the user tokens (causal), then one merge
    if fused_select:
        out, _, cnt = select_and_attend(q, k, v, keep, plan.labels[layer], n, plan.n_sink,
                                        plan.window, block_size, plan.scaling,
                                        causal_start=n + u - q_len, user_start=n, user_len=u,
                                        chunk=chunk, backend=backend, tuning=tuning)
    else:
        idx, cnt, _ = select_chunks(keep, plan.labels[layer], n, plan.n_sink, plan.window,
                                    chunk, backend=backend)
        out, _ = sparse_attention(q, k, v, idx, cnt, block_size, plan.scaling,
                                  causal_start=n + u - q_len, user_start=n, user_len=u,
                                  backend=backend, tuning=tuning)
    return (out, cnt.sum(-1)) if return_counts else out
