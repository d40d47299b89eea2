"""Streaming parser for LLMCompiler plans: each task is emitted as soon as its line is complete.

    parser = PlanParser(toolbox)                  # toolbox optional: then names are not checked
    for piece in reply:                           # text pieces from the planner
        for event in parser.feed(piece):          # Task (incl. the join) or PlanIssue
            ...
    parser.close(); parser.plan                   # Plan(tasks, issues, joined, ended, ...)

Grammar, one item per line:

    Thought: free text                            (attached to the next task)
    1. search(query="cheetah top speed")          numbered call, keyword or positional arguments
    2. ratio(a=$1, b="${1} vs ${2}")              $N / ${N}: output of task N, anywhere, several
    3. join()                                     then the end marker <END_OF_PLAN>

Arguments are Python literals read with `ast.parse` + `ast.literal_eval`: nothing is ever
evaluated, so `__import__("os")` is a rejected line, not a call. A reference that is a whole
value (`a=$1`) becomes the dependency's result as it is; inside a string it is replaced by its
text (`${10}` and `$10` both mean task 10, never task 1 followed by "0"). JSON's true/false/null
are accepted as True/False/None.

Problems are PlanIssue events with a line number and a message. In "repair" mode (default) a bad
task is dropped, and so is every task that depends on it; a repeated task becomes an alias of
the first one, and so does a near-duplicate (`dedup`: the same call with cosmetic changes). In
"strict" mode the first error rejects the plan: no further task is emitted.
Either way no task ever starts with an input that is missing or wrong.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

from workbench.compiler.dedup import call_of, first_near_duplicate
from workbench.compiler.tools import ToolArgumentError, Toolbox, coerce

END_MARKER = "<END_OF_PLAN>"
MAX_LINE = 4000                      # longer lines are rejected before ast sees them
REF_IN_TEXT = re.compile(r"\$\{(\d+)\}|\$(\d+)")
_TASK_LINE = re.compile(r"^(\d+)\s*\.\s*(.*)$")
_CALL = re.compile(r"^([A-Za-z_][\w.\-]*)\s*\((.*)\)$", re.DOTALL)
_PLACEHOLDER = re.compile(r"^__ref_(\d+)__$")
_JSON_NAMES = {"true": True, "false": False, "null": None}
# issue kinds that are only warnings: the plan is still usable as it is
WARNINGS = {"ignored", "duplicate_task", "near_duplicate", "after_join"}


class PlanSyntaxError(ValueError):
    """A task line whose call or arguments cannot be read."""


@dataclass(frozen=True)
class Ref:
    """A whole-value reference to the output of task `n` (`$n` or `${n}`). `path`: a field of
    that output ("a.b"); plans never write one, NESTFUL's `$var1.skyId$` converts to it."""

    n: int
    path: str | None = None

    def __repr__(self) -> str:
        return f"${self.n}" + (f".{self.path}" if self.path else "")


@dataclass
class Task:
    """One planned call. `deps`: ids of the tasks whose outputs its arguments use."""

    idx: int
    tool: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    deps: tuple[int, ...] = ()
    line: str = ""
    thought: str | None = None

    @property
    def is_join(self) -> bool:
        return self.tool == "join"

    def call_text(self) -> str:
        """The call as it appears in a plan, e.g. `add(a=1, b=$2)`."""
        parts = [_show(v) for v in self.args] + [f"{k}={_show(v)}" for k, v in self.kwargs.items()]
        return f"{self.tool}({', '.join(parts)})"

    def __str__(self) -> str:
        return f"{self.idx}. {self.call_text()}"


@dataclass
class PlanIssue:
    """Something wrong in a plan. `kind` names the problem; warnings do not spoil the plan."""

    line_no: int
    line: str
    kind: str
    message: str

    @property
    def is_error(self) -> bool:
        return self.kind not in WARNINGS

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.message}  [{self.line[:80]!r}]"


@dataclass
class Plan:
    """What has been parsed so far: accepted tasks by id, issues, join and end marker seen."""

    tasks: dict[int, Task] = field(default_factory=dict)
    issues: list[PlanIssue] = field(default_factory=list)
    joined: bool = False
    ended: bool = False
    rejected: bool = False
    text: str = ""

    @property
    def errors(self) -> list[PlanIssue]:
        return [i for i in self.issues if i.is_error]

    @property
    def ok(self) -> bool:
        """Parsed cleanly: tasks, a join, no errors."""
        return bool(self.calls) and self.joined and not self.errors and not self.rejected

    @property
    def calls(self) -> list[Task]:
        """The tool calls (join excluded), in id order."""
        return [t for _, t in sorted(self.tasks.items()) if not t.is_join]

    def render(self) -> str:
        """The plan as text: numbered calls, join, end marker."""
        lines = [str(t) for t in self.calls]
        lines.append(f"{max((t.idx for t in self.calls), default=0) + 1}. join()")
        return "\n".join(lines) + "\n" + END_MARKER


