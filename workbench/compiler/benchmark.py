"""Benchmarks on real data: planning accuracy (BFCL), executor latency (BFCL reference plans),
NESTFUL sequences as DAGs. Each writes JSON with the environment and date.

    python -m workbench.compiler.benchmark planning --n 10   # -> benchmarks/results/compiler_planning.json
    python -m workbench.compiler.benchmark latency --n 8 --tool-latency 2.0
    python -m workbench.compiler.benchmark nestful

Planning: for BFCL simple / multiple / parallel / parallel_multiple requests (n per category,
evenly spaced through the file), the embedded model writes a plan with and without grammar
constraints. A plan *parses* when it has calls, a join and no errors; it is *valid* when every
call names a known tool with its own argument names and well-typed literals; it is *correct*
when its calls match BFCL's possible answers one to one, as BFCL's AST checker compares them
(function name; every given argument allowed; values among the accepted ones, strings compared
lowercase without spaces and punctuation, ints accepted for floats; "" = may be omitted).

Latency: BFCL parallel / parallel_multiple requests with 3+ reference calls become plans; each
tool sleeps a stated latency. LLMCompiler: the planner (the real model, teacher-forced to write
the reference plan, streamed) + tasks started as lines complete + the joiner. ReAct: one real LLM
step per call (forced to write that call) and the call, one after another, then join() and the
same joiner. Both include every LLM call's real time on this machine, and both run on a
LocalChat with the prefix KV cache on (each ReAct step prefills only the new observation turn);
the cache is cleared before each agent, and the agents alternate which goes first. Both
agents first run once, untimed, on the first request with instant tools (one-time costs: kernel
selection, a CUDA-graph capture).

On a GPU machine without the BFCL package or the model file (the H200 here): export the requests
and carry them with the model's config and tokenizer files; the model gets random weights (the
plans are teacher-forced, so only the timing matters), and --static-cache replays each decode
step from a CUDA graph:

    python -m workbench.compiler.benchmark export --n 8 --out-dir .gpu
    cp ~/.cache/workbench/models/SmolLM2-135M-Instruct-Q4_1/{*.json,chat_template.jinja} .gpu/smollm2/
    python -m workbench.compiler.benchmark latency --entries .gpu/latency_entries.json \
        --random-weights .gpu/smollm2 --static-cache --name latency_h200   # on the GPU

Endpoint rows (planning): only when WORKBENCH_OPENAI_BASE_URL is set; otherwise the result says
"not configured" and nothing is tried.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

from workbench.compiler.parser import END_MARKER, Ref, _show, check_dag
from workbench.compiler.tools import Tool, Toolbox

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple")
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def environment() -> dict:
    import torch

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {"device": platform.processor() or platform.machine(), "device_type": "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": version("transformers"), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def write(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"compiler_{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=1,
                               default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# BFCL-style call checking


def _norm(v):
    if isinstance(v, str):
        return re.sub(r"[ ,./\-_*^]", "", v.lower())
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return ("unmatchable", repr(v))      # a $N reference never equals a literal answer


def _value_ok(value, accepted: list) -> bool:
    for a in accepted:
        if a == "":
            continue
        if isinstance(a, dict) and isinstance(value, dict):
            if set(value) <= set(a) and all(
                    (k in value and _value_ok(value[k], acc if isinstance(acc, list) else [acc]))
                    or (k not in value and "" in (acc if isinstance(acc, list) else [acc]))
                    for k, acc in a.items()):
                return True
        elif _norm(value) == _norm(a):
            return True
    return False


def call_matches(name: str, args: dict, answer: dict) -> bool:
    """One call against one possible answer {function: {param: [accepted values]}}."""
    (fname, params), = answer.items()
    if name != fname or any(k not in params for k in args):
        return False
    for k, accepted in params.items():
        if k not in args:
            if "" not in accepted:
                return False
        elif not _value_ok(args[k], accepted):
            return False
    return True


def calls_match(calls: list[tuple[str, dict]], answers: list[dict]) -> bool:
    """All calls match the possible answers one to one, in any order."""
    if len(calls) != len(answers):
        return False
    ok = [[call_matches(n, a, ans) for ans in answers] for n, a in calls]
    return any(all(ok[i][j] for i, j in enumerate(perm))
               for perm in itertools.permutations(range(len(answers))))


def bfcl_toolbox(functions: list[dict], latency: float = 0.0) -> Toolbox:
    """Tools for a BFCL entry's schemas; each sleeps `latency` s and echoes its call."""
    def make(name):
        async def fn(**kwargs):
            await asyncio.sleep(latency)
            return f"{name} done"
        return fn
    return Toolbox([Tool.from_schema(f, make(f["name"])) for f in functions])


