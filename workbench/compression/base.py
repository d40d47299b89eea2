"""The one interface every prompt compressor shares: a target, a result, a budget fitter.

    result = compress(context, question, target=4.0, method="sentence-minilm")
    result = compress(context, question, target=Target(tokens=300), method="llmlingua")
    result.text, result.kept_spans, result.requested_ratio, result.achieved_ratio, result.seconds

Ratios and budgets count tokens of the *reader's* tokenizer (the embedded SmolLM2 by default):
ratio = original tokens / compressed tokens, both counted by tokenizing the text as the reader
sees it. Every method except the abstractive one works on a keep-mask over the context's tokens;
`fit_mask` turns per-token scores into a text whose re-tokenized length is the budget (so the
achieved ratio matches the requested one within `TOLERANCE`, not roughly as LLMLingua does).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from workbench.errors import WorkbenchError

TOLERANCE = 0.05       # |achieved / requested - 1| the interface promises
MIN_BUDGET = 16        # fewer kept tokens cannot hit a ratio within 5% reliably (integer steps)
MAX_RATIO = 100.0


@dataclass(frozen=True)
class Target:
    """A compression target: `ratio` (original/compressed tokens, >= 1) or `tokens` (a budget)."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise WorkbenchError("Give a Target exactly one of ratio=... (e.g. 4.0 for 4x) or "
                                 "tokens=... (a token budget).")
        if self.ratio is not None and not (1.0 <= float(self.ratio) <= MAX_RATIO):
            raise WorkbenchError(f"Compression ratio {self.ratio} is out of range: use 1 (keep "
                                 f"everything) to {MAX_RATIO:g} (keep 1 token in {MAX_RATIO:g}).")
        if self.tokens is not None and int(self.tokens) < 1:
            raise WorkbenchError(f"A token budget must be at least 1, got {self.tokens}.")

    @classmethod
    def of(cls, target) -> Target:
        """A Target from a Target, a number (a ratio) or a string like '4x' or '300 tokens'."""
        if isinstance(target, Target):
            return target
        if isinstance(target, str):
            text = target.strip().lower()
            try:
                if text.endswith("tokens"):
                    return cls(tokens=int(text[:-6].strip()))
                return cls(ratio=float(text.rstrip("x").strip()))
            except ValueError:
                raise WorkbenchError(f"Cannot read the target {target!r}: use a ratio like 4, "
                                     "'4x', or a budget like '300 tokens'.") from None
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            return cls(ratio=float(target))
        raise WorkbenchError(f"target must be a ratio (number), a Target or a string like '4x', "
                             f"got {type(target).__name__}.")

    def budget(self, n_tokens: int) -> int:
        """Tokens to keep out of `n_tokens`."""
        if self.tokens is not None:
            return min(int(self.tokens), n_tokens)
        return max(1, round(n_tokens / float(self.ratio)))


@dataclass
class CompressionResult:
    """What a compressor returns. Token counts use the reader's tokenizer.

    kept_spans: (start, end) character spans of the original context that were kept, in order
    (empty for abstractive summaries, which keep no original text verbatim).
    seconds: the compressor's own wall time (model scoring included, the reader excluded).
    """

    method: str
    text: str
    original_tokens: int
    compressed_tokens: int
    budget_tokens: int
    requested_ratio: float
    kept_spans: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        return self.original_tokens / max(self.compressed_tokens, 1)

    @property
    def ratio_error(self) -> float:
        """achieved / requested - 1 (0.03 means 3% more compression than asked)."""
        return self.achieved_ratio / self.requested_ratio - 1.0

    def summary(self) -> dict:
        """A JSON-ready dict of the numbers (no text)."""
        return {"method": self.method, "original_tokens": self.original_tokens,
                "compressed_tokens": self.compressed_tokens, "budget_tokens": self.budget_tokens,
                "requested_ratio": round(self.requested_ratio, 3),
                "achieved_ratio": round(self.achieved_ratio, 3), "seconds": round(self.seconds, 3)}