def _show(v) -> str:
    if isinstance(v, Ref):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)   # JSON escapes are valid Python escapes
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_show(k)}: {_show(x)}" for k, x in v.items()) + "}"
    return repr(v)


# ---------------------------------------------------------------------------------------------
# Arguments: literals and references, never evaluated


def _mask_refs(text: str) -> str:
    """Replace $N / ${N} outside string literals by the name __ref_N__ (strings stay as they are)."""
    out, i, quote = [], 0, None
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                out.append(text[i:i + 2])
                i += 2
            elif text.startswith(quote, i):
                out.append(quote)
                i += len(quote)
                quote = None
            else:
                out.append(c)
                i += 1
            continue
        if c in "'\"":
            quote = c * 3 if text.startswith(c * 3, i) else c
            out.append(quote)
            i += len(quote)
            continue
        m = REF_IN_TEXT.match(text, i) if c == "$" else None
        if m:
            out.append(f" __ref_{m.group(1) or m.group(2)}__ ")
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _value(node: ast.AST):
    """A literal value from an AST node; names __ref_N__ become Ref(N)."""
    if isinstance(node, ast.Name):
        m = _PLACEHOLDER.match(node.id)
        if m:
            return Ref(int(m.group(1)))
        if node.id in _JSON_NAMES:
            return _JSON_NAMES[node.id]
        raise PlanSyntaxError(f"{node.id!r} is a name, not a literal value (quote strings)")
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_value(x) for x in node.elts]
        return items if not isinstance(node, ast.Set) else items
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise PlanSyntaxError("** inside a dict is not a literal")
        keys = [_value(k) for k in node.keys]
        if any(isinstance(k, (Ref, list, dict)) for k in keys):
            raise PlanSyntaxError("dict keys must be plain literals")
        try:
            return dict(zip(keys, (_value(v) for v in node.values), strict=False))
        except TypeError as err:
            raise PlanSyntaxError(f"bad dict key: {err}") from None
    try:
        return ast.literal_eval(node)
    except Exception:  # noqa: BLE001 - anything that is not a literal
        kind = type(node).__name__
        raise PlanSyntaxError(f"argument is not a literal value ({kind}: "
                              f"{_unparse(node)[:40]!r})") from None


def _unparse(node) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # noqa: BLE001
        return type(node).__name__


