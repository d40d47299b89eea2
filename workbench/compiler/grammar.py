"""Grammar-constrained decoding of LLMCompiler plans for a local model: a logits processor.

    proc = PlanGrammar(toolbox).processor(tokenizer)
    chat.stream(messages, logits_processor=[proc], stop=[END_MARKER])

At every step the processor masks the scores of all tokens that cannot continue a valid plan:

    1. tool_name(arg=value, other=value)      numbers are forced: 1, 2, 3, ...
    2. other_tool(arg=$1, text="about ${1}")  a known tool, its own argument names, each once,
    3. join()                                 every required one; values typed by the parameter
    <END_OF_PLAN>                             (int, float, bool, "string", [list], {dict}, enum)
                                              or $N / ${N} references to earlier tasks only

No line may repeat an earlier one, exactly or nearly (`dedup.near_duplicate`: the same call
with spaces or punctuation changed, arguments reordered, defaults spelled out, or one string
only extended): the ")" that would close such a line is masked, so the greedy loops "1. f(x) /
2. f(x) / ..." and "unit="g," / unit="g, " / ..." that small models fall into cannot happen,
and `max_tasks` bounds the plan. Strings are double-quoted, without backslashes or newlines, at most
`max_string` characters, and without "<" (so that the end marker cannot appear inside one).

How: a character-level pushdown machine (`step(state, ch)`, states are immutable tuples) walks
a trie of the vocabulary's decoded token strings; only branches whose characters the machine
accepts are visited. Inside a free string almost every token is allowed, so there a precomputed
mask of "plain" tokens (no quote, $, backslash or newline) is used and only tokens holding a
special character are walked. One step costs a few milliseconds in Python.
"""

from __future__ import annotations

import copy
import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from workbench.compiler.dedup import Call, call_of, first_near_duplicate, normalize
from workbench.compiler.parser import _CALL, END_MARKER, PlanSyntaxError, parse_arguments
from workbench.compiler.tools import Toolbox

STR_SPECIAL = set('"\\$\n\r\t<')     # "<": the end marker must never appear inside a string
DIGITS = frozenset("0123456789")            # str.isdigit() is also true for "²"
PRINTABLE = set(string.printable) - set("\n\r\t\x0b\x0c")
_TYPE = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict",
         object: "any"}


def _spec(kind, items=None, enum=None) -> tuple:
    """Type spec tuple: ("int",) ("float",) ("bool",) ("str", enum) ("list", item) ("dict",) ("any",)."""
    name = _TYPE.get(kind, "any")
    if enum:
        return ("str", tuple(str(e) for e in enum)) if all(isinstance(e, str) for e in enum) \
            else ("any",)
    if name == "str":
        return ("str", None)
    if name == "list":
        return ("list", _spec(items) if items not in (None, object) else ("any",))
    return (name,)


@dataclass
class _ToolSpec:
    name: str
    params: dict          # name -> spec
    required: frozenset
    defaults: dict        # optional parameter -> its default value