@dataclass
class Tokenized:
    """A context split into reader tokens with character offsets."""

    text: str
    ids: np.ndarray       # (n,) int64 token ids
    starts: np.ndarray    # (n,) first character of each token
    ends: np.ndarray      # (n,) one past its last character

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer, text: str) -> Tokenized:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return Tokenized(text, np.asarray(enc["input_ids"], dtype=np.int64), offsets[:, 0],
                     offsets[:, 1])


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [i, j) of True in a boolean mask."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def render(tok: Tokenized, mask: np.ndarray, joiner: str,
           strip: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Text of the kept tokens and their character spans. Runs are joined by `joiner` and
    stripped first (unless `strip=False`); with an empty joiner (token pruning, truncation)
    tokens keep their own spaces and nothing is stripped, so whitespace tokens count as the
    reader sees them."""
    spans, parts = [], []
    for a, b in runs(mask):
        start, end = int(tok.starts[a]), int(tok.ends[b - 1])
        piece = tok.text[start:end]
        if joiner and strip:
            stripped = piece.strip()
            if not stripped:
                continue
            lead = len(piece) - len(piece.lstrip())
            start, end = start + lead, start + lead + len(stripped)
            piece = stripped
        spans.append((start, end))
        parts.append(piece)
    return joiner.join(parts), spans


def _probe_sides(sides: dict, rank: np.ndarray, limit: int, attempt, budget: int) -> None:
    """Single changes from the closest attempts on both sides of the budget: drop the worst kept
    tokens of the one above, add the best dropped tokens to the one below, until a rendering
    re-tokenizes to the budget exactly (a token whose text merges or splits moves the count by
    more than one, so the one-sided probes can step over the budget)."""
    for side in (1, -1):
        if side not in sides:
            continue
        base = sides[side][1]
        pool = np.flatnonzero(base if side > 0 else ~base)
        pool = pool[np.argsort(rank[pool])]
        for index in (pool[::-1] if side > 0 else pool)[:limit]:
            trial = base.copy()
            trial[index] = not trial[index]
            if attempt(trial) == budget:
                return


def fit_mask(tokenizer, tok: Tokenized, scores: np.ndarray, budget: int, joiner: str = " ",
             mask: np.ndarray | None = None, rounds: int = 16, probes: int = 8):
    """Keep the `budget` best-scored tokens (or start from `mask`), then add or drop tokens by
    score until the rendered text re-tokenizes to the budget (within 2%, at least exactly one
    token's worth when the budget is small). Returns (text, spans, mask) of the attempt whose
    ratio is closest to the requested one.

    Re-tokenizing joined pieces can merge or split tokens, and stripped whitespace disappears;
    each round corrects by the difference, by half of it once a correction overshoots. When a
    one-token step still overshoots (one whitespace token can re-tokenize as several), the next
    `probes` candidates are tried one at a time and the closest rendering is kept.
    """
    n = len(tok)
    order = np.argsort(-scores, kind="stable")  # best first
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    if mask is None:
        mask = rank < budget
    mask = mask.copy()
    strip = True  # stripped runs, unless the context is so much whitespace that they fall short
    best: list = []  # [ratio error, text, spans, mask] of the closest attempt
    sides: dict = {}  # +1 / -1: (count, mask) of the closest attempt above / below the budget

    def attempt(candidate: np.ndarray) -> int:
        text, spans = render(tok, candidate, joiner, strip)
        count = count_tokens(tokenizer, text)
        error = abs(budget / max(count, 1) - 1)  # ~ |achieved ratio / requested - 1|
        if not best or error < best[0]:
            best[:] = [error, text, spans, candidate.copy()]
        side = (count > budget) - (count < budget)
        if side and (side not in sides or abs(count - budget) < abs(sides[side][0] - budget)):
            sides[side] = (count, candidate.copy())
        return count

    last_sign, halve = 0, False
    for _ in range(rounds):
        delta = attempt(mask) - budget
        if abs(delta) <= 0.02 * budget:
            break
        sign = 1 if delta > 0 else -1
        halve = halve or (last_sign != 0 and sign != last_sign)
        step = max(1, abs(delta) // 2) if halve else abs(delta)
        last_sign = sign
        if delta > 0:   # drop the worst kept tokens
            kept = np.flatnonzero(mask)
            pool = kept[np.argsort(rank[kept])[::-1]]
        else:           # add the best dropped tokens
            dropped = np.flatnonzero(~mask)
            if not len(dropped):
                if not strip:
                    break
                strip, last_sign, halve = False, 0, False
                best.clear()
                continue
            pool = dropped[np.argsort(rank[dropped])]
        if halve and step == 1:  # oscillating one token apart: probe single changes, then stop
            for index in pool[:probes]:
                trial = mask.copy()
                trial[index] = not trial[index]
                attempt(trial)
            if best[0] * budget > 0.5:   # none hit the budget (small budgets: one token is
                _probe_sides(sides, rank, probes * 8, attempt, budget)   # several %)
            break
        mask[pool[:step]] = not mask[pool[0]]
    if not best:  # the last round switched to unstripped runs
        attempt(mask)
    _, text, spans, mask = best
    return text, spans, mask


class Compressor(ABC):
    """A compression method. `prepare` does the work that does not depend on the target (model
    scoring), so sweeps over ratios can reuse it; `select` meets one budget."""

    name = "abstract"
    family = "abstract"          # none | baseline | extractive | abstractive | token
    question_aware = False

    @abstractmethod
    def prepare(self, tokenizer, tok: Tokenized, question: str | None):
        """Target-independent state (scores); returned to `select`."""

    @abstractmethod
    def select(self, tokenizer, tok: Tokenized, question: str | None, state, budget: int):
        """Return (text, kept_spans, info) holding about `budget` reader tokens."""

    def compress(self, tokenizer, context: str, question: str | None, target, state=None,
                 tok: Tokenized | None = None) -> CompressionResult:
        """Compress `context`. Pass `state` (from `prepare`) and `tok` to reuse earlier work;
        the prepare time is then not counted (add it yourself, see benchmark)."""
        t0 = time.perf_counter()
        target = Target.of(target)
        if not context or not context.strip():
            raise WorkbenchError("The context is empty: there is nothing to compress.")
        tok = tok if tok is not None else tokenize(tokenizer, context)
        n = len(tok)
        budget = target.budget(n)
        requested = n / budget if target.tokens is not None else float(target.ratio)
        if budget < n and budget < MIN_BUDGET:
            raise WorkbenchError(
                f"A {requested:g}x target leaves {budget} of {n} tokens: too few to hit the ratio "
                f"within {TOLERANCE:.0%}. Use a ratio of at most {n / MIN_BUDGET:.1f}x for this "
                f"context, or a longer context.")
        if question is not None and not question.strip():
            question = None
        if state is None:
            state = self.prepare(tokenizer, tok, question)
        if budget >= n:
            text, spans, info = context, [(0, len(context))], {}
        else:
            text, spans, info = self.select(tokenizer, tok, question, state, budget)
        return CompressionResult(method=self.name, text=text, original_tokens=n,
                                 compressed_tokens=count_tokens(tokenizer, text),
                                 budget_tokens=budget, requested_ratio=requested,
                                 kept_spans=spans, seconds=time.perf_counter() - t0, info=info)


class NoCompression(Compressor):
    """The full context (ratio 1 whatever the target): the quality ceiling."""

    name, family = "none", "none"

    def prepare(self, tokenizer, tok, question):
        return None

    def select(self, tokenizer, tok, question, state, budget):
        return tok.text, [(0, len(tok.text))], {}

    def compress(self, tokenizer, context, question, target=1.0, state=None, tok=None):
        return super().compress(tokenizer, context, question, Target(ratio=1.0), state, tok)


class Truncate(Compressor):
    """Keep the first `budget` tokens: the naive baseline."""

    name, family = "truncate", "baseline"

    def prepare(self, tokenizer, tok, question):
        return None

    def select(self, tokenizer, tok, question, state, budget):
        scores = -np.arange(len(tok), dtype=np.float64)
        text, spans, _ = fit_mask(tokenizer, tok, scores, budget, joiner="")
        return text, spans, {}