def references(value) -> set[int]:
    """Task ids a value refers to: Ref objects and $N / ${N} inside strings, at any depth."""
    if isinstance(value, Ref):
        return {value.n}
    if isinstance(value, str):
        return {int(a or b) for a, b in REF_IN_TEXT.findall(value)}
    if isinstance(value, dict):
        return set().union(*(references(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(references(v) for v in value)) if value else set()
    return set()


def parse_arguments(text: str) -> tuple[list, dict]:
    """`'a=1, b="x $1"'` -> ([], {"a": 1, "b": "x $1"}); raises PlanSyntaxError."""
    if len(text) > MAX_LINE:
        raise PlanSyntaxError(f"arguments are {len(text)} characters long (limit {MAX_LINE})")
    masked = _mask_refs(text)
    try:
        tree = ast.parse(f"_f({masked})", mode="eval")
    except Exception as err:  # noqa: BLE001 - SyntaxError, RecursionError, MemoryError, ...
        raise PlanSyntaxError(f"arguments are not valid Python call syntax "
                              f"({type(err).__name__}: {getattr(err, 'msg', err)})") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "_f"):
        raise PlanSyntaxError("arguments are not a plain argument list")
    args, kwargs = [], {}
    for a in call.args:
        if isinstance(a, ast.Starred):
            raise PlanSyntaxError("*args is not allowed in a plan")
        args.append(_value(a))
    for kw in call.keywords:
        if kw.arg is None:
            raise PlanSyntaxError("**kwargs is not allowed in a plan")
        kwargs[kw.arg] = _value(kw.value)
    return args, kwargs


def substitute(value, results: dict[int, object]):
    """Replace references by results: a Ref by the result itself, $N in a string by its text."""
    if isinstance(value, Ref):
        out = results[value.n]
        for key in (value.path.split(".") if value.path else ()):
            out = out[key] if isinstance(out, dict) else getattr(out, key)
        return out
    if isinstance(value, str):
        return REF_IN_TEXT.sub(lambda m: str(results[int(m.group(1) or m.group(2))]), value)
    if isinstance(value, list):
        return [substitute(v, results) for v in value]
    if isinstance(value, tuple):
        return tuple(substitute(v, results) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, results) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# The streaming parser


class PlanParser:
    """Feed text pieces; get Task and PlanIssue events as lines complete. See the module doc."""

    def __init__(self, toolbox: Toolbox | None = None, mode: str = "repair"):
        if mode not in ("repair", "strict"):
            raise ValueError(f"mode must be 'repair' or 'strict', not {mode!r}")
        self.toolbox, self.mode = toolbox, mode
        self.plan = Plan()
        self._buf, self._line_no, self._thought = "", 0, None
        self._dropped: set[int] = set()
        self._alias: dict[int, int] = {}
        self._seen_calls: dict[str, int] = {}

    def feed(self, piece: str) -> list:
        """Add text; return the events of every line it completed."""
        if self.plan.ended or self.plan.rejected:
            self.plan.text += piece
            return []
        self.plan.text += piece
        self._buf += piece
        events = []
        while "\n" in self._buf and not self.plan.ended and not self.plan.rejected:
            line, self._buf = self._buf.split("\n", 1)
            events += self._line(line)
        if END_MARKER in self._buf and not self.plan.ended:
            before = self._buf.split(END_MARKER, 1)[0]
            events += self._line(before)
            self._end()
        return events

    def close(self) -> list:
        """The stream is over: parse a last unterminated line; note a missing join."""
        events = []
        if self._buf and not self.plan.ended and not self.plan.rejected:
            events += self._line(self._buf)
        self._buf = ""
        if not self.plan.joined and not self.plan.rejected:
            events.append(self._issue(self._line_no, "", "no_join",
                                      "the plan ended without join() (was it cut off at the "
                                      "token limit?)"))
        self.plan.ended = True
        return events

    def _end(self) -> None:
        self.plan.ended = True
        self._buf = ""

    def _issue(self, line_no: int, line: str, kind: str, message: str) -> PlanIssue:
        issue = PlanIssue(line_no, line, kind, message)
        self.plan.issues.append(issue)
        if issue.is_error and self.mode == "strict":
            self.plan.rejected = True
        return issue

    def _line(self, raw: str) -> list:
        self._line_no += 1
        line = raw.strip()
        if END_MARKER in line:
            line = line.split(END_MARKER, 1)[0].strip()
            self._end()
        if not line or line.startswith("```"):
            return []
        if self.plan.rejected:
            return []
        if line.lower().startswith("thought:"):
            self._thought = line[len("thought:"):].strip()
            return []
        m = _TASK_LINE.match(line)
        if not m:
            return [self._issue(self._line_no, line, "ignored", "not a task line; ignored")]
        if self.plan.joined:
            return [self._issue(self._line_no, line, "after_join",
                                "task after join(); ignored")]
        try:
            idx = int(m.group(1))
        except ValueError:  # absurdly long digit strings
            return [self._issue(self._line_no, line, "malformed", "task number is not readable")]
        return self._task(idx, m.group(2).strip(), line)

    def _task(self, idx: int, body: str, line: str) -> list:
        n = self._line_no
        if idx in self.plan.tasks or idx in self._dropped or idx in self._alias:
            return [self._issue(n, line, "duplicate_id", f"task id {idx} is used twice")]
        if re.fullmatch(r"join\s*\(\s*\)|join", body, re.IGNORECASE):
            self.plan.joined = True
            deps = tuple(sorted(self.plan.tasks))
            task = Task(idx, "join", deps=deps, line=line, thought=self._thought)
            self.plan.tasks[idx] = task
            self._thought = None
            return [task]
        call = _CALL.match(body)
        if not call:
            self._dropped.add(idx)
            return [self._issue(n, line, "malformed",
                                f"task {idx} is not of the form  tool(arg=value, ...)")]
        name = call.group(1)
        try:
            args, kwargs = parse_arguments(call.group(2))
        except PlanSyntaxError as err:
            self._dropped.add(idx)
            return [self._issue(n, line, "malformed", f"task {idx}: {err}")]
        if self.toolbox is not None and name not in self.toolbox:
            self._dropped.add(idx)
            return [self._issue(n, line, "unknown_tool", f"task {idx} calls unknown tool {name!r}; "
                                f"known tools: {self.toolbox.names}")]
        # references: resolve aliases of repeated tasks, then check each one
        refs = references(args) | references(kwargs)
        for r in sorted(refs):
            target = self._alias.get(r, r)
            if target in self.plan.tasks:
                continue
            self._dropped.add(idx)
            if r >= idx:
                kind, why = "forward_ref", (f"refers to ${r}, which is not an earlier task "
                                            "(a task can only use outputs of tasks above it)")
            elif r in self._dropped:
                kind, why = "dependency_dropped", f"depends on task {r}, which was dropped"
            else:
                kind, why = "missing_ref", f"refers to ${r}, but there is no task {r}"
            return [self._issue(n, line, kind, f"task {idx} {why}")]
        if self._alias:
            args = _realias(args, self._alias)
            kwargs = _realias(kwargs, self._alias)
        if self.toolbox is not None:
            problem = check_arguments(self.toolbox[name], args, kwargs)
            if problem:
                self._dropped.add(idx)
                return [self._issue(n, line, "arguments", f"task {idx}: {problem}")]
        task = Task(idx, name, args, kwargs, tuple(sorted(references(args) | references(kwargs))),
                    line, self._thought)
        key = task.call_text()
        if key in self._seen_calls:
            first = self._seen_calls[key]
            self._alias[idx] = first
            return [self._issue(n, line, "duplicate_task",
                                f"task {idx} repeats task {first}; ${idx} now means ${first}")]
        near = self._near_duplicate(task)
        if near is not None:
            first, why = near
            self._alias[idx] = first
            return [self._issue(n, line, "near_duplicate", f"task {idx} nearly repeats task "
                                f"{first} ({why}); ${idx} now means ${first}")]
        self._seen_calls[key] = idx
        self.plan.tasks[idx] = task
        self._thought = None
        return [task]


    def _near_duplicate(self, task: Task) -> tuple[int, str] | None:
        earlier = [(t.idx, call_of(t.tool, t.args, t.kwargs)) for t in self.plan.tasks.values()
                   if t.tool == task.tool]
        if not earlier:
            return None
        defaults = None
        if self.toolbox is not None:
            defaults = {p.name: p.default for p in self.toolbox[task.tool].params
                        if not p.required}
        return first_near_duplicate(call_of(task.tool, task.args, task.kwargs), earlier, defaults)


def _realias(value, alias: dict[int, int]):
    if isinstance(value, Ref):
        return Ref(alias.get(value.n, value.n))
    if isinstance(value, str):
        def fix(m):
            n = int(m.group(1) or m.group(2))
            return "${" + str(alias.get(n, n)) + "}"
        return REF_IN_TEXT.sub(fix, value)
    if isinstance(value, list):
        return [_realias(v, alias) for v in value]
    if isinstance(value, dict):
        return {k: _realias(v, alias) for k, v in value.items()}
    return value


def check_arguments(tool, args: list, kwargs: dict) -> str | None:
    """Names, count and (for literal values) types against a Tool; a message, or None if fine."""
    params = tool.params
    if len(args) > len(params):
        return f"{tool.name} takes {len(params)} arguments, got {len(args)} positional"
    given = {p.name: v for p, v in zip(params, args, strict=False)}
    for k, v in kwargs.items():
        if k not in tool.param_map:
            return f"{tool.name} has no argument {k!r}; its arguments are {[p.name for p in params]}"
        if k in given:
            return f"argument {k!r} given twice"
        given[k] = v
    missing = [p for p in tool.required if p not in given]
    if missing:
        return f"{tool.name} is missing required argument(s) {missing}"
    for k, v in given.items():
        if references(v):
            continue  # checked when the referenced result is known
        p = tool.param_map[k]
        try:
            v = coerce(v, p.type, k, p.items)
        except ToolArgumentError as err:
            return str(err)
        if p.enum and v not in p.enum:
            return f"argument {k!r} must be one of {list(p.enum)}, got {v!r:.60}"
    return None


def parse_plan(text: str, toolbox: Toolbox | None = None, mode: str = "repair") -> Plan:
    """Parse a whole plan text at once (same rules as streaming)."""
    parser = PlanParser(toolbox, mode)
    parser.feed(text)
    parser.close()
    return parser.plan


def find_cycle(deps: dict[int, set[int] | tuple]) -> list[int] | None:
    """A cycle in a dependency map {task: deps} as a list of ids, or None (iterative DFS)."""
    color: dict[int, int] = {}
    for start in deps:
        if color.get(start):
            continue
        stack, path = [(start, iter(deps.get(start, ())))], [start]
        color[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
            elif color.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not color.get(nxt) and nxt in deps:
                color[nxt] = 1
                stack.append((nxt, iter(deps.get(nxt, ()))))
                path.append(nxt)
    return None


def check_dag(deps: dict[int, set[int] | tuple]) -> list[str]:
    """Problems of a dependency map built outside the parser: missing tasks and cycles."""
    problems = [f"task {t} depends on missing task {d}"
                for t, ds in deps.items() for d in ds if d not in deps]
    cycle = find_cycle(deps)
    if cycle:
        problems.append("cycle: " + " -> ".join(map(str, cycle)))
    return problems