class PlanGrammar:
    """The plan language for one toolbox. States: (n_done, lines, current_line, frames)."""

    def __init__(self, toolbox: Toolbox, max_tasks: int = 10, min_tasks: int = 1,
                 max_string: int = 80, max_items: int = 12, max_depth: int = 3):
        self.tools = {t.name: _ToolSpec(t.name, {p.name: _spec(p.type, p.items, p.enum)
                                                 for p in t.params}, frozenset(t.required),
                                        {p.name: p.default for p in t.params if not p.required})
                      for t in toolbox}
        self.max_tasks, self.min_tasks = max_tasks, min_tasks
        self.max_string, self.max_items, self.max_depth = max_string, max_items, max_depth
        self.allow_repeat = False     # set only as the way out of a dead end (see PlanProcessor)

    def initial(self, done: list[str] = ()) -> tuple:
        """Start of a plan; `done`: call texts already written (ReAct steps), numbered 1..k."""
        lines = frozenset(str(d).split(". ", 1)[-1] for d in done)
        return (len(done), lines, "", (("plan",),))

    # -- the machine ---------------------------------------------------------------------------

    def advance(self, st: tuple, text: str) -> tuple | None:
        """The state after `text`, or None if the grammar does not allow it."""
        for ch in text:
            st = self.advance1(st, ch)
            if st is None:
                return None
        return st

    def advance1(self, st: tuple, ch: str) -> tuple | None:
        """One character: step the machine, track the line's text, refuse dead ends."""
        st = self._step(st, ch)
        if st is None:
            return None
        n, lines, cur, frames = st
        top = frames[-1]
        if top[0] != "plan" and top[0] != "end":
            st = (n, lines, cur + ch, frames)
        if not self._alive(st):
            return None
        return st

    def finished(self, st: tuple) -> bool:
        return st[3][-1][0] == "end"

    def _alive(self, st) -> bool:
        """Can the line still be finished without repeating an earlier one? Checked where the
        choices are finite: after a value (',' or ')'), and for enum strings and booleans (some
        allowed value must lead on)."""
        top = st[3][-1]
        kind = top[0]
        if kind == "call" and top[3] == "after":
            return self._step(st, ",") is not None or self._step(st, ")") is not None
        if kind == "str" and top[1] is None and not top[3]:
            return not self.string_targets(st, dead_only=True)
        if kind == "list" or (kind == "lit" and len(st[3]) > 2 and st[3][-2][0] == "list"):
            return not self._list_dead(st)
        if kind == "str" and top[1] is not None and not top[3]:
            return any(self.advance(st, e[len(top[2]):] + '"') is not None
                       for e in top[1] if e.startswith(top[2]))
        if kind == "word":
            return any(self.advance(st, o[len(top[2]):]) is not None
                       for o in top[1] if o.startswith(top[2]))
        if kind == "start" and st[0] == 0:          # no $N possible: only the literals
            spec = top[1]
            if spec[0] == "str" and spec[1] is not None:
                return any(self.advance(st, f'"{e}"') is not None for e in spec[1])
            if spec[0] == "bool":
                return any(self.advance(st, w) is not None for w in ("True", "False"))
        return True

    def _step(self, st, ch):
        top = st[3][-1]
        return getattr(self, "_" + top[0])(st, top, ch)

    @staticmethod
    def _replace(st, *frames, pop: int = 1):
        n, lines, cur, fr = st
        return (n, lines, cur, fr[:len(fr) - pop] + frames)

    def _plan(self, st, top, ch):
        n, lines, _, frames = st
        prefix = f"{n + 1}. "
        return self._step((n, lines, "", frames + (("head", ""), ("lit", prefix, 0))), ch)

    def _lit(self, st, top, ch):
        _, text, i = top
        if ch != text[i]:
            return None
        if i + 1 == len(text):
            return self._replace(st)
        return self._replace(st, ("lit", text, i + 1))

    def _end(self, st, top, ch):
        return None

    def _head(self, st, top, ch):
        n, lines, cur, frames = st
        buf = top[1] + ch
        ok = False
        if n >= self.min_tasks and "join()".startswith(buf):
            if buf == "join()":
                return (n, lines, "", (("end",), ("lit", "\n" + END_MARKER, 0)))
            ok = True
        if n < self.max_tasks:
            for name in self.tools:
                full = name + "("
                if full == buf:
                    return self._replace(st, ("call", name, frozenset(), "first", ""))
                ok = ok or full.startswith(buf)
        return self._replace(st, ("head", buf)) if ok else None

    def _call(self, st, top, ch):
        _, name, used, phase, buf = top
        spec = self.tools[name]
        if phase == "after" or (phase == "first" and not buf and ch == ")"):
            if ch == "," and len(used) < len(spec.params):
                return self._replace(st, ("call", name, used, "name", ""), ("lit", " ", 0))
            if ch == ")" and spec.required <= used:
                n, lines, cur, frames = st
                line = (cur + ")").split(". ", 1)[-1]
                if not self.allow_repeat and (line in lines or self.repeats(line, lines)):
                    return None
                return (n + 1, lines | {line}, "", (("plan",), ("lit", "\n", 0)))
            return None
        buf += ch
        for p in spec.params:
            if p in used:
                continue
            full = p + "="
            if full.startswith(buf):
                if full == buf:
                    return self._replace(st, ("call", name, used | {p}, "after", ""),
                                         ("start", spec.params[p]))
                return self._replace(st, ("call", name, used, phase, buf))
        return None

    def repeats(self, line: str, lines: frozenset) -> bool:
        """Is the call `line` a near-duplicate of one of `lines` (see dedup)?"""
        new = _call_of_line(line)
        if new is None:
            return False
        earlier = [(0, c) for c in map(_call_of_line, lines) if c is not None and c[0] == new[0]]
        spec = self.tools.get(new[0])
        return first_near_duplicate(new, earlier, spec.defaults if spec else None) is not None

    def string_targets(self, st, dead_only: bool = False) -> list[str]:
        """For a free string that is the line's last possible argument, the normalized values
        of earlier lines whose other arguments are all equal: reaching one of them (or going
        past it) makes the line a near-duplicate with no way out. dead_only: return [""] if the
        string already reached one (the state is dead), else []."""
        frames = st[3]
        if self.allow_repeat or len(frames) < 2 or frames[-2][0] != "call":
            return []
        _, name, used, _, _ = frames[-2]
        spec = self.tools[name]
        if len(used) < len(spec.params):
            return []                 # another argument may still make the call different
        new = _call_of_line((st[2] + '")').split(". ", 1)[-1])
        if new is None or not new[1]:
            return []
        last = list(new[1])[-1]
        now = normalize(new[1][last])
        out = []
        for old in map(_call_of_line, st[1]):
            if old is None or old[0] != name or set(old[1]) != set(new[1]) or \
                    not isinstance(old[1][last], str):
                continue
            if any(normalize(v) != normalize(new[1][k]) for k, v in old[1].items() if k != last):
                continue
            target = normalize(old[1][last])
            if now.startswith(target):
                return [""]           # dead already
            if not dead_only and target.startswith(now):
                out.append(target[len(now):])
        return [] if dead_only else out

    def _list_dead(self, st) -> bool:
        """A flat list that is the line's last possible argument and already starts with an
        earlier line's list (all else equal): closing or extending it can only repeat that line."""
        frames = st[3]
        k = len(frames) - (1 if frames[-1][0] == "list" else 2)
        if self.allow_repeat or k < 1 or frames[k - 1][0] != "call":
            return False
        _, name, used, _, _ = frames[k - 1]
        if len(used) < len(self.tools[name].params):
            return False
        text = st[2].split(". ", 1)[-1].rstrip(" ").rstrip(",")
        new = _call_of_line(text + ("])" if not text.endswith("]") else ")"))
        if new is None or not new[1]:
            return False
        last = list(new[1])[-1]
        if not isinstance(new[1][last], list):
            return False
        now = normalize(new[1][last])
        for old in map(_call_of_line, st[1]):
            if old is None or old[0] != name or set(old[1]) != set(new[1]) or \
                    not isinstance(old[1][last], list):
                continue
            if all(normalize(v) == normalize(new[1][k]) for k, v in old[1].items() if k != last):
                target = normalize(old[1][last])
                if now[:len(target)] == target:
                    return True
        return False

    # -- values --------------------------------------------------------------------------------

    def _start(self, st, top, ch):
        spec, kind = top[1], top[1][0]
        n, depth = st[0], len(st[3])
        if ch == "$":
            return self._replace(st, ("ref", "")) if n >= 1 else None
        if kind in ("int", "float", "any") and ((ch in DIGITS) or ch == "-"):
            if kind == "any":
                kind = "float"
            return self._replace(st, ("num", kind, ch))
        if kind in ("bool", "any") and ch in "TF":
            return self._replace(st, ("word", ("True", "False"), ch))
        if kind == "any" and ch == "N":
            return self._replace(st, ("word", ("None",), ch))
        if kind in ("str", "any") and ch == '"':
            return self._replace(st, ("str", spec[1] if kind == "str" else None, "", ""))
        if ch == "[" and (kind == "list" or (kind == "any" and depth < self.max_depth + 4)):
            item = spec[1] if kind == "list" else ("any",)
            return self._replace(st, ("list", item, 0, "open"))
        if ch == "{" and (kind == "dict" or (kind == "any" and depth < self.max_depth + 4)):
            return self._replace(st, ("dict", 0, "open"))
        return None

    def _num(self, st, top, ch):
        _, kind, text = top
        if (ch in DIGITS):
            if text in ("0", "-0") or len(text) >= 15:
                return None
            return self._replace(st, ("num", kind, text + ch))
        if ch == "." and kind == "float" and "." not in text and (text[-1] in DIGITS) \
                and len(text) < 14:
            return self._replace(st, ("num", kind, text + ch))
        if (text[-1] in DIGITS):
            return self._step(self._replace(st), ch)   # number complete; the parent reads ch
        return None

    def _word(self, st, top, ch):
        _, options, text = top
        text += ch
        if text in options:
            return self._replace(st)
        if any(o.startswith(text) for o in options):
            return self._replace(st, ("word", options, text))
        return None

    def _ref(self, st, top, ch):
        n, digits = st[0], top[1]
        if digits.startswith("{"):                   # ${N}
            if ch == "}" and len(digits) > 1:
                return self._replace(st)
            if (ch in DIGITS) and not (digits == "{" and ch == "0") and int(digits[1:] + ch) <= n:
                return self._replace(st, ("ref", digits + ch))
            return None
        if (ch in DIGITS) and not (digits == "" and ch == "0") and int(digits + ch) <= n:
            return self._replace(st, ("ref", digits + ch))
        if not digits:
            return self._replace(st, ("ref", "{")) if ch == "{" else None
        return self._step(self._replace(st), ch)     # $N complete; the parent reads ch

    def _str(self, st, top, ch):
        _, enum, text, dollar = top
        n = st[0]
        if dollar:                                   # inside ${N}
            if dollar == "$":
                return self._replace(st, ("str", enum, text + ch, "${")) if ch == "{" else None
            digits = dollar[2:]
            if ch == "}" and digits:
                return self._replace(st, ("str", enum, text + ch, ""))
            if (ch in DIGITS) and not (not digits and ch == "0") and int(digits + ch) <= n:
                return self._replace(st, ("str", enum, text + ch, dollar + ch))
            return None
        if ch == '"':
            if enum is not None and text not in enum:
                return None
            return self._replace(st)
        if enum is not None:
            t = text + ch
            return self._replace(st, ("str", enum, t, "")) if any(e.startswith(t) for e in enum) \
                else None
        if len(text) >= self.max_string or ch not in PRINTABLE or ch in STR_SPECIAL and ch != "$":
            return None
        if ch == "$":
            return self._replace(st, ("str", enum, text + ch, "$")) if n >= 1 else None
        if ch == " " and not text:
            return None                              # no leading space
        return self._replace(st, ("str", enum, text + ch, ""))

    def _list(self, st, top, ch):
        _, item, count, phase = top
        if phase == "open" and ch == "]":
            return self._replace(st)
        if phase in ("open", "item"):
            nxt = self._replace(st, ("list", item, count + 1, "after"), ("start", item))
            return self._step(nxt, ch)
        if phase == "after":
            if ch == "]":
                return self._replace(st)
            if ch == "," and count < self.max_items:
                return self._replace(st, ("list", item, count, "item"), ("lit", " ", 0))
        return None

    def _dict(self, st, top, ch):
        _, count, phase = top
        if phase in ("open", "after") and ch == "}":
            return self._replace(st)
        if phase in ("open", "key") and ch == '"':
            return self._replace(st, ("dict", count + 1, "colon"), ("str", None, "", ""))
        if phase == "colon" and ch == ":":
            return self._replace(st, ("dict", count, "after"), ("start", ("any",)),
                                 ("lit", " ", 0))
        if phase == "after" and ch == "," and count < self.max_items:
            return self._replace(st, ("dict", count, "key"), ("lit", " ", 0))
        return None

    # -- the logits processor ------------------------------------------------------------------

    def processor(self, tokenizer, done: list[str] = (), budget: int | None = None
                  ) -> PlanProcessor:
        """A fresh logits processor (one per generation) for LocalChat's `logits_processor`.

        budget: the generation's max_tokens; near it, no new task is started and join() is
        forced, so a constrained plan always ends properly."""
        proc = PlanProcessor(self, vocabulary(tokenizer), budget).bind(tokenizer)
        proc.state = self.initial(done)
        return proc


