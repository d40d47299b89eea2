"""Near-duplicate tool calls: the loops a small planner falls into, caught before they run.

    near_duplicate(("f", {"x": "Paris"}), ("f", {"x": "paris "}))   # -> "same call"

Small models repeat a call with a cosmetic change until the token limit ("g," / "g, " / "g,  ",
"2x+5" / "2x+5.00", a default argument spelled out). A new call is a near-duplicate of an earlier
one when both call the same tool and, after normalizing values (strings without spaces and
punctuation, case kept; 2 == 2.0; argument order ignored):

- all values are equal ("same call");
- one call has extra arguments that all equal their declared defaults, the rest equal;
- all arguments are equal but one string or list, which only extends the other's ("Boston" ->
  "Boston MA", ["a"] -> ["a", "b"]). Numbers never count: 0.02 and 0.025, 5 and 50 are real
  requests; nor does case ("AA" and "Aa" are two genotypes in BFCL).

Checked against BFCL's reference answers (simple, multiple, parallel, parallel_multiple; 1,000
requests): no reference plan has a near-duplicate pair except one with two identical calls
(`random.normalvariate` drawn twice, parallel_158), which the plan language cannot express anyway.

The grammar masks the tokens that would complete such a call; the parser turns one that gets
through anyway (unconstrained text) into an alias of the earlier task, so it never runs twice.
"""

from __future__ import annotations

Call = tuple[str, dict]        # (tool name, {argument: value}); positional args as "#0", "#1"


def normalize(value):
    """A comparable form of a literal value (see the module doc)."""
    if isinstance(value, str):
        return "".join(c for c in value if c.isalnum() or c in "${}")
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(normalize(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), normalize(v)) for k, v in value.items()))
    return ("other", repr(value))        # a $N reference (parser.Ref) reads as "$N"


def call_of(tool: str, args: list | tuple = (), kwargs: dict | None = None) -> Call:
    """(tool, {name: value}) with positional arguments named "#0", "#1", ..."""
    return tool, {**{f"#{i}": v for i, v in enumerate(args)}, **(kwargs or {})}


def _extends(a, b) -> bool:
    """Strings (or lists) a and b differ only by one continuing the other (normalized)."""
    if isinstance(a, str) and isinstance(b, str) or isinstance(a, list) and isinstance(b, list):
        na, nb = normalize(a), normalize(b)
        return na[:len(nb)] == nb or nb[:len(na)] == na
    return False


def near_duplicate(new: Call, old: Call, defaults: dict | None = None) -> str | None:
    """Why `new` is a near-duplicate of `old`, or None. defaults: {argument: default value} of
    the tool's optional parameters."""
    if new[0] != old[0]:
        return None
    a, b = new[1], old[1]
    na = {k: normalize(v) for k, v in a.items()}
    nb = {k: normalize(v) for k, v in b.items()}
    if na == nb:
        return "same call"
    shared = set(na) & set(nb)
    extra = set(na) ^ set(nb)
    dflt = {k: normalize(v) for k, v in (defaults or {}).items()}
    if all(na[k] == nb[k] for k in shared) and (set(na) <= set(nb) or set(nb) <= set(na)) and \
            all(k in dflt and (na | nb)[k] == dflt[k] for k in extra):
        return "same call with default arguments spelled out"
    if set(na) == set(nb):
        differ = [k for k in na if na[k] != nb[k]]
        if len(differ) == 1 and _extends(a[differ[0]], b[differ[0]]):
            return f"same call with {differ[0]} only extended"
    return None


def first_near_duplicate(new: Call, earlier: list[tuple[int, Call]],
                         defaults: dict | None = None) -> tuple[int, str] | None:
    """(id, reason) of the first earlier call that `new` nearly repeats, or None."""
    for idx, old in earlier:
        why = near_duplicate(new, old, defaults)
        if why:
            return idx, why
    return None
