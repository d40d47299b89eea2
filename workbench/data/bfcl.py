"""Berkeley Function Calling Leaderboard (BFCL v4), read from the `bfcl-eval` package's data files.

    entries = load_bfcl("simple")            # 400 one-call requests, ground truth joined by id
    entry = entries[0]
    entry.messages        # [{"role": "user", "content": "Find the area of a triangle ..."}]
    entry.functions       # [{"name": "calculate_triangle_area", "parameters": {...}, ...}]
    entry.possible_answer # [{"calculate_triangle_area": {"base": [10], "height": [5], ...}}]

Each `bfcl_eval/data/BFCL_v4_<category>.json` file holds JSON lines: an id, a `question` (a list
of turns, each a list of chat messages) and, for most categories, a `function` list of schemas.
`possible_answer/BFCL_v4_<category>.json` holds the ground truth for the categories that have one.
Multi-turn categories name API classes instead of listing functions; their schemas are read from
`multi_turn_func_doc/` as BFCL itself does. The package is not imported (its dependencies are
heavy), only its files are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.packages import install_command, package_folder

PREFIX = "BFCL_v4_"
# Older BFCL names for categories that v4 renamed.
ALIASES = {"simple": "simple_python", "java": "simple_java", "javascript": "simple_javascript"}
# Files that are not one request per line, or need BFCL's own runtime to mean anything.
NOT_LOADED = {
    "format_sensitivity": "it is a list of ids of other categories, not requests",
    "memory": "its requests need BFCL's memory backends and prerequisite conversations",
}
# API class -> function-doc file; copied from bfcl_eval/constants/executable_backend_config.py.
FUNC_DOC_FILES = {
    "GorillaFileSystem": "gorilla_file_system.json",
    "MathAPI": "math_api.json",
    "MessageAPI": "message_api.json",
    "TwitterAPI": "posting_api.json",
    "TicketAPI": "ticket_api.json",
    "TradingBot": "trading_bot.json",
    "TravelAPI": "travel_booking.json",
    "VehicleControlAPI": "vehicle_control.json",
    "WebSearchAPI": "web_search.json",
}
_PURPOSE = "The BFCL function-calling data"


@dataclass
class BFCLEntry:
    """One BFCL request.

    turns: user turns, each a list of {"role", "content"} messages (single-turn categories have
      one; a multi-turn turn can be empty where only a held-out function arrives).
    functions: the function schemas offered, as BFCL gives them (JSON-schema-like dicts).
    possible_answer: ground truth as given, or None (irrelevance categories: call nothing).
      Single-turn: [{function_name: {param: [accepted values, ...]}}, ...], one dict per call.
      Multi-turn: one list of call strings per turn ("cd(folder='document')").
      web_search: a list of accepted answer strings.
    held_out: multi_turn_miss_func only: turn index -> function schemas that become available
      at that turn (they are removed from `functions`, as BFCL does).
    extra: the entry's other fields as given (initial_config, involved_classes, path, ...), plus
      the answer file's extra fields (web_search: source, num_hops).
    """

    id: str
    category: str
    turns: list[list[dict]]
    functions: list[dict]
    possible_answer: list | None = None
    held_out: dict[int, list[dict]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def messages(self) -> list[dict]:
        """The first turn's messages: the whole request for single-turn categories."""
        return self.turns[0] if self.turns else []

    @property
    def is_multi_turn(self) -> bool:
        return len(self.turns) > 1


def _data_folder() -> Path:
    folder = package_folder("bfcl-eval", _PURPOSE) / "data"
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is missing: the bfcl-eval package is broken. Reinstall it "
                             f"with:  {install_command('bfcl-eval')} --force-reinstall")
    return folder


def bfcl_categories() -> list[str]:
    """Names of the BFCL categories `load_bfcl` reads, e.g. 'simple_python', 'live_multiple'."""
    names = (p.name[len(PREFIX):-len(".json")] for p in _data_folder().glob(f"{PREFIX}*.json"))
    return sorted(n for n in names if n not in NOT_LOADED)


def _read_lines(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _resolve(category: str) -> str:
    name = category.strip().lower().removeprefix(PREFIX.lower()).removesuffix(".json")
    name = ALIASES.get(name, name)
    if name in NOT_LOADED:
        raise WorkbenchError(f"BFCL category {category!r} is not loaded here: {NOT_LOADED[name]}. "
                             f"Loadable categories: {', '.join(bfcl_categories())}.")
    valid = bfcl_categories()
    if name not in valid:
        aliases = ", ".join(f"{a} -> {b}" for a, b in ALIASES.items())
        raise WorkbenchError(f"Unknown BFCL category {category!r}. Valid categories: "
                             f"{', '.join(valid)} (aliases: {aliases}).")
    return name


def _class_functions(folder: Path, classes: list[str]) -> list[dict]:
    functions = []
    for cls in classes:
        if cls not in FUNC_DOC_FILES:
            raise WorkbenchError(f"BFCL names an API class {cls!r} with no function-doc file "
                                 f"known here ({', '.join(FUNC_DOC_FILES)}).")
        functions.extend(_read_lines(folder / "multi_turn_func_doc" / FUNC_DOC_FILES[cls]))
    return functions


def _entry(row: dict, category: str, answers: dict, folder: Path) -> BFCLEntry:
    row = dict(row)
    entry_id, turns = row.pop("id"), row.pop("question")
    functions = row.pop("function", None)
    if functions is None:  # multi-turn and agentic: schemas come from the named API classes
        functions = _class_functions(folder, row.get("involved_classes", []))
    held_out: dict[int, list[dict]] = {}
    for turn, names in row.get("missed_function", {}).items():
        held_out[int(turn)] = [f for f in functions if f["name"] in names]
        functions = [f for f in functions if f["name"] not in names]
    answer = answers.get(entry_id, {})
    row.update((k, v) for k, v in answer.items() if k not in ("id", "ground_truth"))
    return BFCLEntry(id=entry_id, category=category, turns=turns, functions=functions,
                     possible_answer=answer.get("ground_truth"), held_out=held_out, extra=row)


def load_bfcl(category: str) -> list[BFCLEntry]:
    """All entries of one BFCL v4 category, in file order, with ground truth joined by id.

    `category` is a name from `bfcl_categories()` ('simple' is accepted for 'simple_python').
    """
    name = _resolve(category)
    folder = _data_folder()
    answer_file = folder / "possible_answer" / f"{PREFIX}{name}.json"
    answers = {}
    if answer_file.is_file():
        answers = {row["id"]: row for row in _read_lines(answer_file)}
    rows = _read_lines(folder / f"{PREFIX}{name}.json")
    return [_entry(row, name, answers, folder) for row in rows]
