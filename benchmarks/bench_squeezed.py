"""Benchmark squeezed attention (lookup + sparse FlashAttention) against dense SDPA and against
"PyTorch gather of the kept keys + SDPA", decode and prefill, at real model shapes.

    python -m benchmarks.bench_squeezed --out DIR       # GPU: writes DIR/squeezed_<gpu>.json
    TRITON_INTERPRET=1 python -m benchmarks.bench_squeezed --out /tmp   # CPU smoke test (tiny)

Order (the Triton tutorials'): correctness on this device first (every kernel against its
PyTorch reference with flash-attention's tolerance rule; the whole kernel path against the
readable masked path), then timings, all in one run so the speedups are ratios of times
measured together.

Shapes (GPU): Llama-2-7B attention (32 query heads = 32 KV heads, d 128) and Llama-3-8B (32 q /
8 KV, d 128), bf16, batch 1, fixed contexts of 32K and 128K tokens, KV budgets 1/4, 1/8, 1/16.
Decode: one query token after 512 user tokens. Prefill: 512 user tokens at once. Keys and
queries are random (speed does not depend on their values); the centroids are random with
5% as many fine centroids as keys and 1/8 as many coarse ones, random cluster labels, and
thresholds set on the benchmark's own queries so that exactly the budget is kept (a real index
calibrates them offline; see workbench.squeezed.index).

Variants per case:
  dense sdpa          F.scaled_dot_product_attention over context + user keys (GQA natively
                      with enable_gqa; prefill with a bottom-right causal mask). The baseline.
  gather + sdpa       torch.gather of the kept context keys/values (one set per KV head), then
                      SDPA over them plus the user keys.
  lookup only         centroid keep flags + chunked selection of the kept positions.
  sparse attn only    the gathered sparse kernel over given chunked indices (context part);
                      with --tune also at other launch settings (block_n, warps, stages).
  squeezed            the full kernel path, lookup included: centroid keep flags, select_chunks,
                      sparse attention of context and user parts, LSE merge (one-level).
  squeezed (separate / fused select)  the other choice than the default, which selects
                      inside the attention launch (`select_and_attend`) for decode and in
                      its own launch (`select_chunks`) for prefill.
  squeezed (fused, chunk C)  fused, C context positions per split (default: ~512 programs).
  squeezed (cfg)      with --tune: the default path at other attention launch settings.
  squeezed [variant]  decode, largest context, 1/8 (--quick too; --no-variants skips them):
                      DECODE_VARIANTS, launch variants of the attention and of the lookup
                      (L2 prefetch ahead, deeper pipelines, 2-launch lookup); `sparse attn
                      only [variant]` the attention-side ones on given indices.
  squeezed (clustered layout)  the same on a context whose rows are sorted by cluster
                      (`workbench.squeezed.layout`): kept clusters are contiguous runs.
  squeezed-hier       the same with the two-level lookup.
  squeezed (layer alloc)  one-level with allocation 'layer' (the evaluated default): estimates,
                      then whole clusters by an on-device argsort per query block.
  squeezed (1 set)    prefill only: one key set for all 512 user queries (the paper's choice).
  squeezed (block 64) prefill only: one key set per 64 user queries (fewer gathered bytes).
  squeezed (R% centroids)  largest context, 1/8, with the variants: the default path with the
                      centroid counts of the quality runs (QUALITY_CENTROID_RATIOS; the rows
                      above use the paper's 5%); prefill rows use one key set.
  dense flash bound   prefill only: SDPA's flash kernel over the context keys, no mask: a lower
                      bound on any dense prefill (the masked SDPA above falls back to a slower
                      kernel); `best_variant_vs_flash_bound` in the targets.

The baseline of each speedup is the faster of dense SDPA with native GQA and dense SDPA over
K/V expanded to every query head beforehand.

Each decode row also carries the bytes it must read (kept K/V rows, centroids, labels, user
part) and `floor_ratio` = time / (bytes / bandwidth), the bandwidth being what dense SDPA
achieved in the same run (the best read rate seen here). `graph_ms` replays a CUDA graph of the
call, which removes launch overhead as a serving engine's decode loop does.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from benchmarks.harness import (
    H200_COPY_GBPS,
    copy_bandwidth_gbps,
    device_name,
    device_slug,
    graph_ms,
    kernel_profile,
    print_table,
    result_row,
    time_ms,
    write_results,
)
from kernels.dispatch import HAS_TRITON, is_interpreted
from kernels.squeezed_attention import (
    _sparse_attention_kernel,
    chunked_to_flat,
    sparse_attention,
    sparse_attention_reference,
)
from kernels.squeezed_lookup import (
    centroid_scores,
    centroid_scores_reference,
    compact_mask,
    compact_mask_reference,
)
from kernels.squeezed_prefill import (
    prefill_keep,
    prefill_keep_reference,
    select_flat,
    sparse_prefill,
    sparse_prefill_reference,
)
from kernels.squeezed_select import (
    centroid_keep,
    centroid_keep_reference,
    select_chunks,
    select_chunks_reference,
)
from kernels.testing import assert_matches_reference, fresh_seed
from workbench.squeezed.fastpath import DevicePlan, fast_squeezed_attention, kept_centroids
from workbench.squeezed.layout import clustered_plan, to_clustered
from workbench.squeezed.lookup import weighted_threshold

BUDGETS = (1 / 4, 1 / 8, 1 / 16)


@dataclass(frozen=True)
class Shape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


GPU_SHAPES = (Shape("llama2-7b", 32, 32, 128), Shape("llama3-8b", 32, 8, 128))
GPU_CONTEXTS = (32 * 1024, 128 * 1024)
CPU_SHAPES = (Shape("tiny-gqa", 4, 2, 32),)
CPU_CONTEXTS = (509,)


# ----------------------------------------------------------------------------------------------
# Inputs: random keys, random centroids, thresholds that keep exactly the budget
# ----------------------------------------------------------------------------------------------


def random_plan(shape: Shape, n: int, q: torch.Tensor, budget: float, hierarchical: bool,
                block_size: int | None, gen: torch.Generator, dtype, device, n_sink: int = 4,
                window: int = 64, centroid_ratio: float = 0.05,
                coarse_ratio: float = 0.125) -> DevicePlan:
    """A DevicePlan with random centroids whose thresholds keep `budget` of the context for q."""
    kv, d = shape.kv_heads, shape.head_dim
    n_mid = n - n_sink - window
    kf = max(2, round(centroid_ratio * n_mid))
    kc = max(1, round(coarse_ratio * kf))
    fine = torch.randn(kv, kf, d, generator=gen) * 0.5
    labels = torch.randint(0, kf, (kv, n_mid), generator=gen)
    sizes = torch.zeros(kv, kf).scatter_add_(1, labels, torch.ones(kv, n_mid)).clamp_min(1)
    parent = torch.sort(torch.randint(0, kc, (kv, kf), generator=gen), dim=1).values
    csizes = torch.zeros(kv, kc).scatter_add_(1, parent, sizes).clamp_min(1)
    coarse = torch.randn(kv, kc, d, generator=gen) * 0.5
    plan = DevicePlan(
        fine=fine.to(device, dtype), fine_log_sizes=sizes.log().to(device),
        coarse=coarse.to(device, dtype), coarse_log_sizes=csizes.log().to(device),
        parent=parent.to(device), labels=labels.to(device, torch.int16 if kf < 2 ** 15
                                                     else torch.int32),
        fine_threshold=-math.inf, coarse_threshold=-math.inf, hierarchical=hierarchical,
        context_len=n, n_sink=n_sink, window=window, scaling=d ** -0.5)
    frac = min(1.0, max(0.0, (budget * n - n_sink - window) / n_mid))
    w = sizes.to(device)
    if hierarchical:
        pc = centroid_scores(q, plan.coarse, plan.coarse_log_sizes, plan.scaling, block_size,
                             backend="torch", vote=plan.vote)
        plan.coarse_threshold = _between(pc, weighted_threshold(
            pc, csizes.to(device)[None, :, None].expand_as(pc), min(1.0, 3 * frac)))
    # fine threshold on the estimates the path will compute (one-level or hierarchical)
    p = _estimates_for_threshold(plan, q, block_size)
    plan.fine_threshold = _between(p, weighted_threshold(p, w[None, :, None].expand_as(p), frac))
    return plan


def layer_plan(plan: DevicePlan, budget: float) -> DevicePlan:
    """The same centroids with allocation 'layer' (squeezed_attention's default): the layer
    keeps the best whole clusters, pooled over its KV heads, up to its share of the keys."""
    labels = plan.labels[0].long()                                          # (kv, n_mid)
    counts = torch.zeros(plan.fine.shape[1:3], device=labels.device).scatter_add_(
        1, labels, torch.ones(labels.shape, device=labels.device))
    n_mid = labels.shape[1]
    share = min(1.0, max(0.0, (budget * plan.context_len - plan.n_sink - plan.window) / n_mid))
    return replace(plan, allocation="layer", layer_shares=(share,), member_counts=counts[None])


def _between(values: torch.Tensor, threshold: float) -> float:
    """The threshold moved halfway to the next smaller value, so that no estimate ties with it
    (a tie would make kernel and reference keep different sets over a rounding difference)."""
    below = values[values < threshold]
    return threshold if below.numel() == 0 else (threshold + float(below.max())) / 2


def _estimates_for_threshold(plan: DevicePlan, q, block_size):
    """Per-fine-centroid estimates the plan's lookup computes (0 where not scored)."""
    from workbench.squeezed.lookup import centroid_estimates, hierarchical_estimates

    sizes = plan.fine_log_sizes.exp()
    if not plan.hierarchical:
        return centroid_estimates(q, plan.fine.float(), sizes, plan.scaling, block_size,
                                  vote=plan.vote)
    p, _ = hierarchical_estimates(q, plan.fine.float(), sizes, plan.coarse.float(),
                                  plan.coarse_log_sizes.exp(), plan.parent,
                                  plan.coarse_threshold, plan.scaling, block_size,
                                  vote=plan.vote)
    return p


# plans hold one layer: add the layer dim the path indexes
def _one_layer(plan: DevicePlan) -> DevicePlan:
    for name in ("fine", "fine_log_sizes", "coarse", "coarse_log_sizes", "parent", "labels"):
        setattr(plan, name, getattr(plan, name)[None])
    return plan


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def _lower_right(q_len: int, k_len: int, device):
    try:
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(q_len, k_len)
    except Exception:
        pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        return torch.arange(k_len, device=device)[None, :] <= pos


def dense_sdpa(q, k, v, scaling):
    """Dense SDPA over all keys, GQA natively, causal bottom-right when q_len > 1 (the
    CausalBias of torch.nn.attention.bias keeps the flash/efficient kernels; a boolean mask
    where it is missing or refuses the call)."""
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right(q_len, k_len,
                                                                              q.device),
                                              scale=scaling, enable_gqa=gqa)
    except Exception:
        pos = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        mask = torch.arange(k_len, device=q.device)[None, :] <= pos
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                              enable_gqa=gqa)


