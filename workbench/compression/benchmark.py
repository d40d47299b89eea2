"""Benchmark every compression method on real text at ratios 2x-20x: retention, reader accuracy,
summary ROUGE-L, achieved ratio and compressor time.

    python -m workbench.compression.benchmark --out benchmarks/results/compression.json
    python -m workbench.compression.benchmark --size quick --out /tmp/c.json   # minutes
    python -m workbench.compression.benchmark --size full --out benchmarks/results/compression_full.json

Each (item, method) is prepared once (model scoring that does not depend on the ratio) and then
compressed at every ratio; `compressor_s` is what one `compress()` call costs (prepare + select).
The local reader is the embedded SmolLM2-135M-Instruct (greedy); when WORKBENCH_OPENAI_BASE_URL
is set, an endpoint reader answers every item too (retention-only tasks included). Rows are
appended to `<out>.rows.jsonl` as they finish, so an interrupted run resumes where it stopped;
the JSON summary is rewritten after every item.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from workbench.compression.base import tokenize
from workbench.compression.methods import METHODS, get_compressor
from workbench.compression.tasks import SIZES, Item, build_items

RATIOS = (2.0, 5.0, 10.0, 20.0)
RETENTION_TASKS = ("needle", "passage_id", "similar_facts", "cloze")
FAMILIES = {"truncate": "baseline", "abstractive": "abstractive", "llmlingua": "token",
            "longllmlingua": "token", "none": "none"}


def family(method: str) -> str:
    return FAMILIES.get(method, "extractive")


def read_answer(chat, item: Item, context: str) -> dict:
    """The reader's reply to the item's question over `context`, scored."""
    reply = chat.chat(item.prompt(context), max_tokens=item.max_tokens,
                      stop=None if item.task == "summary" else ["\n"])
    return {"reply": reply.text[:300], "score": float(item.correct(reply.text)),
            "prompt_tokens": reply.prompt_tokens, "seconds": round(reply.seconds, 3)}


def compressions(item: Item, tokenizer, methods, ratios):
    """(method, ratio, result, compressor seconds) for one item: every method at every ratio,
    'none' once at ratio 1; a method's question-independent preparation is timed once and
    counted in each of its results."""
    tok = tokenize(tokenizer, item.context)
    for method in methods:
        comp = get_compressor(method)
        t0 = time.perf_counter()
        state = comp.prepare(tokenizer, tok, item.question)
        prep = time.perf_counter() - t0
        for ratio in ((1.0,) if method == "none" else ratios):
            res = comp.compress(tokenizer, item.context, item.question, ratio, state=state,
                                tok=tok)
            yield method, ratio, res, round(prep + res.seconds, 3)


def run_item(item: Item, tokenizer, methods, ratios, readers: dict, abstractive: bool):
    """All rows of one item: one per (method, ratio); 'none' once at ratio 1."""
    methods = [m for m in methods if abstractive or m != "abstractive"]
    for method, ratio, res, seconds in compressions(item, tokenizer, methods, ratios):
        row = {"task": item.task, "item": item.id, "method": method,
               "family": family(method), "ratio": ratio, **res.summary(),
               "compressor_s": seconds, "retention": float(item.retained(res.text)),
               "readers": {}}
        for name, chat in readers.items():
            if item.reader or name != "local":
                row["readers"][name] = read_answer(chat, item, res.text)
        yield row


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.fmean(xs), 4) if xs else None


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (task, method, ratio): means over items."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r["ratio"])].append(r)
    table = []
    for (task, method, ratio), rs in sorted(groups.items()):
        line = {"task": task, "method": method, "family": family(method), "ratio": ratio,
                "n": len(rs), "retention": _mean(r["retention"] for r in rs),
                "achieved_ratio": _mean(r["achieved_ratio"] for r in rs),
                "max_ratio_error": round(max(abs(r["achieved_ratio"] / r["requested_ratio"] - 1)
                                             for r in rs), 4),
                "compressor_s": _mean(r["compressor_s"] for r in rs)}
        for name in sorted({k for r in rs for k in r["readers"]}):
            line[f"{name}_score"] = _mean(r["readers"].get(name, {}).get("score") for r in rs)
        table.append(line)
    return table


def _best(table, tasks, key, fam, ratio=None):
    """Best method of a family by mean `key` over `tasks` (and ratios): (method, value)."""
    by_method = defaultdict(list)
    for t in table:
        if t["family"] == fam and t["task"] in tasks and (ratio is None or t["ratio"] == ratio):
            if t.get(key) is not None:
                by_method[t["method"]].append(t[key])
    if not by_method:
        return None, None
    method = max(by_method, key=lambda m: statistics.fmean(by_method[m]))
    return method, round(statistics.fmean(by_method[method]), 3)


def findings(table: list[dict]) -> dict:
    """The paper's claims checked against this run's numbers (best method of each family)."""
    out = {}
    for label, tasks, key in (("retention", RETENTION_TASKS, "retention"),
                              ("reader_qa", ("needle", "similar_facts"), "local_score"),
                              ("summary_rouge_l", ("summary",), "local_score")):
        fams = {f: _best(table, tasks, key, f) for f in ("extractive", "token", "abstractive",
                                                         "baseline")}
        out[label] = {f: {"method": m, "mean": v} for f, (m, v) in fams.items()}
    ret = out["retention"]
    ext, tok_, abs_ = (ret[f]["mean"] for f in ("extractive", "token", "abstractive"))
    summ = out["summary_rouge_l"]
    claims = {
        "extractive_best": ext is not None and all(v is None or ext >= v for v in (tok_, abs_)),
        "token_pruning_lags_extractive": None if tok_ is None or ext is None else tok_ < ext,
        "abstractive_marginal": None if abs_ is None or ext is None else abs_ <= ext,
        "abstractive_best_on_summary": None if summ["abstractive"]["mean"] is None else
        all(v["mean"] is None or summ["abstractive"]["mean"] >= v["mean"]
            for f, v in summ.items() if f != "abstractive"),
    }
    # does compression help the small reader on similar facts?
    full = [t for t in table if t["task"] == "similar_facts" and t["method"] == "none"]
    comp = [t for t in table if t["task"] == "similar_facts" and t["method"] != "none"
            and t.get("local_score") is not None]
    if full and comp and full[0].get("local_score") is not None:
        best = max(comp, key=lambda t: t["local_score"])
        claims["compression_helps_similar_facts"] = best["local_score"] > full[0]["local_score"]
        out["similar_facts"] = {"uncompressed": full[0]["local_score"], "best": best["method"],
                                "best_ratio": best["ratio"], "best_score": best["local_score"]}
    out["claims"] = claims
    return out


def environment() -> dict:
    from workbench.machine import machine_info

    return {**machine_info(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def run(out: Path, size: str = "small", methods=METHODS, ratios=RATIOS,
        abstractive_items: int = 1, log=print) -> dict:
    """Run (or resume) the benchmark; write `out` (JSON) and return its content."""
    from workbench.llm import LocalChat, OpenAIChat
    from workbench.models import load_model

    model, tokenizer = load_model()
    readers = {"local": LocalChat(model, tokenizer)}
    if os.environ.get("WORKBENCH_OPENAI_BASE_URL"):
        readers["endpoint"] = OpenAIChat()
    items = build_items(tokenizer, size)
    rows_path = out.with_suffix(".rows.jsonl")
    if rows_path.exists():
        rows = [json.loads(x) for x in rows_path.read_text().splitlines()]
    elif out.exists():  # resume from the committed JSON's rows
        rows = json.loads(out.read_text()).get("rows", [])
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        rows = []
    ids = {i.id for i in items}
    rows = [r for r in rows if r["item"] in ids]  # rows of another size's items are not ours
    done = {(r["item"], r["method"], r["ratio"]) for r in rows}
    per_task = defaultdict(int)
    out.parent.mkdir(parents=True, exist_ok=True)
    for item in items:
        per_task[item.task] += 1
        todo = [m for m in methods if any((item.id, m, r) not in done
                                          for r in ((1.0,) if m == "none" else ratios))]
        t0 = time.perf_counter()
        with rows_path.open("a") as f:
            for row in run_item(item, tokenizer, todo, ratios, readers,
                                abstractive=per_task[item.task] <= abstractive_items):
                if (row["item"], row["method"], row["ratio"]) in done:
                    continue
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
        log(f"{item.id}: {time.perf_counter() - t0:.0f} s")
        result = write(out, rows, items, methods, ratios, size, abstractive_items, readers)
    return result


def write(out, rows, items, methods, ratios, size, abstractive_items, readers) -> dict:
    table = summarize(rows)
    result = {
        "benchmark": "prompt compression (workbench.compression.benchmark)",
        "environment": environment(),
        "config": {"size": size, "methods": list(methods), "ratios": list(ratios),
                   "abstractive_items_per_task": abstractive_items,
                   "readers": {k: v.model_name for k, v in readers.items()},
                   "items": [{"id": i.id, "task": i.task, "reader": i.reader, **i.meta}
                             for i in items]},
        "table": table,
        "findings": findings(table),
        "rows": rows,
    }
    result["complete"] = {i.id for i in items} <= {r["item"] for r in rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compression.json"))
    parser.add_argument("--size", default="small", choices=SIZES,
                        help="quick: 4 short items; small: 6 items (default); full: 18 items")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--abstractive-items", type=int, default=1,
                        help="items per task that the (slow) abstractive method runs on")
    args = parser.parse_args(argv)
    result = run(args.out, args.size, args.methods, args.ratios, args.abstractive_items)
    print(json.dumps(result["findings"], indent=1))


if __name__ == "__main__":
    main()


def statement(result: dict, study: dict | None = None) -> str:
    """The paper's finding, restated from this run's numbers (a few sentences). With `study`
    (the JSON of `workbench.compression.reader_study`), whether compression helps the small
    reader is answered from that paired study instead of this run's one or two items."""
    f, c = result["findings"], result["findings"]["claims"]
    ret = f["retention"]
    parts = []

    def fam(name):
        return f"{name} (best: {ret[name]['method']}, {ret[name]['mean']:.2f})"

    if ret["extractive"]["mean"] is not None:
        others = [fam(x) for x in ("token", "abstractive", "baseline") if ret[x]["mean"] is not None]
        parts.append(f"Mean retention over ratios 2-20x: extractive {ret['extractive']['mean']:.2f} "
                     f"(best: {ret['extractive']['method']}) vs " + ", ".join(others) + ".")
    parts.append("Extractive best: " + ("holds" if c["extractive_best"] else "does not hold") + ".")
    if c["token_pruning_lags_extractive"] is not None:
        parts.append("Token pruning lags extractive: "
                     + ("holds" if c["token_pruning_lags_extractive"] else "does not hold") + ".")
    if c["abstractive_marginal"] is not None:
        parts.append("Abstractive no better than extractive on QA retention: "
                     + ("holds" if c["abstractive_marginal"] else "does not hold") + ".")
    qa = f["reader_qa"]
    if qa["extractive"]["mean"] is not None:
        parts.append("Reader accuracy on needle/similar facts (mean over ratios): "
                     + ", ".join(f"{k} {v['mean']:.2f}" for k, v in qa.items()
                                 if v["mean"] is not None) + ".")
    s = f.get("similar_facts")
    if study is not None:
        from workbench.compression.reader_study import study_statement

        parts.append(study_statement(study))
    elif s:
        parts.append(f"Similar facts: uncompressed {s['uncompressed']:.2f}, best compressed "
                     f"{s['best_score']:.2f} ({s['best']} at {s['best_ratio']:g}x): compression "
                     + ("helps" if c.get("compression_helps_similar_facts") else "does not help")
                     + " the small reader here.")
    summ = f["summary_rouge_l"]
    if summ["extractive"]["mean"] is not None:
        parts.append("Summary ROUGE-L F1: " + ", ".join(
            f"{k} {v['mean']:.3f}" for k, v in summ.items() if v["mean"] is not None) + ".")
    if not result.get("complete", True):
        parts.append("(Partial run: not every item finished; see n per cell.)")
    return " ".join(parts)
