"""Small statistics for paired evaluations: a Wilson interval for an accuracy, and paired
outcome counts with an exact two-sided McNemar (sign) test, for comparing two methods on the
same items (compression reader study, squeezed attention's far-back items)."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval (lo, hi) for k successes out of n; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def sign_test_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the two kinds of discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(base: list[bool], other: list[bool]) -> dict:
    """Paired outcome counts of `other` against `base` (same items, same order)."""
    if len(base) != len(other):
        raise ValueError("paired() needs one outcome per item in both lists")
    rw = sum(1 for a, b in zip(base, other, strict=True) if a and not b)
    wr = sum(1 for a, b in zip(base, other, strict=True) if not a and b)
    rr = sum(1 for a, b in zip(base, other, strict=True) if a and b)
    return {"both_right": rr, "right_to_wrong": rw, "wrong_to_right": wr,
            "both_wrong": len(base) - rr - rw - wr, "net": wr - rw,
            "mcnemar_p": round(sign_test_p(rw, wr), 4)}