@lru_cache(maxsize=4096)
def _call_of_line(line: str) -> Call | None:
    """`tool(a=1, b="x")` -> ("tool", {"a": 1, "b": "x"}); None if it does not parse."""
    m = _CALL.match(line)
    if not m:
        return None
    try:
        args, kwargs = parse_arguments(m.group(2))
    except PlanSyntaxError:
        return None
    return call_of(m.group(1), args, kwargs)


class _Trie:
    __slots__ = ("children", "ids", "special")

    def __init__(self):
        self.children: dict[str, _Trie] = {}
        self.ids: list[int] = []
        self.special = False          # some token below holds a string-special character


@dataclass
class Vocabulary:
    """Decoded token strings of a tokenizer, as a trie, with masks of plain-string tokens."""

    root: _Trie
    size: int
    eos: list[int]
    plain_upto: list[np.ndarray]      # [L]: bool mask of plain tokens of length <= L


_VOCABS: dict[int, Vocabulary] = {}


def vocabulary(tokenizer) -> Vocabulary:
    """Build (once per tokenizer) the trie of every token's decoded text."""
    key = id(tokenizer)
    if key in _VOCABS:
        return _VOCABS[key]
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    root, lengths = _Trie(), {}
    for i in range(size):
        if i in special:
            continue
        s = tokenizer.decode([i], clean_up_tokenization_spaces=False)
        if not s or "\ufffd" in s:
            continue                  # partial UTF-8 bytes: never needed for a plan
        node = root
        has_special = any(c in STR_SPECIAL for c in s)
        for c in s:
            node = node.children.setdefault(c, _Trie())
            node.special |= has_special
        node.ids.append(i)
        if not has_special and all(c in PRINTABLE for c in s):
            lengths[i] = len(s)
    longest = max(lengths.values())
    plain_upto = []
    for L in range(longest + 1):
        mask = np.zeros(size, dtype=bool)
        ids = [i for i, n in lengths.items() if n <= L]
        mask[ids] = True
        plain_upto.append(mask)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    _VOCABS[key] = vocab = Vocabulary(root, size, eos, plain_upto)
    return vocab