def _spread(items: list, n: int) -> list:
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 1. planning accuracy


def endpoint_backend():
    """OpenAIChat when WORKBENCH_OPENAI_BASE_URL is set, else None (rows are skipped)."""
    from workbench.llm import ENV_BASE_URL, OpenAIChat

    return OpenAIChat() if os.environ.get(ENV_BASE_URL[0]) else None


def near_duplicates(plan) -> int:
    """Calls in a plan's text that repeat an earlier call exactly or nearly (dedup)."""
    return sum(i.kind in ("duplicate_task", "near_duplicate") for i in plan.issues)


def planning(n: int = 10, backend=None, max_tokens: int = 200, log=print,
             endpoint="auto") -> dict:
    """n requests per category; the embedded model (or `backend`) with and without constraints,
    plus an endpoint backend (unconstrained) when one is configured (endpoint="auto")."""
    from workbench.compiler.planner import Planner
    from workbench.data import load_bfcl
    from workbench.llm import LocalChat, get_backend

    chat = get_backend(backend or "local")
    if isinstance(chat, LocalChat):
        chat.prefix_cache = True        # the two modes share the whole prompt
    backends = [("local", chat, [False, True] if hasattr(chat, "tokenizer") else [False])]
    remote = endpoint_backend() if endpoint == "auto" else endpoint
    if remote is not None:
        backends.append(("endpoint", remote, [False]))
    rows = []
    for cat in CATEGORIES:
        for entry in _spread(load_bfcl(cat), n):
            box = bfcl_toolbox(entry.functions)
            for which, bk, modes in backends:
                planner = Planner(bk, box, constrained=False, max_tokens=max_tokens)
                for constrained in modes:
                    rows.append(_plan_row(planner, entry, cat, which, constrained, log))
    summary = []
    combos = [(w, c) for w, _, modes in backends for c in modes]
    for cat, (which, c) in itertools.product([*CATEGORIES, "all"], combos):
        sel = [r for r in rows if r["backend"] == which and r["constrained"] == c
               and cat in ("all", r["category"])]
        summary.append({"category": cat, "backend": which, "constrained": c, "n": len(sel),
                        **{k: round(sum(r[k] for r in sel) / len(sel), 3)
                           for k in ("parsed", "valid", "correct")},
                        "repeated_lines": sum(r["near_duplicates"] for r in sel),
                        "hit_token_limit": sum(r["finish"] == "length" for r in sel),
                        "tokens_per_s": round(sum(r["tokens"] or 0 for r in sel)
                                              / max(1e-9, sum(r["seconds"] for r in sel)), 2)})
    return {"benchmark": "planning", "model": chat.model_name, "n_per_category": n,
            "max_tokens": max_tokens,
            "endpoint": remote.model_name if remote is not None else "not configured",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "summary": summary, "rows": rows}


def _plan_row(planner, entry, cat, which, constrained, log) -> dict:
    """Plan one BFCL request once and score it (parsed / valid / correct)."""
    question = entry.messages[-1]["content"]
    plan, result = planner.plan(question, constrained=constrained)
    calls = [(t.tool, t.kwargs) for t in plan.calls]
    kinds = [i.kind for i in plan.issues]
    row = {"id": entry.id, "category": cat, "backend": which,
           "constrained": constrained,
           "parsed": plan.ok, "valid": bool(plan.calls) and plan.joined and not any(
               k in kinds for k in ("unknown_tool", "arguments", "malformed")),
           "correct": plan.ok and calls_match(calls, entry.possible_answer),
           "n_calls": len(plan.calls), "n_reference": len(entry.possible_answer),
           "issues": kinds, "near_duplicates": near_duplicates(plan),
           "tokens": result.completion_tokens,
           "seconds": round(result.seconds, 2), "finish": result.finish_reason,
           "text": result.text[:600]}
    log(f"{cat:18s} {entry.id:24s} {which:8s} constrained={constrained!s:5s} "
        f"parsed={row['parsed']!s:5s} correct={row['correct']!s:5s} {row['seconds']:.1f}s")
    return row


# ---------------------------------------------------------------------------------------------
# 2. executor latency


