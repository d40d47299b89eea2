"""Views of squeezed attention: a centroid cluster explorer and a per-layer/per-head budget map.

    explorer = centroid_explorer(index, keys, user_queries)   # keys: capture.keys
    explorer                                                  # controls above the figure
    budget_heatmap(sq.kept_per_head())                        # after a squeezed forward

The explorer projects one KV head's clustered keys to 2-D (principal components of the unit
keys: the cosine geometry k-means used), colours keys by cluster, draws each centroid as a
diamond sized by its cluster's size and coloured by the current query's estimated per-key
attention, and outlines the keys the lookup keeps at the chosen budget. Its title gives what
that choice costs and buys for this query: the share of keys kept, the share of the query's
true attention mass they hold (from the real keys), and the bytes-based speedup estimate
1 / (kept + centroid reads) against reading every key.
"""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go
import torch

from workbench.widgets.figures import base_layout
from workbench.widgets.layout import controls_and_figure

BUDGETS = {"1/2": 0.5, "1/4": 0.25, "1/8": 0.125, "1/16": 0.0625}


def _projection(keys: torch.Tensor) -> torch.Tensor:
    """(n, d) -> (n, 2): the top two principal components of the unit keys."""
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    centered = unit - unit.mean(0)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    return centered @ v[:2].T


def explorer_state(index, keys: list[torch.Tensor], user_queries: torch.Tensor, layer: int,
                   head: int, budget: float, query: int, hierarchical: bool = False,
                   allocation: str = "layer") -> dict:
    """Everything the explorer draws for one choice (also handy to test or print).

    keys: per layer (kv, n, d) context keys; user_queries (layers, hq, u, d). The kept keys are
    what `SqueezedSelector` keeps for this query token (`allocation` as in squeezed_attention).
    """
    from workbench.squeezed.selectors import SqueezedSelector

    n, ns, win = index.context_len, index.n_sink, index.window
    g = index.q_heads // index.kv_heads
    k_mid = keys[layer][head, ns:n - win].float().cpu()                     # (n_mid, d)
    q_all = user_queries[layer][None, :, query:query + 1].float().cpu()     # (1, hq, 1, d)
    sel = SqueezedSelector(index, budget, hierarchical=hierarchical, block_size=1,
                           allocation=allocation)
    t = sel.thresholds
    p = index.estimates(layer, q_all, 1, hierarchical, t.coarse)[0, head, 0]  # (kf,)
    labels = index.labels[layer, head]                                       # (n_mid,)
    kept_all = sel.select(layer, q_all, keys[layer][None].float().cpu())[0, head, 0]  # (n,)
    kept_mid = kept_all[ns:n - win]                                          # (n_mid,)
    # true attention of this head group's queries over the whole context
    qh = q_all[0, head * g:(head + 1) * g, 0]                                # (g, d)
    k_all = keys[layer][head].float().cpu()                                  # (n, d)
    att = torch.softmax(qh @ k_all.T * index.scaling, dim=-1).mean(0)        # (n,)
    kept_frac = float(kept_all.float().mean())
    centroid_share = index.fine.shape[2] / n * 0.5                           # K only, not V
    return {
        "xy": _projection(k_mid), "labels": labels, "kept": kept_mid, "p": p,
        "sizes": index.fine_sizes[layer, head], "kept_fraction": kept_frac,
        "mass_kept": float(att[kept_all].sum()), "speedup_estimate":
        1.0 / min(1.0, kept_frac + centroid_share), "threshold": t.fine,
    }


