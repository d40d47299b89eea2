"""Squeezed Attention: cluster a fixed context's keys offline, look up the keys a user query
needs through the centroids online, and attend only those (plus the user's own tokens).

    from workbench.squeezed import build_index, squeezed_attention, SqueezedIndex

    index = build_index(model, context_ids)                  # offline: keys, k-means, hierarchy
    index.save("ctx.safetensors")                            # SqueezedIndex.load(..., model=, context_ids=)
    with squeezed_attention(model, index, budget=1/8, hierarchical=True) as sq:
        model.generate(torch.cat([context_ids, user_ids])[None], max_new_tokens=32)
    sq.kept_fraction()

Baselines at the same budget (`StreamingSelector`, `RandomSelector`, `QuestSelector`,
`OracleSelector`) go through the same `squeezed_attention(model, selector, context_ids=...)`.
"""

from workbench.squeezed.attention import SqueezedAttention, squeezed_attention
from workbench.squeezed.capture import ContextCapture, capture_context, context_hash
from workbench.squeezed.clustering import Clustering, kmeans_cosine
from workbench.squeezed.index import SqueezedIndex, Thresholds, build_index, check_budget
from workbench.squeezed.selectors import (
    OracleSelector,
    QuestSelector,
    RandomSelector,
    Selector,
    SqueezedSelector,
    StreamingSelector,
)

__all__ = [
    "Clustering", "ContextCapture", "OracleSelector", "QuestSelector", "RandomSelector",
    "Selector", "SqueezedAttention", "SqueezedIndex", "SqueezedSelector", "StreamingSelector",
    "Thresholds", "build_index", "capture_context", "check_budget", "context_hash",
    "kmeans_cosine", "squeezed_attention",
]