def reference_plan(answers: list[dict]) -> str:
    """BFCL possible answers -> plan text, first accepted value of each argument ("" omitted)."""
    lines = []
    for i, ans in enumerate(answers, 1):
        (name, params), = ans.items()
        args = []
        for k, accepted in params.items():
            vals = [a for a in accepted if a != ""]
            if vals:
                args.append(f"{k}={_show(vals[0])}")
        lines.append(f"{i}. {name}({', '.join(args)})")
    lines.append(f"{len(answers) + 1}. join()")
    return "\n".join(lines) + "\n" + END_MARKER


def latency_entries(n: int, min_calls: int = 3) -> list:
    from workbench.data import load_bfcl

    pool = [e for cat in ("parallel", "parallel_multiple") for e in load_bfcl(cat)
            if len(e.possible_answer) >= min_calls]
    return _spread(pool, n)


def export_entries(n: int, path: Path) -> None:
    """Write the latency requests as JSON, for a machine without the BFCL package (the GPU)."""
    rows = [{"id": e.id, "functions": e.functions, "possible_answer": e.possible_answer,
             "messages": e.messages} for e in latency_entries(n)]
    Path(path).write_text(json.dumps(rows))


def load_entries(path: Path) -> list:
    return [SimpleNamespace(**row) for row in json.loads(Path(path).read_text())]


