"""Clustered layout of a fixed context's KV rows: each cluster's keys stored next to each other.

    cplan = clustered_plan(plan)                       # labels sorted per layer and KV head
    kc, vc = to_clustered(cplan, layer, k, v)          # context rows reordered, user rows as is
    o = fast_squeezed_attention(cplan, layer, q, kc, vc)   # == the same on (plan, k, v)

Squeezed attention keeps whole clusters. In position order a cluster's keys are scattered over
the context, so the kernel gathers single 256-byte rows; sorted by cluster, every kept cluster
is one contiguous run of rows, read like a dense slice. The fixed context is known offline and
attention over it is a sum over a set of (post-RoPE) keys, so the order of its rows does not
change any result as long as the context stays before the user tokens: the first n_sink and
last `window` positions keep their places (the kernels always keep them by position), the
clustered middle is reordered once per context. Whether the contiguous runs pay off is for the
GPU benchmark to say (`benchmarks/bench_squeezed.py`, "squeezed (clustered layout)").

Shapes: labels (layers, kv, n_mid) with n_mid = n - n_sink - window; order (layers, kv, n_mid)
int64 (a stable argsort of the labels); k, v (b, kv, n + u, d).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from workbench.squeezed.fastpath import DevicePlan


def clustered_plan(plan: DevicePlan) -> DevicePlan:
    """The same plan over the clustered layout: labels sorted per layer and KV head, with the
    order that sorts them (`plan.order`, used by `to_clustered`)."""
    order = torch.sort(plan.labels.long(), dim=-1, stable=True).indices    # (L, kv, n_mid)
    labels = torch.gather(plan.labels, -1, order)
    return replace(plan, labels=labels, order=order)


def to_clustered(plan: DevicePlan, layer: int, k: torch.Tensor, v: torch.Tensor):
    """Copies of k, v (b, kv, n + u, d) with the context's clustered middle reordered by
    `plan.order[layer]` (sink, window and user rows in place)."""
    if plan.order is None:
        raise ValueError("to_clustered needs a plan from clustered_plan(plan).")
    lo = plan.n_sink
    hi = plan.context_len - plan.window
    idx = plan.order[layer].to(k.device)[None, :, :, None]                  # (1, kv, n_mid, 1)
    out = []
    for x in (k, v):
        y = x.clone()
        y[:, :, lo:hi] = torch.gather(x[:, :, lo:hi], 2, idx.expand(x.shape[0], -1, -1,
                                                                     x.shape[-1]))
        out.append(y)
    return out[0], out[1]
