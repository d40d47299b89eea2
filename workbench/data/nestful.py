"""NESTFUL: nested sequences of API calls whose arguments use earlier calls' outputs.

    samples = load_nestful("executable")      # 85 real RapidAPI sequences
    s = samples[0]
    s.query        # "Find flights from New York to London ... and find hotels in London."
    s.calls[2]     # NestfulCall(name="SkyScrapperFlightSearch",
                   #             arguments={"originSkyId": "$var1.skyId$", ...}, label="var3")
    s.depends_on   # {"var1": set(), "var2": set(), "var3": {"var1", "var2"}, ...}: the DAG
    s.result       # the final step: {"flights": "$var3$", "hotels": "$var5$"}

Read from the `data_v1/` folder that the `nestful-wrapper` package installs next to `nestful/`
(not imported: it needs pydantic and jsonref). Splits: 'executable' (real APIs with OpenAPI-like
specs), and two non-executable ones, 'glaive' and 'sgd' (synthetic APIs). A reference is
"$var1$" (the whole output of the call labelled var1) or "$var1.skyId$" (one output field); it
may sit inside a longer string ("5 * $var1.Exchange Rate$"). The data is kept as given: in 5 of
the 300 samples a label repeats or the result names a label no call has. ComplexFuncBench, which the package
also ships (200 MB, another format), is not loaded here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.packages import install_command, package_folder

# split -> path under data_v1/ (without the -data.json / -spec.json ending)
SPLITS = {
    "executable": "executable/executable",
    "glaive": "non-executable/non-executable-glaive",
    "sgd": "non-executable/non-executable-sgd",
}
GROUPS = {"all": list(SPLITS), "non-executable": ["glaive", "sgd"]}
RESULT_NAME = "var_result"  # the last step: gathers the outputs the query asks for
REFERENCE = re.compile(r"\$(var\d+)(?:\.([^$]+))?\$")
_PURPOSE = "The NESTFUL nested function-calling data"


@dataclass(frozen=True)
class Reference:
    """A use of an earlier call's output: `label` ("var1") and `path` ("skyId", or None: all)."""

    label: str
    path: str | None


def references(value) -> list[Reference]:
    """All "$varN[.field]$" references in an argument value (strings, lists, dicts), in order."""
    if isinstance(value, str):
        return [Reference(m.group(1), m.group(2)) for m in REFERENCE.finditer(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [ref for item in value for ref in references(item)]
    return []


@dataclass(frozen=True)
class NestfulCall:
    """One gold call: the API `name`, its `arguments` as given, and the `label` of its output."""

    name: str
    arguments: dict
    label: str

    @property
    def references(self) -> list[Reference]:
        return references(self.arguments)


@dataclass
class NestfulSample:
    """One NESTFUL query with its gold call sequence.

    id: "<split>-<index in file>". tools: every API spec of the sample's split (what a planner is
    offered; shared between samples). calls: the gold calls in order. result: arguments of the
    final 'var_result' step, mapping output names to references.
    """

    id: str
    split: str
    query: str
    calls: list[NestfulCall]
    result: dict
    tools: list[dict] = field(repr=False)

    @property
    def executable(self) -> bool:
        return self.split == "executable"

    @property
    def depends_on(self) -> dict[str, set[str]]:
        """Label -> labels of the earlier calls whose outputs its arguments use."""
        return {c.label: {r.label for r in c.references} for c in self.calls}

    @property
    def used_tools(self) -> list[dict]:
        """Specs of the APIs the gold calls use, in order of first use."""
        specs = {t["name"]: t for t in self.tools}
        names = dict.fromkeys(c.name for c in self.calls)
        return [specs[n] for n in names if n in specs]


def _data_folder() -> Path:
    # The wheel installs data_v1/ as a top-level folder beside the nestful package.
    folder = package_folder("nestful-wrapper", _PURPOSE).parent / "data_v1"
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is missing: the nestful-wrapper package is broken. "
                             f"Reinstall it with:  {install_command('nestful-wrapper')} "
                             "--force-reinstall")
    return folder


def _split_names(split: str) -> list[str]:
    if split in GROUPS:
        return GROUPS[split]
    if split in SPLITS:
        return [split]
    raise WorkbenchError(f"Unknown NESTFUL split {split!r}. Use one of: "
                         f"{', '.join([*SPLITS, *GROUPS])}.")


def _read(split: str, kind: str):
    with open(_data_folder() / f"{SPLITS[split]}-{kind}.json", encoding="utf-8") as f:
        return json.load(f)


def nestful_catalog(split: str = "executable") -> list[dict]:
    """API specs of one split (or group), as given: name, description, query_parameters,
    output_parameters (and method, host, url, ... for executable APIs)."""
    return [spec for name in _split_names(split) for spec in _read(name, "spec")]


def _sample(row: dict, split: str, index: int, tools: list[dict]) -> NestfulSample:
    steps = row["output"]
    calls = [NestfulCall(s["name"], s["arguments"], s.get("label", f"var{i + 1}"))
             for i, s in enumerate(steps) if s["name"] != RESULT_NAME]
    result = next((s["arguments"] for s in steps if s["name"] == RESULT_NAME), {})
    return NestfulSample(id=f"{split}-{index}", split=split, query=row["input"], calls=calls,
                         result=result, tools=tools)


def load_nestful(split: str = "all") -> list[NestfulSample]:
    """NESTFUL samples of 'executable', 'glaive', 'sgd', 'non-executable' (both) or 'all'."""
    samples = []
    for name in _split_names(split):
        tools = _read(name, "spec")
        samples += [_sample(row, name, i, tools) for i, row in enumerate(_read(name, "data"))]
    return samples