def random_weights_backend(folder: Path, device: str = "cuda", static_cache: bool = False):
    """The embedded model's architecture and tokenizer with random bf16 weights: for timing the
    LLM steps on a GPU only (plans are teacher-forced, so the weights do not change the text;
    the joiner's answer is noise of the same length for both agents). static_cache: decode
    steps replayed from CUDA graphs (`LocalChat(static_cache=True)`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workbench.llm import LocalChat

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder),
                                             dtype=torch.bfloat16).to(device).eval()
    return LocalChat(model, tok, name="SmolLM2-135M architecture, random weights, "
                     + (torch.cuda.get_device_name(0) if str(device).startswith("cuda")
                        else "cpu")
                     + (", static cache + CUDA graphs" if static_cache else ""),
                     static_cache=static_cache)


def latency(n: int = 8, tool_latency: float = 2.0, backend=None, log=print,
            entries: list | None = None, prefix_cache: bool = True) -> dict:
    """Both agents on n BFCL requests with 3+ calls (see the module doc); seconds are wall time."""
    from workbench.llm import get_backend

    chat = get_backend(backend)
    cache = getattr(chat, "prefix_cache", None)
    if cache is not None:
        chat.prefix_cache = prefix_cache
    entries = entries if entries is not None else latency_entries(n)
    warmup = _warm_up(chat, entries[0]) if entries else 0.0
    rows = []
    load0 = os.getloadavg()
    for k, entry in enumerate(entries):
        box = bfcl_toolbox(entry.functions, tool_latency)
        plan_text = reference_plan(entry.possible_answer)
        question = entry.messages[-1]["content"]
        order = ("llmcompiler", "react") if k % 2 == 0 else ("react", "llmcompiler")
        runs = {}
        for name in order:
            if cache is not None:
                chat.clear_cache()       # no agent reuses the other's prefix
            runs[name] = _run_agent(name, chat, box, question, plan_text)
        compiler, react = runs["llmcompiler"], runs["react"]
        row = {"id": entry.id, "n_calls": len(entry.possible_answer), "plan": plan_text,
               "first": "llmcompiler" if k % 2 == 0 else "react"}
        for name, run in (("llmcompiler", compiler), ("react", react)):
            tl = run.timeline
            row[name] = {"seconds": round(run.seconds, 2), "llm_calls": len(run.llm_calls),
                         "llm_seconds": round(tl.busy("llm"), 2),
                         "tool_seconds": round(tl.busy("tool"), 2),
                         "prompt_tokens": sum(r.prompt_tokens or 0 for r in run.llm_calls),
                         "cached_tokens": sum(getattr(r, "cached_tokens", 0)
                                              for r in run.llm_calls),
                         "tools_ok": sum(r.ok for r in run.records.values()
                                         if not r.task.is_join),
                         "spans": tl.table()}
        row["speedup"] = round(react.seconds / compiler.seconds, 2)
        rows.append(row)
        log(f"{entry.id:26s} calls={row['n_calls']} compiler={compiler.seconds:.1f}s "
            f"react={react.seconds:.1f}s speedup={row['speedup']:.2f}x")
    speed = [r["speedup"] for r in rows]
    check = [replay(r, tool_latency) for r in rows]
    med = {name: round(statistics.median(r[name]["seconds"] for r in rows), 2)
           for name in ("llmcompiler", "react")}
    return {"benchmark": "latency", "model": chat.model_name, "tool_latency_s": tool_latency,
            "prefix_cache": bool(cache is not None and prefix_cache),
            "warmup_s": round(warmup, 2),
            "load_average": {"start": [round(x, 2) for x in load0],
                             "end": [round(x, 2) for x in os.getloadavg()]},
            "cpu_count": os.cpu_count(), "seconds_median": med,
            "n": len(rows), "speedup_median": round(statistics.median(speed), 2),
            "target_2_5x_met": statistics.median(speed) >= 2.5,
            "speedup_min": min(speed), "speedup_max": max(speed),
            "speedup_geomean": round(statistics.geometric_mean(speed), 2),
            "replay_check": {"measured": speed, "replayed": [round(c["speedup"], 2)
                                                             for c in check]},
            "sweep": sweep(rows), "rows": rows}


def _warm_up(chat, entry) -> float:
    """Run both agents once, untimed, on `entry` with instant tools: the first LLM calls pay
    one-time costs (kernel selection, a CUDA-graph capture) that no later request pays.
    Returns the seconds it took."""
    t0 = time.perf_counter()
    box = bfcl_toolbox(entry.functions, 0.0)
    plan_text = reference_plan(entry.possible_answer)
    for name in ("llmcompiler", "react"):
        if getattr(chat, "prefix_cache", None) is not None:
            chat.clear_cache()
        _run_agent(name, chat, box, entry.messages[-1]["content"], plan_text)
    if getattr(chat, "prefix_cache", None) is not None:
        chat.clear_cache()
    return time.perf_counter() - t0


def _run_agent(name: str, chat, box, question: str, plan_text: str):
    """One agent on one request, forced to write the reference plan (its lines for ReAct)."""
    from workbench.compiler.llm_compiler import LLMCompiler
    from workbench.compiler.react import ReAct

    if name == "llmcompiler":
        return LLMCompiler(chat, box, constrained=False, max_replans=0).run(
            question, forced_plan=plan_text)
    lines = plan_text.splitlines()[:-1]
    return ReAct(chat, box, constrained=False, max_steps=len(lines)).run(question, forced=lines)


def recorded_runs(row: dict) -> dict:
    """A latency row's two agents as objects the plan views draw (`compare_figure`): agent
    name, end-to-end seconds and the timeline, rebuilt from the saved spans."""
    from workbench.compiler.timeline import Timeline

    return {name: SimpleNamespace(agent="LLMCompiler" if name == "llmcompiler" else "ReAct",
                                  seconds=row[name]["seconds"],
                                  timeline=Timeline.from_table(row[name]["spans"]))
            for name in ("llmcompiler", "react")}


def replay(row: dict, tool_latency: float, llm_scale: float = 1.0) -> dict:
    """End-to-end seconds of both agents for another tool latency and LLM speed, replayed from
    the measured spans (LLM spans and planned-line times x llm_scale; tools take tool_latency;
    independent calls; unbounded concurrency). A model of the run, checked against real runs."""
    c = row["llmcompiler"]["spans"]
    planner_end = max(s["end"] for s in c if s["lane"] == "planner") * llm_scale
    joiner = sum(s["end"] - s["start"] for s in c if s["lane"] == "joiner") * llm_scale
    planned = [s["meta_planned"] * llm_scale for s in c if "meta_planned" in s]
    compiler = max([planner_end] + [p + tool_latency for p in planned]) + joiner
    r = row["react"]["spans"]
    llm = sum(s["end"] - s["start"] for s in r if s["kind"] == "llm") * llm_scale
    n_tools = sum(s["kind"] == "tool" for s in r)
    react = llm + n_tools * tool_latency
    return {"llmcompiler": compiler, "react": react, "speedup": react / compiler}


def replay_against(base: dict, other: dict) -> dict:
    """Check the replay out of sample: replay `base`'s rows at `other`'s tool latency and compare
    with `other`'s measured speedups (same requests, a separate run)."""
    by_id = {r["id"]: r for r in base["rows"]}
    pairs = [(r["speedup"], replay(by_id[r["id"]], other["tool_latency_s"])["speedup"])
             for r in other["rows"] if r["id"] in by_id]
    return {"tool_latency_s": other["tool_latency_s"], "n": len(pairs),
            "measured": [m for m, _ in pairs], "replayed": [round(p, 2) for _, p in pairs],
            "measured_median": round(statistics.median(m for m, _ in pairs), 2),
            "replayed_median": round(statistics.median(p for _, p in pairs), 2)}


