"""Token pruning with the small LM: LLMLingua (self-information) and LongLLMLingua (question-aware
contrastive perplexity), both segment-wise with a budget controller.

Stages, for a budget of B tokens out of n:
1. Segments: paragraphs cut to at most `segment_tokens` tokens.
2. Coarse (budget controller, part 1): keep the best segments, in order, until they hold
   `coarse_factor * B` tokens. LLMLingua ranks by mean self-information (perplexity) of the
   segment; LongLLMLingua by mean log p(question | segment).
3. Budget allocation (part 2): split B over kept segments in proportion to their length;
   LongLLMLingua's dynamic ratio gives better-ranked segments up to `1 + dynamic` times their
   share and worse ones down to `1 - dynamic` times.
4. Fine, iterative (LLMLingua's ITPC): segment by segment, score each token conditioned on the
   *compressed* text so far (the KV cache holds only kept tokens), keep the segment's best b_j:
   LLMLingua keeps high self-information -log p(x_i | kept prefix, x_<i); LongLLMLingua keeps
   high contrast log p(x_i | question, ...) - log p(x_i | ...), tokens the question makes likely.
Without a question, LongLLMLingua falls back to LLMLingua.
"""

from __future__ import annotations

import numpy as np

from workbench.compression.base import Compressor, fit_mask
from workbench.compression.lm import crop, extend, new_cache, suffix_logprob, token_logprobs
from workbench.compression.segment import token_units

PREFIX = "<|im_start|>user\n"


def allocate(lengths: np.ndarray, weights: np.ndarray, budget: int) -> np.ndarray:
    """Integer budgets b_j <= lengths_j with sum == min(budget, sum(lengths)), proportional to
    `weights` (water-filling: capped segments give their excess to the others)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    budget = int(min(budget, lengths.sum()))
    out = np.zeros(len(lengths), dtype=np.int64)
    free = np.ones(len(lengths), dtype=bool)
    left = budget
    while left > 0 and free.any():
        w = np.where(free, np.maximum(weights, 1e-9), 0.0)
        share = left * w / w.sum()
        capped = free & (out + share >= lengths)
        if capped.any():
            left -= int((lengths[capped] - out[capped]).sum())
            out[capped] = lengths[capped]
            free &= ~capped
            continue
        floor = np.floor(share).astype(np.int64)
        out += floor
        rest = left - int(floor.sum())
        order = np.argsort(-(share - floor))
        out[order[:rest]] += 1
        left = 0
    return out


class TokenPruning(Compressor):
    """LLMLingua-style (contrastive=False) or LongLLMLingua-style (contrastive=True) pruning."""

    family = "token"

    def __init__(self, contrastive: bool = False, segment_tokens: int = 128,
                 coarse_factor: float = 2.0, dynamic: float = 0.5):
        self.contrastive = contrastive
        self.question_aware = contrastive
        self.name = "longllmlingua" if contrastive else "llmlingua"
        self.segment_tokens, self.coarse_factor, self.dynamic = segment_tokens, coarse_factor, dynamic

    def _lm(self):
        from workbench.models import load_model

        return load_model()

    def prepare(self, tokenizer, tok, question):
        model, _ = self._lm()
        _, ranges = token_units(tok, "paragraph", self.segment_tokens)
        if self.contrastive and question:
            units = [tok.text[tok.starts[a]:tok.ends[b - 1]].strip() + "\n\n" for a, b in ranges]
            seg_scores = suffix_logprob(model, tokenizer, units, f"Question: {question.strip()}")
        else:
            lp = token_logprobs(model, tok.ids, tokenizer(PREFIX)["input_ids"])
            seg_scores = np.array([-lp[a:b].mean() for a, b in ranges])
        return {"ranges": ranges, "seg_scores": seg_scores}

    def select(self, tokenizer, tok, question, state, budget):
        model, _ = self._lm()
        ranges, seg_scores = state["ranges"], state["seg_scores"]
        lengths = np.array([b - a for a, b in ranges])
        # coarse: best segments until coarse_factor * budget tokens, then document order
        order = np.argsort(-seg_scores, kind="stable")
        keep, total = [], 0
        for j in order:
            if total >= self.coarse_factor * budget and total >= budget:
                break
            keep.append(int(j))
            total += lengths[j]
        keep.sort()
        rank = {j: r for r, j in enumerate(x for x in order if x in set(keep))}
        weights = lengths[keep].astype(np.float64)
        if self.contrastive and question and len(keep) > 1:
            r = np.array([rank[j] for j in keep], dtype=np.float64)
            weights *= 1.0 + self.dynamic * (1.0 - 2.0 * r / (len(keep) - 1))
        budgets = allocate(lengths[keep], weights, budget)
        # fine: iterative token-level compression over the kept segments
        contrast = self.contrastive and bool(question)
        plain = new_cache(model)
        _, plain_last = extend(model, tokenizer(PREFIX)["input_ids"], plain)
        if contrast:
            cond = new_cache(model)
            q_ids = tokenizer(f"{PREFIX}Question: {question.strip()}\n\n")["input_ids"]
            _, cond_last = extend(model, q_ids, cond)
        scores = np.full(len(tok), -1e9)
        mask = np.zeros(len(tok), dtype=bool)
        for j, b_j in zip(keep, budgets, strict=True):
            a, b = ranges[j]
            seg = tok.ids[a:b]
            n_plain = plain.get_seq_length()
            lp, _ = extend(model, seg, plain, plain_last)
            crop(plain, n_plain)
            s = -lp
            if contrast:
                n_cond = cond.get_seq_length()
                lp_q, _ = extend(model, seg, cond, cond_last)
                crop(cond, n_cond)
                s = lp_q - lp
            best = np.argsort(-s, kind="stable")[:b_j]
            kept = np.zeros(b - a, dtype=bool)
            kept[best] = True
            mask[a:b] = kept
            scores[a:b] = s
            if b_j:  # condition what follows on the compressed text only
                _, plain_last = extend(model, seg[kept], plain, plain_last)
                if contrast:
                    _, cond_last = extend(model, seg[kept], cond, cond_last)
        # fit_mask corrects re-tokenization drift: kept tokens rank above dropped ones
        ranked = np.where(mask, 1e6, 0.0) + np.clip(scores, -1e5, 1e5)
        text, spans, mask = fit_mask(tokenizer, tok, ranked, budget, joiner="", mask=mask)
        return text, spans, {"segments": len(ranges), "coarse_kept": len(keep)}
