"""Tools from plain Python functions: a description for the prompt, a checked async callable.

    @tool(timeout=5)
    def get_weather(city: str, unit: str = "celsius") -> str:
        '''Current weather of a city.

        Args:
            city: City name, e.g. "Paris".
            unit: "celsius" or "fahrenheit".
        '''

    box = Toolbox([get_weather, search])          # functions or Tools
    box["get_weather"].signature()                # 'get_weather(city: str, unit: str = "celsius")'
    obs = await box["get_weather"].acall({"city": "Paris"})   # Observation(ok, value, error, ...)

Argument values are validated and coerced to the annotated types (`"20"` -> 20 for an int,
`3` -> 3.0 for a float, a tuple -> list); a wrong name, a missing argument, a value that cannot
be coerced, an exception inside the tool or a timeout become an error Observation, never a crash.
Sync functions run in a worker thread so that several tools run at once. Tools can also be built
from a JSON schema (`Tool.from_schema`, the format BFCL and OpenAI use) around any callable.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError

# JSON-schema type names -> the Python type the value is coerced to ("any": left as it is).
SCHEMA_TYPES = {"string": str, "integer": int, "int": int, "float": float, "number": float,
                "boolean": bool, "bool": bool, "array": list, "list": list, "tuple": list,
                "dict": dict, "object": dict, "any": object}
PY_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict",
            object: "any"}
RESERVED = {"join", "finish", "replan"}


class ToolArgumentError(WorkbenchError):
    """Arguments that do not fit a tool's parameters (wrong name, missing, wrong type)."""


@dataclass(frozen=True)
class Param:
    """One parameter: `type` is str/int/float/bool/list/dict/object (object: anything)."""

    name: str
    type: type = object
    description: str = ""
    required: bool = True
    default: object = None
    enum: tuple | None = None
    items: type | None = None       # element type of a list, when known

    def describe(self) -> str:
        text = f"{self.name}: {PY_NAMES.get(self.type, 'any')}"
        if self.type is list and self.items not in (None, object):
            text = f"{self.name}: list[{PY_NAMES[self.items]}]"
        if not self.required:
            text += f" = {self.default!r}"
        return text


@dataclass
class Observation:
    """What a tool call returned: `value` when ok, else `error` (a message for the LLM)."""

    ok: bool
    value: object = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return str(self.value) if self.ok else f"Error: {self.error}"


def run_sync(coro):
    """Run a coroutine to completion from sync code, also where an event loop already runs
    (Jupyter): then in a fresh loop on a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def coerce(value, kind: type, name: str, items: type | None = None):
    """`value` as type `kind`, converting the usual near-misses; raises ToolArgumentError."""
    if kind is object:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind is list:
        if isinstance(value, (list, tuple)):
            if items in (None, object):
                return list(value)
            return [coerce(v, items, f"{name}[{i}]") for i, v in enumerate(value)]
    elif kind is dict:
        if isinstance(value, dict):
            return value
    raise ToolArgumentError(f"argument {name!r} must be {PY_NAMES.get(kind, kind.__name__)}, "
                            f"got {type(value).__name__} {value!r:.60}")


def _annotation(hint) -> tuple[type, type | None]:
    """(type, list item type) from a type hint such as int, list[str], Optional[float]."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _annotation(args[0]) if len(args) == 1 else (object, None)
    if origin in (list, tuple, set):
        args = typing.get_args(hint)
        return list, (_annotation(args[0])[0] if args else None)
    if origin is dict:
        return dict, None
    if hint in PY_NAMES:
        return hint, None
    if hint in (tuple, set):
        return list, None
    return object, None


def _doc_params(doc: str) -> tuple[str, dict[str, str]]:
    """First paragraph of a docstring, and `name: text` lines of its Args: section."""
    doc = inspect.cleandoc(doc or "")
    summary = doc.split("\n\n")[0].replace("\n", " ").strip()
    params, in_args, current = {}, False, None
    for line in doc.splitlines():
        if re.match(r"^(Args|Arguments|Parameters):\s*$", line.strip()):
            in_args = True
            continue
        if in_args:
            m = re.match(r"^\s+(\w+)\s*(\([^)]*\))?:\s*(.*)$", line)
            if m:
                current = m.group(1)
                params[current] = m.group(3).strip()
            elif line.strip() and line.startswith("        ") and current:
                params[current] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                in_args = False
    return summary, params