def sweep(rows: list[dict], latencies=(0.5, 1, 2, 5, 10, 20), scales=(1.0, 0.1, 0.02)) -> list:
    """Median replayed speedup for each tool latency and LLM speed (1.0 = this machine)."""
    out = []
    for scale in scales:
        for t in latencies:
            sp = [replay(r, t, scale)["speedup"] for r in rows]
            out.append({"llm_time_scale": scale, "tool_latency_s": t,
                        "speedup_median": round(statistics.median(sp), 2),
                        "speedup_min": round(min(sp), 2)})
    return out


# ---------------------------------------------------------------------------------------------
# 3. NESTFUL sequences as DAGs

_NEST_REF = re.compile(r"^\$(var\d+)(?:\.([^$]+))?\$$")
LOCAL_FUNCTIONS = {
    "calculate_sales_tax": lambda amount, tax_rate: {"sales_tax": amount * tax_rate},
    "calculate_squared": lambda number: {"squared_number": number ** 2},
    "calculate_gross_salary": lambda basic_salary, allowance: {
        "gross_salary": basic_salary + allowance},
    "calculate_gcd": lambda num1, num2: {"gcd": __import__("math").gcd(int(num1), int(num2))},
    "calculate_discount": lambda original_price, discount_percentage: {
        "discount_amount": original_price * discount_percentage / 100},
    "calculate_tip": lambda bill_total, tip_percentage: {
        "tip_amount": bill_total * tip_percentage / 100},
    "calculate_profit": lambda revenue, expenses: {"profit": revenue - expenses},
    "calculate_BMI": lambda weight, height: {"BMI": weight / height ** 2},
    "calculate_interest": lambda principal_amount, interest_rate, time_period: {
        "interest_earned": principal_amount * interest_rate / 100 * time_period},
}


def nestful_dag(sample) -> tuple[dict[int, tuple], list[str]]:
    """Call index (1-based) -> indices it depends on, and problems (repeated/missing labels)."""
    index, problems = {}, []
    for i, c in enumerate(sample.calls, 1):
        if c.label in index:
            problems.append(f"label {c.label} repeats")
        index[c.label] = i
    deps = {}
    for i, c in enumerate(sample.calls, 1):
        ds = set()
        for r in c.references:
            if r.label in index and index[r.label] != i:
                ds.add(index[r.label])
            else:
                problems.append(f"call {i} refers to {r.label}, which is not an earlier call")
        deps[i] = tuple(sorted(ds))
    return deps, problems + check_dag(deps)


def dag_shape(deps: dict[int, tuple]) -> dict:
    """Depth (calls on the longest chain = critical path), width (most calls on one level)."""
    level: dict[int, int] = {}
    for i in sorted(deps):           # calls only refer to earlier calls in NESTFUL's order
        level[i] = 1 + max((level.get(d, 0) for d in deps[i] if d < i), default=0)
    depth = max(level.values(), default=0)
    width = max((list(level.values()).count(k) for k in range(1, depth + 1)), default=0)
    return {"calls": len(deps), "depth": depth, "width": width,
            "critical_path": depth, "ideal_speedup": round(len(deps) / depth, 2) if depth else 0}


def _nest_value(v, index):
    if isinstance(v, str):
        m = _NEST_REF.match(v)
        if m:
            return Ref(index[m.group(1)], m.group(2))
        if "$var" in v:
            raise ValueError("reference inside a longer string")
    if isinstance(v, list):
        return [_nest_value(x, index) for x in v]
    if isinstance(v, dict):
        return {k: _nest_value(x, index) for k, x in v.items()}
    return v


def run_nestful_locally(sample, latency_s: float = 0.0):
    """Execute a sample whose functions are all in LOCAL_FUNCTIONS through the TFU."""
    from workbench.compiler.executor import TaskFetchingUnit
    from workbench.compiler.parser import Task

    index = {c.label: i for i, c in enumerate(sample.calls, 1)}
    tools = {}
    for c in sample.calls:
        f = LOCAL_FUNCTIONS[c.name]

        def make(f=f, name=c.name):
            async def fn(**kw):
                await asyncio.sleep(latency_s)
                return f(**kw)
            fn.__name__ = name
            return fn
        tools[c.name] = Tool(c.name, "", [], make())
        tools[c.name].bind = lambda args, kwargs: dict(kwargs)   # NESTFUL args as given
    tasks = []
    for i, c in enumerate(sample.calls, 1):
        kwargs = _nest_value(c.arguments, index)
        deps = tuple(sorted({r.n for r in _refs(kwargs)}))
        tasks.append(Task(i, c.name, [], kwargs, deps, f"{i}. {c.name}(...)"))

    async def go():
        tfu = TaskFetchingUnit(Toolbox(tools.values()))
        for t in tasks:
            tfu.submit(t)
        return await tfu.wait()
    return asyncio.run(go())