def flash_bound(q, k, v, scaling):
    """A lower bound on dense prefill time: SDPA's flash kernel over the context keys only, no
    mask (the 512 user keys and their causal mask would add to it). Not a correct attention for
    the user part: a timing reference for the best dense kernel, K/V expanded for GQA when the
    flash kernel refuses enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return F.scaled_dot_product_attention(q, k, v, scale=scaling,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        except RuntimeError:
            g = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1),
                                                  v.repeat_interleave(g, 1), scale=scaling)


def gather_sdpa(q, k, v, idx_one, n, scaling):
    """torch.gather of the kept context rows (one set per KV head, idx_one (b, kv, m) int64)
    plus the user keys, then SDPA."""
    d = k.shape[-1]
    kk = torch.gather(k[:, :, :n], 2, idx_one[..., None].expand(-1, -1, -1, d))
    vv = torch.gather(v[:, :, :n], 2, idx_one[..., None].expand(-1, -1, -1, d))
    kk = torch.cat([kk, k[:, :, n:]], 2)
    vv = torch.cat([vv, v[:, :, n:]], 2)
    return dense_sdpa(q, kk, vv, scaling)


# ----------------------------------------------------------------------------------------------
# Correctness on this device
# ----------------------------------------------------------------------------------------------


def check_correctness(device: str) -> list[str]:
    """Each kernel against its reference (tolerance rule of kernels.testing), fresh seeds."""
    lines = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        seed = fresh_seed()
        gen = torch.Generator().manual_seed(seed)
        for (b, hq, kv, q_len, block, n, d) in ((1, 8, 2, 1, 16, 1000, 128),
                                                (1, 6, 3, 37, 16, 777, 64),
                                                (2, 4, 4, 19, None, 301, 40)):
            q = torch.randn(b, hq, q_len, d, generator=gen).to(device, dtype)
            k = torch.randn(b, kv, n, d, generator=gen).to(device, dtype)
            v = torch.randn(b, kv, n, d, generator=gen).to(device, dtype)
            nb = 1 if block is None or block >= q_len else math.ceil(q_len / block)
            mask = (torch.rand(b, kv, nb, n, generator=gen) < 0.13).to(device)
            idx, cnt = compact_mask_reference(mask)
            rep = assert_matches_reference(
                lambda *a: sparse_attention(*a, backend="triton"), sparse_attention_reference,
                (q, k, v, idx, cnt, block, d ** -0.5), names=("o", "lse"),
                context=f"(sparse_attention seed {seed})")
            got = compact_mask(mask, backend="triton")
            assert torch.equal(got[0], idx) and torch.equal(got[1], cnt), "compact_mask"
            c = torch.randn(kv, 97, d, generator=gen).to(device, dtype)
            ln = torch.log(torch.randint(1, 40, (kv, 97), generator=gen).float()).to(device)
            rep += assert_matches_reference(
                lambda *a: centroid_scores(*a, backend="triton"),
                lambda *a: centroid_scores_reference(*a), (q, c, ln, d ** -0.5, block),
                names=("p",), context=f"(centroid_scores seed {seed})")
            keep = (torch.rand(b, kv, nb, 97, generator=gen) < 0.2).to(device)
            labels = torch.randint(0, 97, (kv, n - 20), generator=gen).to(device, torch.int16)
            thr = float(centroid_scores_reference(q.double(), c.double(), ln.double(),
                                                  d ** -0.5, block).median())
            got_keep = centroid_keep(q, c, ln, d ** -0.5, block, thr, backend="triton")
            want_keep = centroid_keep_reference(q.double(), c.double(), ln.double(), d ** -0.5,
                                                block, thr)
            differ = float((got_keep != want_keep).float().mean())
            assert differ < 0.01, f"centroid_keep: {differ:.3f} of the flags differ"
            ci, cc, ch = select_chunks(keep, labels, n, 4, 16, 256, backend="triton")
            ri, rc = select_chunks_reference(keep, labels, n, 4, 16, 256)
            ok = (torch.arange(ch, device=device) < cc[..., None]).flatten(3)
            assert torch.equal(cc, rc) and torch.equal(ci[ok], ri[ok]), "select_chunks"
            lines.append(f"ok {str(dtype):15s} b{b} hq{hq} kv{kv} q{q_len} n{n} d{d}: "
                         + "; ".join(str(r) for r in rep))
        lines += check_prefill_kernels(device, dtype, gen, seed)
    return lines


def _prefill_fns(idx, cnt, ridx, rcnt, block, scaling, causal, n, u, splits):
    """(kernel, reference) of q, k, v for `assert_matches_reference`."""
    def kernel(q, k, v):
        return sparse_prefill(q, k, v, idx, cnt, block, scaling, causal_start=causal,
                              user_start=n, user_len=u, n_splits=splits, backend="triton")

    def reference(q, k, v):
        return sparse_prefill_reference(q, k, v, ridx, rcnt, block, scaling, causal, n, u)

    return kernel, reference


def check_prefill_kernels(device: str, dtype, gen, seed) -> list[str]:
    """kernels.squeezed_prefill against its references, at shapes with several 128-row tiles
    (one set with GQA, per-block lists, user tokens before the queries, two splits)."""
    lines = []
    for (b, hq, kv, q_len, block, n, u, d, splits) in ((1, 8, 2, 100, None, 3001, 100, 128, None),
                                                       (1, 6, 3, 37, 16, 777, 41, 64, 2),
                                                       (2, 4, 4, 19, None, 301, 19, 40, 1)):
        q = torch.randn(b, hq, q_len, d, generator=gen).to(device, dtype)
        k = torch.randn(b, kv, n + u, d, generator=gen).to(device, dtype)
        v = torch.randn(b, kv, n + u, d, generator=gen).to(device, dtype)
        nb = 1 if block is None or block >= q_len else math.ceil(q_len / block)
        keep = (torch.rand(b, kv, nb, 97, generator=gen) < 0.2).to(device)
        labels = torch.randint(0, 97, (kv, n - 20), generator=gen).to(device, torch.int16)
        idx, cnt = select_flat(keep, labels, n, 4, 16, backend="triton")
        ridx, rcnt = select_flat(keep, labels, n, 4, 16, backend="torch")
        ok = torch.arange(n, device=device) < rcnt[..., None]
        assert torch.equal(cnt, rcnt) and torch.equal(idx[ok], ridx[ok]), "select_flat"
        causal = n + u - q_len
        rep = assert_matches_reference(
            *_prefill_fns(idx, cnt, ridx, rcnt, block, d ** -0.5, causal, n, u, splits),
            (q, k, v), names=("o", "lse"), context=f"(sparse_prefill seed {seed})")
        c = torch.randn(kv, 301, d, generator=gen).to(device, dtype)
        ln = torch.log(torch.randint(0, 40, (kv, 301), generator=gen).float()).to(device)
        rep += assert_matches_reference(
            lambda *a: prefill_keep(*a, backend="triton"), prefill_keep_reference,
            (q, c, ln, d ** -0.5, block, None), names=("p",),
            context=f"(prefill_keep seed {seed})")
        lines.append(f"ok prefill {str(dtype):15s} b{b} hq{hq} kv{kv} q{q_len} n{n} d{d}: "
                     + "; ".join(str(r) for r in rep))
    return lines


def check_fast_path(device: str, dtype) -> str:
    """The whole kernel path vs the same path on the PyTorch references, at a mid shape."""
    gen = torch.Generator().manual_seed(fresh_seed())
    shape, n, u = Shape("check", 8, 2, 128), 4099, 37
    worst = 0.0
    for hierarchical in (False, True):
        for q_len, block, pre in ((1, 16, None), (u, 16, None), (u, None, None),
                                  (u, 16, "chunks")):
            q = torch.randn(1, shape.q_heads, q_len, shape.head_dim, generator=gen)
            q = q.to(device, dtype)
            k = torch.randn(1, shape.kv_heads, n + u, shape.head_dim, generator=gen)
            v = torch.randn(1, shape.kv_heads, n + u, shape.head_dim, generator=gen)
            k, v = k.to(device, dtype), v.to(device, dtype)
            plan = _one_layer(random_plan(shape, n, q, 1 / 8, hierarchical, block, gen, dtype,
                                          device))
            got = fast_squeezed_attention(plan, 0, q, k, v, block, backend="triton",
                                          prefill=pre)
            ref = fast_squeezed_attention(plan, 0, q.double(), k.double(), v.double(), block,
                                          backend="torch", prefill=pre)
            low = fast_squeezed_attention(plan, 0, q, k, v, block, backend="torch", prefill=pre)
            err = float((got.double() - ref).abs().max())
            torch_err = float((low.double() - ref).abs().max())
            worst = max(worst, err / max(torch_err, 1e-6))
            if err > 2 * torch_err + 1e-3:
                raise AssertionError(f"fast path differs from its reference: {err:.3g} vs "
                                     f"torch {torch_err:.3g} (hier {hierarchical}, q {q_len})")
    return f"fast path ok (worst error / torch's own error: {worst:.2f})"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


TUNINGS = (
    (("block_n", 32), ("num_warps", 4)),
    (("block_n", 64), ("num_warps", 8)),
    (("block_n", 128), ("num_warps", 8)),
    (("block_n", 64), ("num_warps", 4), ("num_stages", 3)),
    (("block_n", 64), ("num_warps", 4), ("num_stages", 1)),
    (("block_n", 32), ("num_warps", 2)),
    (("block_n", 16), ("num_warps", 2)),
)


# Decode variants timed next to the default at the largest context, budget 1/8 (also with
# --quick): launch settings of the fused attention (`sparse_attention`'s tuning: L2 prefetch of
# the K/V rows some tiles ahead, deeper cp.async pipelines) and of the one-level lookup
# (`centroid_keep`: fuse_lse = 2 launches instead of 3, keep_block_k). Locally compiled for
# sm_90 (Triton 3.9), the default loop holds one 64-row K/V buffer and waits for all copies at
# the top of every tile: one tile of gathered rows in flight per program.
DECODE_VARIANTS = (
    ("prefetch 1", {"prefetch": 1}),
    ("prefetch 2", {"prefetch": 2}),
    ("prefetch 4, block_n 32", {"prefetch": 4, "block_n": 32}),
    ("prefetch 2 bulk", {"prefetch": 2, "prefetch_bulk": True}),
    ("stages 5", {"num_stages": 5}),
    ("block_n 32, stages 5", {"block_n": 32, "num_stages": 5}),
    ("block_n 64, warps 8, stages 5", {"num_warps": 8, "num_stages": 5}),
    ("fuse_lse", {"fuse_lse": True}),
    ("keep_block_k 64", {"keep_block_k": 64}),
    ("prefetch 2, fuse_lse", {"prefetch": 2, "fuse_lse": True}),
    ("index ahead", {"index_ahead": True}),
    ("index ahead, stages 4", {"index_ahead": True, "num_stages": 4}),
)
SPARSE_VARIANTS = ("prefetch 1", "prefetch 2", "prefetch 4, block_n 32", "stages 5",
                   "block_n 32, stages 5", "index ahead", "index ahead, stages 4")
PROFILED_VARIANTS = ("prefetch 2", "prefetch 2, fuse_lse")
QUALITY_CENTROID_RATIOS = (0.15, 0.25)   # timed next to the default 5% at the largest context


PREFILL_TUNINGS = (      # kernels.squeezed_prefill.sparse_prefill (default 64, 64, 4 warps, 3)
    (("block_m", 64), ("block_n", 32), ("num_warps", 4), ("num_stages", 3)),
    (("block_m", 64), ("block_n", 32), ("num_warps", 4), ("num_stages", 4)),
    (("block_m", 64), ("block_n", 64), ("num_warps", 4), ("num_stages", 2)),
    (("block_m", 64), ("block_n", 128), ("num_warps", 4), ("num_stages", 2)),
    (("block_m", 64), ("block_n", 64), ("num_warps", 8), ("num_stages", 3)),
    (("block_m", 128), ("block_n", 128), ("num_warps", 8), ("num_stages", 3)),
    (("block_m", 128), ("block_n", 64), ("num_warps", 8), ("num_stages", 3)),
)
KEEP_TUNINGS = (         # kernels.squeezed_prefill.prefill_keep (default 128, 64, 4, 3, trans)
    (("block_m", 128), ("block_k", 64), ("num_warps", 4), ("num_stages", 3), ("trans", False)),
    (("block_m", 128), ("block_k", 128), ("num_warps", 4), ("num_stages", 3)),
    (("block_m", 128), ("block_k", 128), ("num_warps", 8), ("num_stages", 2)),
    (("block_m", 64), ("block_k", 64), ("num_warps", 4), ("num_stages", 3)),
    (("block_m", 128), ("block_k", 64), ("num_warps", 8), ("num_stages", 3)),
)


def bench_case(shape: Shape, n: int, mode: str, budget: float, dtype, device: str,
               can_triton: bool, user: int = 512, tune: bool = False, profile: bool = False,
               meta_profile: dict | None = None, tune_prefill: bool = False,
               variants: bool = False) -> list[dict]:
    gen = torch.Generator().manual_seed(fresh_seed())
    hq, kv, d = shape.q_heads, shape.kv_heads, shape.head_dim
    q_len = 1 if mode == "decode" else user
    u = user + (1 if mode == "decode" else 0)
    q = torch.randn(1, hq, q_len, d, generator=gen).to(device, dtype)
    k = torch.randn(1, kv, n + u, d, generator=gen).to(device, dtype)
    v = torch.randn(1, kv, n + u, d, generator=gen).to(device, dtype)
    scaling = d ** -0.5
    itemsize = k.element_size()
    backend = "triton" if can_triton else "torch"
    impls: dict = {"dense sdpa": lambda: dense_sdpa(q, k, v, scaling)}
    if hq != kv:   # K/V expanded to every query head beforehand (not timed): another dense pick
        ke, ve = k.repeat_interleave(hq // kv, 1), v.repeat_interleave(hq // kv, 1)
        impls["dense sdpa (kv expanded)"] = lambda: dense_sdpa(q, ke, ve, scaling)
    plans = {}
    for hier in (False, True):
        plans[(hier, 16)] = _one_layer(random_plan(shape, n, q, budget, hier, 16, gen, dtype,
                                                   device))
    plans[(False, None)] = _one_layer(random_plan(shape, n, q, budget, False, None, gen, dtype,
                                                  device))
    # one key set per KV head (for the gather baseline), and per-block lists for the kernel
    keep_one = kept_centroids(plans[(False, None)], 0, q, None, backend)
    idx1, cnt1, _ = select_chunks(keep_one, plans[(False, None)].labels[0], n, 4, 64,
                                  backend=backend)
    idx1, cnt1 = chunked_to_flat(idx1, cnt1, q_len, None)                  # ascending, -1 pads
    m = int(cnt1.min())
    idx_one = idx1[:, :, 0, :m].long()                                      # (1, kv, m)
    impls["gather + sdpa"] = lambda: gather_sdpa(q, k, v, idx_one, n, scaling)
    plan16 = plans[(False, 16)]
    keep16 = kept_centroids(plan16, 0, q, 16, backend)
    idx16, cnt16, _ = select_chunks(keep16, plan16.labels[0], n, 4, 64, backend=backend)
    kept = float(cnt16.sum(-1).float().mean()) / n
    if mode == "decode":
        impls["lookup only"] = lambda: select_chunks(kept_centroids(plan16, 0, q, 16, backend),
                                                     plan16.labels[0], n, 4, 64,
                                                     backend=backend)
    else:       # the prefill path's lookup: prefill_keep + select_flat
        plan1 = plans[(False, None)]
        impls["lookup only"] = lambda: select_flat(
            kept_centroids(plan16, 0, q, 16, backend, rows=True), plan16.labels[0], n, 4, 64,
            backend=backend)
        impls["lookup only (1 set)"] = lambda: select_flat(
            kept_centroids(plan1, 0, q, None, backend, rows=True), plan1.labels[0], n, 4, 64,
            backend=backend)
        impls["keep flags only (1 set)"] = lambda: kept_centroids(plan1, 0, q, None, backend,
                                                                  rows=True)
        fidx1, fcnt1 = select_flat(keep_one, plan1.labels[0], n, 4, 64, backend=backend)
        fidx16, fcnt16 = select_flat(keep16, plan16.labels[0], n, 4, 64, backend=backend)

        def prefill_only(idx, cnt, block, tuning=None, splits=None):
            return sparse_prefill(q, k[:, :, :n], v[:, :, :n], idx, cnt, block, scaling,
                                  n_splits=splits, backend=backend, tuning=tuning)

        impls["sparse prefill only (ctx)"] = lambda: prefill_only(fidx16, fcnt16, 16)
        impls["sparse prefill only (ctx, 1 set)"] = lambda: prefill_only(fidx1, fcnt1, None)
        if tune_prefill and can_triton:
            for cfg in PREFILL_TUNINGS:
                impls[f"sparse prefill only (ctx, 1 set) {cfg}"] = (
                    lambda c=cfg: prefill_only(fidx1, fcnt1, None, dict(c)))
            impls["sparse prefill only (ctx, 1 set) 2 splits"] = (
                lambda: prefill_only(fidx1, fcnt1, None, splits=2))
            for cfg in KEEP_TUNINGS:
                impls[f"keep flags only (1 set) {cfg}"] = (lambda c=cfg: prefill_keep(
                    q, plan1.fine[0], plan1.fine_log_sizes[0], plan1.scaling, None,
                    plan1.fine_threshold, backend=backend, tuning=dict(c)))

    def sparse_only(tuning=None):
        return sparse_attention(q, k[:, :, :n], v[:, :, :n], idx16, cnt16, 16, scaling,
                                backend=backend, tuning=tuning)

    impls["sparse attn only (ctx)"] = sparse_only
    if tune and can_triton:
        for cfg in TUNINGS:
            impls[f"sparse attn only {cfg}"] = (lambda c=cfg: sparse_only(dict(c)))
    decode_variants = dict(DECODE_VARIANTS) if variants and can_triton and mode == "decode" \
        else {}
    for name in SPARSE_VARIANTS:
        if name in decode_variants:
            impls[f"sparse attn only [{name}]"] = (
                lambda c=decode_variants[name]: sparse_only(dict(c)))
    impls["squeezed"] = lambda: fast_squeezed_attention(plan16, 0, q, k, v, 16, backend)
    impls["squeezed-hier"] = lambda: fast_squeezed_attention(plans[(True, 16)], 0, q, k, v, 16,
                                                             backend)
    if mode == "decode":                   # the other choice than the default fused select
        impls["squeezed (separate select)"] = lambda: fast_squeezed_attention(
            plan16, 0, q, k, v, 16, backend, fused_select=False)
        for ch in (2048, 8192):
            impls[f"squeezed (fused, chunk {ch})"] = (lambda c=ch: fast_squeezed_attention(
                plan16, 0, q, k, v, 16, backend, fused_select=True, chunk=c))
    else:                                  # the chunked path the prefill used before
        impls["squeezed (chunks prefill)"] = lambda: fast_squeezed_attention(
            plan16, 0, q, k, v, 16, backend, prefill="chunks")
    if tune and can_triton:
        for cfg in TUNINGS:
            impls[f"squeezed {cfg}"] = (lambda c=cfg: fast_squeezed_attention(
                plan16, 0, q, k, v, 16, backend, tuning=dict(c)))
    for name, cfg in decode_variants.items():
        impls[f"squeezed [{name}]"] = (lambda c=cfg: fast_squeezed_attention(
            plan16, 0, q, k, v, 16, backend, tuning=dict(c)))
    cplan = clustered_plan(plan16)             # the context's rows sorted by cluster (untimed)
    kc, vc = to_clustered(cplan, 0, k, v)
    impls["squeezed (clustered layout)"] = lambda: fast_squeezed_attention(cplan, 0, q, kc, vc,
                                                                           16, backend)
    plan_layer = layer_plan(plan16, budget)
    impls["squeezed (layer alloc)"] = lambda: fast_squeezed_attention(plan_layer, 0, q, k, v,
                                                                      16, backend)
    if mode == "prefill":
        impls["dense flash bound"] = lambda: flash_bound(q, k[:, :, :n], v[:, :, :n], scaling)
        impls["squeezed (1 set)"] = lambda: fast_squeezed_attention(
            plans[(False, None)], 0, q, k, v, None, backend)
        impls["squeezed (1 set, chunks prefill)"] = lambda: fast_squeezed_attention(
            plans[(False, None)], 0, q, k, v, None, backend, prefill="chunks")
    if profile and can_triton:
        key = f"{shape.name} n{n // 1024}K {mode} 1/{round(1 / budget)}"
        meta_profile[key] = kernel_profile(impls["squeezed"], device)
        for name in PROFILED_VARIANTS:
            for impl in (f"squeezed [{name}]", f"sparse attn only [{name}]"):
                if impl in impls:
                    try:
                        meta_profile[f"{key} {impl}"] = kernel_profile(impls[impl], device)
                    except Exception as error:     # a variant's failure is recorded below
                        meta_profile[f"{key} {impl}"] = [f"failed: {error}"[:200]]
        if mode == "prefill":
            meta_profile[key + " (1 set)"] = kernel_profile(impls["squeezed (1 set)"], device)
    if mode == "prefill":
        plans[(False, 64)] = _one_layer(random_plan(shape, n, q, budget, False, 64, gen, dtype,
                                                    device))
        impls["squeezed (block 64)"] = lambda: fast_squeezed_attention(
            plans[(False, 64)], 0, q, k, v, 64, backend)
    centroid_bytes = {}       # rows whose plan has other centroids than plan16's
    if variants:     # the quality runs' centroid counts (notebook 03: 15% of the keys; more
        # centroids is the lever for far-back items), against the 5% of the rows above
        for ratio in QUALITY_CENTROID_RATIOS:
            block = 16 if mode == "decode" else None      # prefill: the one-set path
            rp = _one_layer(random_plan(shape, n, q, budget, False, block, gen, dtype, device,
                                        centroid_ratio=ratio))
            label = "" if mode == "decode" else "1 set, "
            impls[f"squeezed ({label}{ratio:.0%} centroids)"] = (
                lambda p=rp, blk=block: fast_squeezed_attention(p, 0, q, k, v, blk, backend))
            centroid_bytes[f"squeezed ({label}{ratio:.0%} centroids)"] = \
                kv * rp.fine.shape[2] * d * itemsize
    # bytes a decode step must read: kept K/V rows, indices, centroids (one-level), labels, user
    kf = plan16.fine.shape[2]
    must = {
        "kept_kv": kept * n * kv * 2 * d * itemsize,
        "centroids": kv * kf * d * itemsize,
        "labels": kv * (n - 68) * plan16.labels.element_size(),
        "user_kv": u * kv * 2 * d * itemsize,
        "q_o": 2 * hq * q_len * d * itemsize,
    }
    dense_bytes = (n + u) * kv * 2 * d * itemsize + 2 * hq * q_len * d * itemsize
    times, graphs, notes = {}, {}, {}
    for name, fn in impls.items():
        try:
            fn()
            times[name] = time_ms(fn, device=device)
            graphs[name] = graph_ms(fn, device)
        except Exception as error:
            times[name], graphs[name] = None, None
            notes[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
            print(f"  {name} failed: {notes[name]}", flush=True)
    # variants compute what the default computes (the prefetch changes nothing, other tile
    # sizes change the summation order): their largest difference from the default's output
    diffs = {}
    for name in impls:
        ref = "squeezed" if name.startswith("squeezed [") else "sparse attn only (ctx)" \
            if name.startswith("sparse attn only [") else None
        if ref and times.get(name) and times.get(ref):
            try:
                a, b_ = impls[name](), impls[ref]()
                a, b_ = (a[0] if isinstance(a, tuple) else a), (b_[0] if isinstance(b_, tuple)
                                                              else b_)
                diffs[name] = float((a.float() - b_.float()).abs().max())
            except Exception as error:
                notes[name] = f"compare failed: {type(error).__name__}: {str(error)[:200]}"
    dense_names = [x for x in ("dense sdpa", "dense sdpa (kv expanded)") if times.get(x)]
    base = min((times[x] for x in dense_names), default=None)     # the best dense pick
    base_graph = min((graphs[x] for x in dense_names if graphs.get(x)), default=None)
    dense_gbps = dense_bytes / (times["dense sdpa"] * 1e-3) / 1e9 if times.get("dense sdpa") \
        else None
    rows = []
    for name in impls:
        nbytes = dense_bytes if name.startswith("dense") else int(sum(must.values()))
        if name == "gather + sdpa":
            nbytes = int(must["kept_kv"] + must["user_kv"] + must["q_o"])
        elif name.startswith("sparse attn only"):
            nbytes = int(must["kept_kv"] + must["q_o"])
        elif name == "lookup only":
            nbytes = int(must["centroids"] + must["labels"])
        elif name in centroid_bytes:
            nbytes = int(sum(must.values()) - must["centroids"] + centroid_bytes[name])
        row = result_row(name=f"{shape.name} n{n // 1024}K {mode} 1/{round(1 / budget)}",
                         impl=name, shape={"q_heads": hq, "kv_heads": kv, "head_dim": d,
                                           "context": n, "user": u, "q_len": q_len,
                                           "budget": budget, "kept_fraction": kept},
                         dtype=dtype, median_ms=times[name], baseline_ms=base,
                         bytes_moved=nbytes, note=notes.get(name, ""))
        row["graph_ms"] = graphs[name]
        if name in diffs:
            row["max_diff_vs_default"] = diffs[name]
        row["graph_speedup"] = base_graph / graphs[name] if base_graph and graphs[name] else None
        row["dense_read_gbps"] = dense_gbps
        if mode == "decode" and dense_gbps and times[name]:
            floor_ms = nbytes / (dense_gbps * 1e9) * 1e3
            row["floor_ms"] = floor_ms
            best = min(t for t in (times[name], graphs[name]) if t)
            row["floor_ratio"] = best / floor_ms
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> dict:
    """The issue's targets at 128K, budget 1/8, lookup included (best of eager and graph)."""
    out = {}
    for shape in ("llama2-7b", "llama3-8b"):
        for mode, need in (("decode", 5.0), ("prefill", 4.0)):
            name = f"{shape} n128K {mode} 1/8"
            sel = {r["impl"]: r for r in rows if r["name"] == name}
            if "squeezed" not in sel:
                continue
            r = sel["squeezed"]
            speedups = [s for s in (r["speedup"], r.get("graph_speedup")) if s]
            best = max(speedups) if speedups else None
            gather = sel.get("gather + sdpa", {}).get("median_ms")
            variants = {k: max(x for x in (v["speedup"], v.get("graph_speedup")) if x)
                        for k, v in sel.items() if k.startswith("squeezed")
                        and (v["speedup"] or v.get("graph_speedup"))}
            best_variant = max(variants, key=variants.get) if variants else None
            out[name] = {"speedup_vs_dense": best, "target": need,
                         "met": bool(best and best >= need),
                         "vs_gather_sdpa": gather / r["median_ms"] if gather and
                         r["median_ms"] else None,
                         "floor_ratio": r.get("floor_ratio"),
                         "best_variant": best_variant,
                         "best_variant_speedup": variants.get(best_variant),
                         "floor_target_met": (r.get("floor_ratio") or 99) <= 1.5
                         if mode == "decode" else None}
            bound = sel.get("dense flash bound", {}).get("median_ms")
            if bound and best_variant:
                fastest = min(x for x in (sel[best_variant]["median_ms"],
                                          sel[best_variant].get("graph_ms")) if x)
                out[name]["best_variant_vs_flash_bound"] = bound / fastest
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the JSON (GPU default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="GPU: 128K and budget 1/8 only")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--tune", action="store_true", help="also time launch settings of the "
                        "sparse attention at the largest context, budget 1/8")
    parser.add_argument("--profile", action="store_true", help="GPU: kernel times of the "
                        "squeezed path at the largest context, budget 1/8 (torch.profiler)")
    parser.add_argument("--no-variants", action="store_true", help="skip the decode "
                        "variants (DECODE_VARIANTS) at the largest context, budget 1/8")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names")
    parser.add_argument("--prefill-only", action="store_true", help="skip the decode cases")
    parser.add_argument("--tune-prefill", action="store_true", help="also time launch "
                        "settings of the prefill kernels (one set) at the largest context, 1/8")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    can_triton = HAS_TRITON and (on_gpu or is_interpreted(_sparse_attention_kernel))
    print(f"device: {device_name(device)}; torch {torch.__version__}; triton kernels: "
          f"{'yes' if can_triton else 'no (CPU without TRITON_INTERPRET=1: references)'}",
          flush=True)
    meta: dict = {"dtype": str(dtype), "timing": "triton.testing.do_bench median (L2 cleared "
                  "before each run); graph_ms: CUDA graph replay" if on_gpu else
                  "wall-clock median after warm-up (CPU)", "user_tokens": 512 if on_gpu else 24}
    if on_gpu:
        meta["copy_gbps_measured"] = copy_bandwidth_gbps(device)
        meta["copy_gbps_reference"] = H200_COPY_GBPS
    if can_triton and not args.skip_checks:
        t0 = time.perf_counter()
        try:
            lines = check_correctness(device)
            lines.append(check_fast_path(device, dtype))
        except AssertionError as error:       # recorded in the JSON; the timings still run
            lines = [f"FAILED: {error}"]
        print(f"correctness ({time.perf_counter() - t0:.1f} s):", *lines, sep="\n  ", flush=True)
        meta["correctness"] = lines
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if args.shapes:
        shapes = tuple(x for x in shapes if x.name in args.shapes.split(","))
    contexts = GPU_CONTEXTS if on_gpu else CPU_CONTEXTS
    budgets = BUDGETS
    if args.quick and on_gpu:
        contexts, budgets = (128 * 1024,), (1 / 8,)
    rows, profiles = [], {}
    meta["kernel_profiles"] = profiles
    out_dir = args.out or ("benchmarks/results" if on_gpu else None)
    modes = ("prefill",) if args.prefill_only else ("prefill", "decode")
    cases = [(mode, shape, n, budget) for mode in modes for shape in shapes
             for n in contexts for budget in budgets]
    for i, (mode, shape, n, budget) in enumerate(cases, 1):
        t0 = time.perf_counter()
        last = n == max(contexts) and budget == 1 / 8
        rows += bench_case(shape, n, mode, budget, dtype, device, can_triton,
                           user=meta["user_tokens"], tune=args.tune and last,
                           profile=args.profile and on_gpu and last, meta_profile=profiles,
                           tune_prefill=args.tune_prefill and last,
                           variants=last and not args.no_variants)
        print(f"  {shape.name} n={n} {mode} 1/{round(1 / budget)}: "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        if out_dir:          # after every case, so that a run cut short keeps what it measured
            meta["targets"] = targets(rows)
            meta["cases_done"] = f"{i} of {len(cases)}"
            write_results(f"squeezed_{device_slug(device)}", rows, device=device, meta=meta,
                          out_dir=out_dir)
    meta["targets"] = targets(rows)
    print()
    print_table(rows, ("name", "impl", "median_ms", "speedup", "graph_ms", "graph_speedup",
                       "gbps", "floor_ratio"))
    for name, lines in profiles.items():
        print(f"\nkernels of squeezed, {name}:", *lines, sep="\n  ")
    print("\ntargets:", *[f"{k}: {v}" for k, v in meta["targets"].items()], sep="\n  ")
    if out_dir:
        path = write_results(f"squeezed_{device_slug(device)}", rows, device=device, meta=meta,
                             out_dir=out_dir)
        print(f"\nwrote {path}")
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