def cluster_figure(state: dict, title: str = "") -> go.Figure:
    """Keys (coloured by cluster, kept ones outlined) and centroids (size ~ cluster size,
    colour = estimated per-key attention of the current query)."""
    xy, labels, kept = state["xy"], state["labels"], state["kept"]
    kf = state["p"].numel()
    member_sum = torch.zeros(kf, 2).index_add_(0, labels, xy)
    count = torch.bincount(labels, minlength=kf).clamp_min(1)[:, None]
    cxy = member_sum / count                                                 # (kf, 2)
    fig = go.Figure()
    for flag, name, opacity in ((False, "dropped keys", 0.25), (True, "kept keys", 0.95)):
        sel = kept == flag
        fig.add_trace(go.Scattergl(
            x=xy[sel, 0].tolist(), y=xy[sel, 1].tolist(), mode="markers", name=name,
            marker=dict(size=5 if flag else 4, color=(labels[sel] % 10).tolist(),
                        colorscale="Turbo", opacity=opacity,
                        line=dict(width=1 if flag else 0, color="black"))))
    sizes = state["sizes"].float()
    used = sizes > 0
    score = torch.log10(state["p"].clamp_min(1e-12))
    fig.add_trace(go.Scatter(
        x=cxy[used, 0].tolist(), y=cxy[used, 1].tolist(), mode="markers", name="centroids",
        marker=dict(symbol="diamond", size=(4 + 3 * sizes[used].sqrt()).clamp_max(30).tolist(),
                    color=score[used].tolist(), colorscale="Viridis",
                    colorbar=dict(title="log10 p", x=1.02), line=dict(width=1, color="white")),
        text=[f"cluster {i}: {int(s)} keys, p={float(v):.2e}" for i, s, v in
              zip(torch.nonzero(used)[:, 0].tolist(), sizes[used], state["p"][used],
                  strict=True)],
        hoverinfo="text"))
    fig.update_xaxes(title="principal component 1 (unit keys)")
    fig.update_yaxes(title="principal component 2")
    return base_layout(fig, title, height=480)


def centroid_explorer(index, keys: list[torch.Tensor], user_queries: torch.Tensor,
                      layer: int = 20, head: int = 0, budget: str = "1/8", query: int = -1):
    """Controls (layer, KV head, budget, query token, hierarchical) above the cluster view."""
    u = user_queries.shape[2]
    controls = {
        "layer": W.IntSlider(value=layer, min=0, max=index.layers - 1, description="layer"),
        "head": W.IntSlider(value=head, min=0, max=index.kv_heads - 1, description="KV head"),
        "budget": W.SelectionSlider(options=list(BUDGETS), value=budget, description="budget"),
        "query": W.IntSlider(value=query % u, min=0, max=u - 1, description="query token"),
        "hierarchical": W.Checkbox(value=False, description="hierarchical"),
    }

    def draw(layer, head, budget, query, hierarchical):
        s = explorer_state(index, keys, user_queries, layer, head, BUDGETS[budget], query,
                           hierarchical)
        title = (f"layer {layer}, KV head {head}, budget {budget}: keeps "
                 f"{s['kept_fraction']:.1%} of keys holding {s['mass_kept']:.1%} of the "
                 f"attention; ~{s['speedup_estimate']:.1f}x fewer bytes")
        return cluster_figure(s, title)

    return controls_and_figure(controls, draw)


def budget_heatmap(kept: torch.Tensor, title: str | None = None) -> go.Figure:
    """kept (layers, kv_heads): the share of the context each head kept (e.g.
    `SqueezedAttention.kept_per_head()`): how the selection shared out the budget."""
    kept = kept.float().cpu()
    mean = float(kept.mean())
    fig = go.Figure(go.Heatmap(
        z=kept.T.tolist(), x=list(range(kept.shape[0])), y=[f"KV head {h}" for h in
                                                              range(kept.shape[1])],
        colorscale="Blues", zmin=0, zmax=max(1e-6, float(kept.max())),
        colorbar=dict(title="kept"), hovertemplate="layer %{x}, %{y}: %{z:.1%}<extra></extra>"))
    fig.update_xaxes(title="layer")
    return base_layout(fig, title or f"Share of the context each head keeps (mean {mean:.1%})",
                       height=260)
