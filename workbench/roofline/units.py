"""Human-readable numbers: 13.5 GFLOP, 2.1 GB, 3.2 ms, and a plain-text table printer."""

from __future__ import annotations

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1.0, ""))


def si(x: float, unit: str, digits: int = 3) -> str:
    """`x` with an SI prefix: si(1.35e10, "FLOP") -> '13.5 GFLOP'."""
    if x == 0:
        return f"0 {unit}"
    for scale, prefix in _PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g} {prefix}{unit}"
    return f"{x:.{digits}g} {unit}"


def seconds(t: float) -> str:
    """A duration in s, ms or µs with 3 significant digits."""
    if t >= 1:
        return f"{t:.3g} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3g} ms"
    return f"{t * 1e6:.3g} µs"


def format_table(rows: list[dict], floatfmt: str = ".4g") -> str:
    """Rows of dicts (same keys) as an aligned plain-text table."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v)

    cells = [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    right = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k in keys]

    def line(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w)
                         for v, w, r in zip(values, widths, right, strict=True)).rstrip()

    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])