def _refs(v):
    if isinstance(v, Ref):
        return [v]
    if isinstance(v, list):
        return [r for x in v for r in _refs(x)]
    if isinstance(v, dict):
        return [r for x in v.values() for r in _refs(x)]
    return []


def nestful(log=print) -> dict:
    from workbench.data import load_nestful

    rows = []
    for s in load_nestful("all"):
        deps, problems = nestful_dag(s)
        row = {"id": s.id, "split": s.split, **dag_shape(deps), "problems": problems}
        if all(c.name in LOCAL_FUNCTIONS for c in s.calls) and not problems:
            try:
                records = run_nestful_locally(s)
                row["executed"] = all(r.ok for r in records.values())
                row["outputs"] = {i: r.result if r.ok else r.observation_text()
                                  for i, r in records.items()}
            except ValueError as err:
                row["executed"] = f"not run: {err}"
        rows.append(row)
    summary = []
    for split in ("executable", "glaive", "sgd", "all"):
        sel = [r for r in rows if split in ("all", r["split"])]
        summary.append({
            "split": split, "samples": len(sel),
            "calls_mean": round(statistics.mean(r["calls"] for r in sel), 2),
            "depth_mean": round(statistics.mean(r["depth"] for r in sel), 2),
            "width_mean": round(statistics.mean(r["width"] for r in sel), 2),
            "with_parallelism": sum(r["width"] > 1 for r in sel),
            "ideal_speedup_mean": round(statistics.mean(r["ideal_speedup"] for r in sel), 2),
            "with_problems": sum(bool(r["problems"]) for r in sel),
            "executed_locally": sum(r.get("executed") is True for r in sel)})
    log(json.dumps(summary, indent=1))
    return {"benchmark": "nestful", "summary": summary, "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["planning", "latency", "nestful", "all", "export"])
    ap.add_argument("--n", type=int, default=None, help="requests per category / entries")
    ap.add_argument("--tool-latency", type=float, default=2.0, help="seconds per tool call")
    ap.add_argument("--backend", default=None, help="None: embedded model; or an endpoint URL")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--entries", type=Path, help="latency requests from `export` (no BFCL here)")
    ap.add_argument("--random-weights", type=Path,
                    help="folder with config + tokenizer: random-weight model on the GPU")
    ap.add_argument("--name", default="latency", help="result file: compiler_<name>.json")
    ap.add_argument("--max-tokens", type=int, default=200, help="planner token limit")
    ap.add_argument("--int8", action="store_true",
                    help="latency on this CPU with the embedded model's Linear layers in int8 "
                         "(~2.4x faster decode; the forced plans are the same)")
    ap.add_argument("--static-cache", action="store_true",
                    help="with --random-weights: decode steps replayed from CUDA graphs")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="latency: every LLM call prefills its whole prompt (both agents)")
    a = ap.parse_args(argv)
    if a.which == "export":
        export_entries(a.n or 8, a.out_dir / "latency_entries.json")
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.time()
    if a.which in ("nestful", "all"):
        print(write("nestful", nestful(), a.out_dir))
    if a.which in ("latency", "all"):
        backend = random_weights_backend(a.random_weights, static_cache=a.static_cache) \
            if a.random_weights else a.backend
        if a.int8:
            from workbench.llm import LocalChat
            from workbench.models import load_model, quantize_int8

            model, tok = load_model()
            backend = LocalChat(quantize_int8(model), tok,
                                name="SmolLM2-135M-Instruct, Linear layers int8 (dynamic)")
        entries = load_entries(a.entries) if a.entries else None
        res = latency(a.n or 8, a.tool_latency, backend, entries=entries,
                      prefix_cache=not a.no_prefix_cache)
        print(write(a.name, res, a.out_dir))
    if a.which in ("planning", "all"):
        print(write("planning", planning(a.n or 10, a.backend, a.max_tokens), a.out_dir))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