def _line_start(frames: tuple) -> bool:
    """Between tasks: no character of the next tool name has been written yet."""
    top = frames[-1]
    if top[0] == "plan" or (top[0] == "head" and top[1] == ""):
        return True
    return top[0] == "lit" and len(frames) > 1 and frames[-2][0] in ("plan", "head") \
        and (frames[-2][0] == "plan" or frames[-2][1] == "")


class PlanProcessor:
    """LocalChat logits processor: keeps the grammar state in step with the generated tokens.

    `stats` counts masked steps, dead ends (every continuation repeats an earlier line: the
    repeat is then allowed and the plan ends after it), forced joins and off-grammar tokens.
    """

    def __init__(self, grammar: PlanGrammar, vocab: Vocabulary, budget: int | None = None):
        self.grammar, self.vocab, self.budget = grammar, vocab, budget
        self._line_tokens, self._longest_line = 0, 0
        self.state = grammar.initial()
        self._prompt_len: int | None = None
        self._seen = 0
        self.text = ""
        self.stats = {"steps": 0, "dead_ends": 0, "off_grammar": 0, "forced_join": 0}

    def _sync(self, input_ids: torch.Tensor, tokenizer_decode) -> None:
        ids = input_ids[0].tolist()
        if self._prompt_len is None:
            self._prompt_len = len(ids)
        new = ids[self._prompt_len + self._seen:]
        for t in new:
            piece = tokenizer_decode(t)
            self.text += piece
            if self.state is not None:
                before = self.state[0]
                self.state = self.grammar.advance(self.state, piece)
                if self.state is None:
                    self.stats["off_grammar"] += 1
                    continue
                self._line_tokens += 1
                if self.state[0] != before:          # a task line was completed
                    self._longest_line = max(self._longest_line, self._line_tokens)
                    self._line_tokens = 0
        self._seen += len(new)

    def allowed(self, state) -> list[int]:
        """Token ids whose whole text the grammar accepts from `state`."""
        out: list[int] = []
        g = self.grammar
        work = [(self.vocab.root, state)]
        while work:
            node, st = work.pop()
            top = st[3][-1]
            fast = top[0] == "str" and top[1] is None and not top[3]
            for ch, child in node.children.items():
                if fast and ch not in STR_SPECIAL and not child.special:
                    continue          # plain continuation: covered by the plain mask
                nxt = g.advance1(st, ch)
                if nxt is None:
                    continue
                out.extend(child.ids)
                if child.children:
                    work.append((child, nxt))
        return out

    def mask(self, state) -> np.ndarray:
        """Bool mask over the vocabulary of the tokens allowed next.  # (vocab,)

        numpy, not torch: a torch op over 49K entries opens an OpenMP region, which stalls for
        milliseconds when other processes hold the cores; numpy runs it on this thread."""
        m = np.zeros(self.vocab.size, dtype=bool)
        if self.grammar.finished(state):
            m[self.vocab.eos] = True
            return m
        ids = self.allowed(state)
        if ids:
            m[ids] = True
        top = state[3][-1]
        if top[0] == "str" and top[1] is None and not top[3]:
            room = max(0, self.grammar.max_string - len(top[2]))   # ${N} may overshoot
            plain = self.vocab.plain_upto[min(room, len(self.vocab.plain_upto) - 1)]
            if top[2] == "":
                plain = plain & ~self._space_start()
            rest = self.grammar.string_targets(state)
            if rest:                  # plain tokens that would complete an earlier line's value
                plain = plain & ~self._completing(rest)
            m |= plain
        return m

    def _completing(self, rests: list[str]) -> np.ndarray:
        """Tokens whose normalized text reaches past the end of one of `rests`."""
        if not hasattr(self.vocab, "norms"):
            self.vocab.norms = [normalize(self._decode(i)) if i not in self.vocab.eos else ""
                                for i in range(self.vocab.size)]
        m = np.zeros(self.vocab.size, dtype=bool)
        for i, t in enumerate(self.vocab.norms):
            if t and any(t.startswith(r) for r in rests):
                m[i] = True
        return m

    def _space_start(self) -> np.ndarray:
        if not hasattr(self, "_space_mask"):
            m = np.zeros(self.vocab.size, dtype=bool)
            node = self.vocab.root.children.get(" ")
            stack = [node] if node else []
            while stack:
                nd = stack.pop()
                m[nd.ids] = True
                stack.extend(nd.children.values())
            self._space_mask = m
        return self._space_mask

    def bind(self, tokenizer) -> PlanProcessor:
        self._decode = lambda t: tokenizer.decode([t], clean_up_tokenization_spaces=False)
        return self

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._sync(input_ids, self._decode)
        self.stats["steps"] += 1
        if self.state is None:
            return scores             # left the grammar (cannot happen unless masks are bypassed)
        if (self.budget is not None and self.grammar.max_tasks > self.state[0]
                and self.state[0] >= self.grammar.min_tasks and _line_start(self.state[3])):
            reserve = max(48, 2 * self._longest_line) + 12
            if self.budget - self._seen < reserve:   # no room for another task: join now
                self.grammar = copy.copy(self.grammar)
                self.grammar.max_tasks = self.state[0]
                self.stats["forced_join"] += 1
        m = self.mask(self.state)
        if not m.any():
            # every continuation would repeat an earlier line: let this line repeat (the parser
            # turns it into an alias of the first) and end the plan after it
            self.stats["dead_ends"] += 1
            self.grammar = copy.copy(self.grammar)
            self.grammar.allow_repeat, self.grammar.max_tasks = True, self.state[0] + 1
            m = self.mask(self.state)
            if not m.any():
                m[self.vocab.eos] = True
        out = scores.detach().to("cpu", torch.float32).numpy().copy()  # (1, vocab)
        out[:, ~m] = -np.inf
        return torch.from_numpy(out).to(scores.device)