@dataclass
class Tool:
    """A callable the planner may use. Build with `tool(fn)` or `Tool.from_schema(schema, fn)`."""

    name: str
    description: str
    params: list[Param]
    fn: Callable
    timeout: float | None = None
    returns: str = ""
    param_map: dict[str, Param] = field(init=False, repr=False)

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z_][\w.\-]*", self.name):
            raise WorkbenchError(f"Tool name {self.name!r} must start with a letter or _ and hold "
                                 "only letters, digits, _, . and -.")
        if self.name.lower() in RESERVED:
            raise WorkbenchError(f"{self.name!r} is reserved in plans; name the tool differently.")
        self.param_map = {p.name: p for p in self.params}

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    @property
    def required(self) -> list[str]:
        return [p.name for p in self.params if p.required]

    def signature(self) -> str:
        """One line for the prompt: `name(arg: type, opt: type = default) - description`."""
        args = ", ".join(p.describe() for p in self.params)
        return f"{self.name}({args})"

    def describe(self) -> str:
        """Signature, description and parameter notes, as the planner prompt shows them."""
        lines = [f"{self.signature()}: {self.description}".rstrip(": ")]
        for p in self.params:
            note = p.description
            if p.enum:
                note += f" One of {list(p.enum)}."
            if note:
                lines.append(f"  - {p.name}: {note.strip()}")
        return "\n".join(lines)

    def bind(self, args: Iterable = (), kwargs: dict | None = None) -> dict:
        """Map positional and keyword values onto parameter names, check and coerce them."""
        args, kwargs = list(args), dict(kwargs or {})
        if len(args) > len(self.params):
            raise ToolArgumentError(f"{self.name} takes {len(self.params)} arguments, "
                                    f"got {len(args)} positional")
        out = {}
        for p, v in zip(self.params, args, strict=False):
            out[p.name] = v
        for k, v in kwargs.items():
            if k not in self.param_map:
                raise ToolArgumentError(f"{self.name} has no argument {k!r}; its arguments are "
                                        f"{[p.name for p in self.params]}")
            if k in out:
                raise ToolArgumentError(f"{self.name} got argument {k!r} twice")
            out[k] = v
        missing = [n for n in self.required if n not in out]
        if missing:
            raise ToolArgumentError(f"{self.name} is missing required argument(s) {missing}")
        for k, v in out.items():
            p = self.param_map[k]
            out[k] = coerce(v, p.type, k, p.items)
            if p.enum and out[k] not in p.enum:
                raise ToolArgumentError(f"argument {k!r} must be one of {list(p.enum)}, "
                                        f"got {out[k]!r:.60}")
        return out

    async def acall(self, kwargs: dict, timeout: float | None = None) -> Observation:
        """Validate, run (sync functions in a thread), time it; every failure is an Observation."""
        t0 = time.perf_counter()
        limit = timeout if timeout is not None else self.timeout
        try:
            bound = self.bind((), kwargs)
            if self.is_async:
                coro = self.fn(**bound)
            else:
                coro = asyncio.to_thread(self.fn, **bound)
            value = await (asyncio.wait_for(coro, limit) if limit else coro)
            return Observation(True, value, None, time.perf_counter() - t0)
        except ToolArgumentError as err:
            msg = str(err)
        except asyncio.TimeoutError:
            msg = f"{self.name} did not finish within {limit} s"
        except Exception as err:  # noqa: BLE001 - a tool's failure is an observation
            msg = f"{self.name} failed: {type(err).__name__}: {err}"
        return Observation(False, None, msg, time.perf_counter() - t0)

    def __call__(self, **kwargs) -> Observation:
        """Run synchronously, also inside Jupyter's event loop: `box["add"](a=1, b=2)`."""
        return run_sync(self.acall(kwargs))

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, description: str | None = None,
                      timeout: float | None = None) -> Tool:
        """Read name, docstring, type hints and defaults of a plain function."""
        if not callable(fn):
            raise WorkbenchError(f"tool() needs a function, got {type(fn).__name__}.")
        summary, notes = _doc_params(fn.__doc__ or "")
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # noqa: BLE001 - unresolvable annotations: treat as untyped
            hints = {}
        params = []
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            kind, items = _annotation(hints.get(p.name, object))
            required = p.default is inspect.Parameter.empty
            params.append(Param(p.name, kind, notes.get(p.name, ""), required,
                                None if required else p.default, None, items))
        return cls(name or fn.__name__, description or summary, params, fn, timeout)

    @classmethod
    def from_schema(cls, schema: dict, fn: Callable, timeout: float | None = None) -> Tool:
        """From an OpenAI/BFCL function schema {"name", "description", "parameters": {...}}."""
        try:
            props = schema.get("parameters", {}).get("properties", {}) or {}
            required = set(schema.get("parameters", {}).get("required", []) or [])
            params = []
            for pname, spec in props.items():
                kind = SCHEMA_TYPES.get(str(spec.get("type", "any")).lower(), object)
                items = None
                if kind is list and isinstance(spec.get("items"), dict):
                    items = SCHEMA_TYPES.get(str(spec["items"].get("type", "any")).lower(), object)
                enum = tuple(spec["enum"]) if isinstance(spec.get("enum"), list) else None
                params.append(Param(pname, kind, str(spec.get("description", "")),
                                    pname in required, spec.get("default"), enum, items))
            params.sort(key=lambda p: not p.required)  # required first, as in Python
            return cls(schema["name"], str(schema.get("description", "")), params, fn, timeout)
        except (KeyError, AttributeError, TypeError) as err:
            raise WorkbenchError(f"Malformed function schema ({err!r}): expected "
                                 "{'name', 'description', 'parameters': {'properties', "
                                 f"'required'}}}}, got {str(schema)[:120]}") from None


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None):
    """Decorator (bare or with options) that turns a typed, documented function into a Tool."""
    if fn is None:
        return lambda f: Tool.from_function(f, name, description, timeout)
    return Tool.from_function(fn, name, description, timeout)


class Toolbox:
    """The tools a planner may use, by name. Accepts Tools and plain functions."""

    def __init__(self, tools: Iterable[Tool | Callable] = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable) -> Tool:
        t = t if isinstance(t, Tool) else Tool.from_function(t)
        if t.name in self.tools:
            raise WorkbenchError(f"Two tools are named {t.name!r}; tool names must be unique.")
        self.tools[t.name] = t
        return t

    def __getitem__(self, name: str) -> Tool:
        if name not in self.tools:
            raise WorkbenchError(f"No tool named {name!r}; known tools: {sorted(self.tools)}.")
        return self.tools[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __iter__(self):
        return iter(self.tools.values())

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def describe(self) -> str:
        """Numbered tool list for the planner prompt."""
        return "\n".join(f"{i}. {t.describe()}" for i, t in enumerate(self, 1))

    def __repr__(self) -> str:
        return f"Toolbox({self.names})"
