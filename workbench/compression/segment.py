"""Split a context into sentences or paragraphs, as character spans, and map tokens to them.

Paragraphs end at blank lines. Sentences end at . ! ?
followed by whitespace and a capital, digit, quote or bracket, and at paragraph ends; a unit
longer than `max_tokens` is cut at line breaks, then at word boundaries, so no unit swamps a
budget. Python's documentation wraps lines inside sentences, so a single newline never ends one.
"""

from __future__ import annotations

import re

import numpy as np

from workbench.compression.base import Tokenized
from workbench.errors import WorkbenchError

GRANULARITIES = ("sentence", "paragraph")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[*-])")


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _PARAGRAPH.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _sentence_spans(text: str, a: int, b: int) -> list[tuple[int, int]]:
    spans, start = [], a
    for m in _SENTENCE_END.finditer(text, a, b):
        spans.append((start, m.start()))
        start = m.start()
    spans.append((start, b))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def split_units(text: str, granularity: str = "sentence") -> list[tuple[int, int]]:
    """Character spans of the units, in order, covering every non-blank part of `text`."""
    if granularity not in GRANULARITIES:
        raise WorkbenchError(f"Unknown granularity {granularity!r}; use one of {GRANULARITIES}.")
    paragraphs = _paragraph_spans(text)
    if granularity == "paragraph":
        return paragraphs
    return [s for a, b in paragraphs for s in _sentence_spans(text, a, b)]


def token_units(tok: Tokenized, granularity: str, max_tokens: int = 96
                ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Assign each token to a unit. Returns (unit index per token (n,), token ranges [i, j) per
    unit). Units longer than `max_tokens` are cut into pieces of at most that many tokens, at a
    line break where one falls in the second half of the piece."""
    spans = split_units(tok.text, granularity)
    bounds = np.array([a for a, _ in spans] + [len(tok.text) + 1], dtype=np.int64)
    unit_of = np.clip(np.searchsorted(bounds, tok.starts, side="right") - 1, 0, len(spans) - 1)
    ranges: list[tuple[int, int]] = []
    i, n = 0, len(tok)
    while i < n:
        j = i
        while j < n and unit_of[j] == unit_of[i]:
            j += 1
        while j - i > max_tokens:  # cut long units
            cut = i + max_tokens
            lines = [k for k in range(i + max_tokens // 2, cut)
                     if "\n" in tok.text[tok.starts[k]:tok.ends[k]]]
            cut = lines[-1] + 1 if lines else cut
            ranges.append((i, cut))
            i = cut
        ranges.append((i, j))
        i = j
    owner = np.empty(n, dtype=np.int64)
    for u, (a, b) in enumerate(ranges):
        owner[a:b] = u
    return owner, ranges
