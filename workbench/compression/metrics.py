"""Automatic scores: answer match, retention, ROUGE-L (written here; no extra dependency)."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def contains_answer(text: str, answer: str) -> bool:
    """True when `answer` appears in `text` as whole words (case and punctuation ignored)."""
    a = normalize(answer)
    return bool(a) and f" {a} " in f" {normalize(text)} "


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict:
    """ROUGE-L precision, recall and F1 over lower-cased alphanumeric words (Lin, 2004; beta=1)."""
    c, r = _TOKEN.findall(candidate.lower()), _TOKEN.findall(reference.lower())
    if not c or not r:
        return {"p": 0.0, "r": 0.0, "f": 0.0}
    lcs = lcs_length(c, r)
    p, rec = lcs / len(c), lcs / len(r)
    return {"p": p, "r": rec, "f": 0.0 if lcs == 0 else 2 * p * rec / (p + rec)}
