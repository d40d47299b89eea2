"""Extractive compression: rank sentences or paragraphs, keep the best until the budget is met,
in their original order.

Rankers (all question-aware; without a question each falls back to a question-free salience):
- `bm25`:   Okapi BM25 of the unit against the question (no question: against the context's
            20 most frequent content words).
- `minilm`: cosine similarity of all-MiniLM-L6-v2 embeddings of unit and question (no question:
            similarity to the mean embedding of all units, a centroid summary).
- `lm`:     LongLLMLingua's coarse ranker: mean log p(question | unit) under the small LM
            (no question: the unit's mean self-information, -log p(token | preceding context)).

The budget is filled in rank order; the unit that overflows it is cut after the tokens that fit
(so the achieved ratio is exact), and kept units are joined in document order.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

from workbench.compression.base import Compressor, Tokenized, fit_mask
from workbench.compression.segment import token_units
from workbench.errors import WorkbenchError

RANKERS = ("bm25", "minilm", "lm")
_WORD = re.compile(r"[a-z0-9_]+")
STOPWORDS = frozenset("""a an and are as at be but by can do does for from has have how i if in
into is it its no not of on or so such than that the their them then there these they this to was
were what when where which who why will with would you your""".split())


def words(text: str) -> list[str]:
    """Lower-case content words (stop words dropped)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def bm25_scores(units: list[str], query: str | list[str], k1: float = 1.5,
                b: float = 0.75) -> np.ndarray:
    """Okapi BM25 of each unit (a document of the collection) for the query's words."""
    docs = [words(u) for u in units]
    q = words(query) if isinstance(query, str) else list(query)
    n = len(docs)
    avg = max(sum(len(d) for d in docs) / max(n, 1), 1e-9)
    df = Counter(w for d in docs for w in set(d))
    scores = np.zeros(n, dtype=np.float64)
    for i, d in enumerate(docs):
        tf = Counter(d)
        for w in q:
            if tf[w]:
                idf = math.log((n - df[w] + 0.5) / (df[w] + 0.5) + 1.0)
                scores[i] += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(d) / avg))
    return scores


def rank_units(ranker: str, units: list[str], question: str | None, tok: Tokenized | None = None,
               ranges: list[tuple[int, int]] | None = None) -> np.ndarray:
    """One relevance score per unit (higher is kept first)."""
    if ranker == "bm25":
        if question:
            return bm25_scores(units, question)
        top = [w for w, _ in Counter(w for u in units for w in words(u)).most_common(20)]
        return bm25_scores(units, top)
    if ranker == "minilm":
        from workbench.models import load_embedder

        emb = load_embedder().encode(units, normalize_embeddings=True, batch_size=32)  # (u, 384)
        if question:
            q = load_embedder().encode([question], normalize_embeddings=True)[0]  # (384,)
        else:
            q = emb.mean(axis=0)
            q = q / max(np.linalg.norm(q), 1e-9)
        return emb @ q
    if ranker == "lm":
        from workbench.compression.lm import suffix_logprob, token_logprobs
        from workbench.models import load_model

        model, tokenizer = load_model()
        if question:
            return suffix_logprob(model, tokenizer, [u.strip() + "\n\n" for u in units],
                                  f"Question: {question.strip()}")
        lp = token_logprobs(model, tok.ids)
        return np.array([-lp[a:b].mean() for a, b in ranges])
    raise WorkbenchError(f"Unknown ranker {ranker!r}; use one of {RANKERS}.")


class Extractive(Compressor):
    """Keep the best-ranked sentences or paragraphs, in document order."""

    family, question_aware = "extractive", True

    def __init__(self, granularity: str = "sentence", ranker: str = "minilm",
                 max_unit_tokens: int = 96):
        if ranker not in RANKERS:
            raise WorkbenchError(f"Unknown ranker {ranker!r}; use one of {RANKERS}.")
        self.granularity, self.ranker = granularity, ranker
        self.max_unit_tokens = max_unit_tokens if granularity == "sentence" else 4 * max_unit_tokens
        self.name = f"{granularity}-{ranker}"
        self.joiner = " " if granularity == "sentence" else "\n\n"

    def prepare(self, tokenizer, tok, question):
        owner, ranges = token_units(tok, self.granularity, self.max_unit_tokens)
        units = [tok.text[tok.starts[a]:tok.ends[b - 1]] for a, b in ranges]
        scores = rank_units(self.ranker, units, question, tok, ranges)
        order = np.argsort(-scores, kind="stable")
        unit_rank = np.empty(len(ranges), dtype=np.int64)
        unit_rank[order] = np.arange(len(ranges))
        position = np.arange(len(tok)) - np.array([ranges[u][0] for u in owner])
        # lexicographic (unit rank, position in unit): best units whole, the next one's prefix
        token_scores = -(unit_rank[owner] * (len(tok) + 1) + position).astype(np.float64)
        return {"token_scores": token_scores, "unit_scores": scores, "ranges": ranges}

    def select(self, tokenizer, tok, question, state, budget):
        text, spans, mask = fit_mask(tokenizer, tok, state["token_scores"], budget, self.joiner)
        kept_units = sum(bool(mask[a:b].any()) for a, b in state["ranges"])
        return text, spans, {"units": len(state["ranges"]), "kept_units": kept_units}
