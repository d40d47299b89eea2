"""Small-LM scoring shared by the LM ranker and the token pruners.

    logp = token_logprobs(model, ids)                       # (n,) log p(x_i | x_<i)
    s = suffix_logprob(model, tokenizer, units, question)   # (units,) mean log p(question | unit)

Long inputs run in chunks through the KV cache so the logits never exceed (chunk, vocab) floats
(4K tokens x 49K vocab in one go would be 0.8 GB).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

CHUNK = 512


def cache_arg(model) -> str:
    """transformers 5 names forward's cache argument `cache`; older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


@torch.no_grad()
def extend(model, ids: list[int] | np.ndarray, cache, first_logits: torch.Tensor | None = None,
           chunk: int = CHUNK) -> tuple[np.ndarray, torch.Tensor]:
    """Feed `ids` after what `cache` holds. Returns (log p of each fed token given everything
    before it (n,), the logits after the last token (vocab,)).

    `first_logits` are the logits that predict the first fed token (from the previous call); with
    None the first token gets log p = 0 (nothing predicts it)."""
    arg = cache_arg(model)
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).view(1, -1)  # (1, n)
    out_lp = np.zeros(ids.shape[1], dtype=np.float64)
    prev = first_logits
    for a in range(0, ids.shape[1], chunk):
        piece = ids[:, a:a + chunk]  # (1, c)
        logits = model(input_ids=piece, use_cache=True, **{arg: cache}).logits[0].float()  # (c, V)
        logp = torch.log_softmax(logits, dim=-1)
        targets = piece[0, 1:]
        out_lp[a + 1:a + piece.shape[1]] = logp[:-1].gather(1, targets[:, None])[:, 0].numpy()
        if prev is not None:
            out_lp[a] = float(torch.log_softmax(prev, dim=-1)[piece[0, 0]])
        prev = logits[-1]
    return out_lp, prev


def crop(cache, length: int) -> None:
    """Cut the cache back to its first `length` positions (a negative crop works on every
    transformers version; 5.x refuses positive values, 4.x read them as the final length)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def token_logprobs(model, ids, prefix: list[int] | None = None) -> np.ndarray:
    """log p(x_i | prefix, x_<i) for each token of `ids` (n,); the first token gets 0 without a
    prefix."""
    cache = new_cache(model)
    first = None
    if prefix:
        _, first = extend(model, prefix, cache)
    lp, _ = extend(model, ids, cache, first)
    return lp


@torch.no_grad()
def suffix_logprob(model, tokenizer, prefixes: list[str], suffix: str, batch: int = 16,
                   max_prefix_tokens: int = 160) -> np.ndarray:
    """Mean log p(suffix tokens | prefix) for each prefix (right-padded batches). Prefixes are cut
    to their first `max_prefix_tokens` tokens."""
    suf = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    out = np.zeros(len(prefixes), dtype=np.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for a in range(0, len(prefixes), batch):
        seqs = [tokenizer(p, add_special_tokens=False)["input_ids"][:max_prefix_tokens] or [pad]
                for p in prefixes[a:a + batch]]
        width = max(len(s) for s in seqs) + len(suf)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (b, width)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s) + len(suf)] = torch.tensor(s + suf)
            mask[r, :len(s) + len(suf)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, s in enumerate(seqs):
            pos = torch.arange(len(s) - 1, len(s) - 1 + len(suf))
            out[a + r] = logp[r, pos, torch.tensor(suf)].mean().item()
    return out
