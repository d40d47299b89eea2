"""Quality of squeezed attention vs KV budget on real long text, against baselines.

    python -m workbench.squeezed.evaluate                      # writes
        benchmarks/results/squeezed_quality.json (3 contexts of 3,584 tokens, ~1 h on 2 busy cores)
    python -m workbench.squeezed.evaluate --tasks 1 --context-len 1024 --out /tmp  # quick look

For each task (see `workbench.squeezed.tasks`) the fixed context is prefilled once (dense) and
its cache is reused, copied, for every user input, as in the paper's setting. Three measures:

- continuation perplexity: the real next `continuation_len` tokens as the user input (one
  prefill call: selection per block of queries), perplexity of those tokens;
- facts: for each fact placed far back in the context, the question as user input and a
  greedy completion by `model.generate` (prefill + decode inside the context manager), checked
  by substring;
- recall: lines of the real text from 5-75% deep, repeated as the user input and continued by
  greedy decoding, checked token by token (`tasks.recall_items`; only lines the model cannot
  continue without the context).

Every row also records the spend: the fraction of the context's keys actually attended (sink
and observation window included), for each measure. Methods at each budget: squeezed one-level
and hierarchical (default: keys chosen per user token, 15% centroids, allocation "layer", which
spends exactly the budget), the paper's uncapped threshold (`squeezed-threshold`, whose spend
drifts), one key set per input (`squeezed-input`), and the baselines of
`workbench.squeezed.selectors` (StreamingLLM-like, Quest-like, random, oracle) at the same
granularity, each spending floor(budget * n) keys. Budget 1 is dense.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.squeezed.attention import squeezed_attention
from workbench.squeezed.capture import cache_kwargs, capture_context
from workbench.squeezed.index import build_index
from workbench.squeezed.selectors import (
    OracleSelector,
    QuestSelector,
    RandomSelector,
    StreamingSelector,
)
from workbench.squeezed.tasks import QualityTask, Recall, make_tasks, recall_items

BUDGETS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
METHODS = ("squeezed", "squeezed-hier", "squeezed-threshold", "squeezed-input", "squeezed-max",
           "streaming", "quest", "random", "oracle")
DEFAULT_METHODS = ("squeezed", "squeezed-hier", "squeezed-threshold", "streaming", "quest",
                   "random", "oracle")
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def method_context(model, method: str, index, budget: float, context_ids,
                   block_size: int | None = 1, allocation: str = "layer", vote: str = "max",
                   coarse_factor: float = 3.0):
    """The `squeezed_attention` context manager for a method name at a budget.

    squeezed / squeezed-hier: one-level / hierarchical lookup with `allocation` (see
    `SqueezedSelector`); squeezed-threshold: the paper's uncapped global threshold (its spend
    drifts from the budget; shown for that); squeezed-input: one key set per user input;
    squeezed-max: one level with vote="max" whatever `vote` says (the same as "squeezed" under
    the default vote; kept as the label of squeezed_quality_vote_max.json's rows, measured
    while the default was still the mean). vote: how the other squeezed methods' query rows
    combine their estimates ("max", the default, or the paper's "mean"). coarse_factor:
    squeezed-hier's coarse margin (`SqueezedSelector`)."""
    ns, win = index.n_sink, index.window
    if method == "squeezed":
        return squeezed_attention(model, index, budget, block_size=block_size,
                                  allocation=allocation, vote=vote)
    if method == "squeezed-hier":
        return squeezed_attention(model, index, budget, hierarchical=True, block_size=block_size,
                                  allocation=allocation, vote=vote, coarse_factor=coarse_factor)
    if method == "squeezed-threshold":
        return squeezed_attention(model, index, budget, block_size=block_size,
                                  allocation="threshold", vote=vote)
    if method == "squeezed-input":
        return squeezed_attention(model, index, budget, block_size=None, allocation=allocation,
                                  vote=vote)
    if method == "squeezed-max":
        return squeezed_attention(model, index, budget, block_size=block_size,
                                  allocation=allocation, vote="max")
    selectors = {
        "streaming": lambda: StreamingSelector(budget, n_sink=ns, block_size=block_size),
        "quest": lambda: QuestSelector(budget, n_sink=ns, window=win, block_size=block_size),
        "random": lambda: RandomSelector(budget, n_sink=ns, window=win, block_size=block_size),
        "oracle": lambda: OracleSelector(budget, n_sink=ns, window=win, block_size=block_size),
    }
    if method not in selectors:
        raise WorkbenchError(f"Unknown method {method!r}; use one of {METHODS}.")
    return squeezed_attention(model, selectors[method](), context_ids=context_ids)


@torch.no_grad()
def continuation_nll(model, cache, task: QualityTask, ctx) -> tuple[float, float]:
    """Mean negative log-likelihood (nats) of the continuation given the cached context, and the
    kept fraction, with the method's context manager `ctx` active."""
    device = next(model.parameters()).device
    cont = task.continuation_ids.to(device)
    ids = torch.cat([task.context_ids.to(device), cont])[None]
    with ctx as state:
        out = model(ids[:, task.context_ids.numel():], use_cache=True,
                    **cache_kwargs(model, copy.deepcopy(cache)))
    logits = out.logits[0].float()                                          # (u, vocab)
    # the first continuation token is predicted by the context's last position, which the dense
    # cache prefill computed (the same for every method): score the other u - 1 tokens
    targets = cont[1:]
    nll = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum")
    return float(nll) / targets.numel(), state.kept_fraction()


@torch.no_grad()
def answer(model, tokenizer, cache, task: QualityTask, fact, ctx, max_new_tokens: int = 8):
    """Greedy completion of the question about `fact`; returns (text, correct, kept)."""
    q = task.question_ids(tokenizer, fact)
    text, new, kept = _generate(model, tokenizer, cache, task, q, ctx, max_new_tokens)
    return text, fact.answer.lower() in text.lower(), kept


@torch.no_grad()
def recall(model, tokenizer, cache, task: QualityTask, item: Recall, ctx):
    """Greedy continuation of a recall item's prefix; correct when its first tokens are the
    ones that follow the prefix in the context. Returns (text, correct, kept)."""
    n = item.answer_ids.numel()
    text, new, kept = _generate(model, tokenizer, cache, task, item.user_ids(tokenizer), ctx, n)
    return text, new[:n].tolist() == item.answer_ids.tolist(), kept


def _generate(model, tokenizer, cache, task, user_ids, ctx, max_new_tokens):
    device = next(model.parameters()).device
    ids = torch.cat([task.context_ids.to(device), user_ids.to(device)])[None]
    with ctx as state:
        out = model.generate(ids, **cache_kwargs(model, copy.deepcopy(cache)), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].cpu()
    return tokenizer.decode(new, skip_special_tokens=True), new, state.kept_fraction()


def evaluate_task(model, tokenizer, task: QualityTask, budgets=BUDGETS, methods=DEFAULT_METHODS,
                  block_size: int | None = 1, window: int = 64, log=print,
                  centroid_ratio: float = 0.15, allocation: str = "layer",
                  n_recall: int = 12, vote: str = "max", outlier_ratio: float = 0.0,
                  coarse_factor: float = 3.0) -> dict:
    """Every method at every budget on one task. Returns {"task", "build_s", "recall", "rows"}.

    Per row: perplexity of the continuation, facts answered, recall items continued, and the
    fraction of the context's keys each part actually kept (`kept_*`: mean over layers, KV
    heads, query blocks and calls, sink and window included)."""
    t0 = time.perf_counter()
    cap = capture_context(model, task.context_ids, window=window)
    index = build_index(model, capture=cap, window=window, centroid_ratio=centroid_ratio,
                        outlier_ratio=outlier_ratio)
    build_s = time.perf_counter() - t0
    items = recall_items(model, tokenizer, task, n_recall) if n_recall else []
    log(f"{task.name}: prefill + clustering {build_s:.0f} s, {len(items)} recall items")
    rows = []
    for budget in budgets:
        for method in (methods if budget < 1 else ("dense",)):
            t1 = time.perf_counter()
            name = "squeezed" if method == "dense" else method

            def ctx(name=name, budget=budget):
                return method_context(model, name, index, budget, task.context_ids, block_size,
                                      allocation, vote, coarse_factor)

            nll, kept = continuation_nll(model, cap.cache, task, ctx())
            answers = []
            for fact in task.facts:
                text, ok, kept_q = answer(model, tokenizer, cap.cache, task, fact, ctx())
                answers.append({"answer": fact.answer, "got": text, "correct": ok,
                                "kept": kept_q})
            recalled = []
            for item in items:
                text, ok, kept_r = recall(model, tokenizer, cap.cache, task, item, ctx())
                recalled.append({"answer": item.answer, "got": text, "correct": ok,
                                 "kept": kept_r, "position": item.position})
            row = {"task": task.name, "method": method, "budget": budget, "nll": nll,
                   "ppl": math.exp(nll), "kept_continuation": kept,
                   "kept_questions": sum(a["kept"] for a in answers) / len(answers),
                   "correct": sum(a["correct"] for a in answers), "questions": len(answers),
                   "recall_correct": sum(a["correct"] for a in recalled),
                   "recall_items": len(recalled),
                   "kept_recall": (sum(a["kept"] for a in recalled) / len(recalled)
                                   if recalled else float("nan")),
                   "answers": answers, "recall": recalled,
                   "seconds": time.perf_counter() - t1}
            rows.append(row)
            log(f"  {method:18s} budget {budget:.4g}: ppl {row['ppl']:.3f} kept "
                f"{kept:.3f}/{row['kept_questions']:.3f}/{row['kept_recall']:.3f} questions "
                f"{row['correct']}/{row['questions']} recall {row['recall_correct']}/"
                f"{row['recall_items']} ({row['seconds']:.0f} s)")
    return {"task": task.name, "build_s": build_s, "rows": rows,
            "recall": [{"position": r.position, "prefix": tokenizer.decode(r.prefix_ids),
                        "answer": r.answer} for r in items]}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, budget): perplexity from the mean nll over tasks, its change vs dense in %,
    facts and recall items answered, and the measured spend: mean kept fraction of the
    context's keys for the continuation, the questions and the recall items, and their max."""
    dense = [r for r in rows if r["method"] == "dense"]      # budget 1 (absent: change None)
    dense_nll = sum(r["nll"] for r in dense) / len(dense) if dense else None
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        nll = sum(r["nll"] for r in rs) / len(rs)
        kept = {k: sum(r[k] for r in rs) / len(rs) for k in
                ("kept_continuation", "kept_questions", "kept_recall") if k in rs[0]}
        out.append({"method": method, "budget": budget, "ppl": math.exp(nll),
                    "ppl_change_pct": None if dense_nll is None
                    else 100 * (math.exp(nll - dense_nll) - 1),
                    "correct": sum(r["correct"] for r in rs),
                    "questions": sum(r["questions"] for r in rs),
                    "recall_correct": sum(r.get("recall_correct", 0) for r in rs),
                    "recall_items": sum(r.get("recall_items", 0) for r in rs),
                    **kept, "kept_max": max(v for v in kept.values() if v == v)})
    return sorted(out, key=lambda r: (-r["budget"], METHODS.index(r["method"])
                                      if r["method"] in METHODS else -1))


def _pct(x: float | None) -> str:
    return f"{'n/a':>9s}" if x is None else f"{x:+8.2f}%"


def items_right(r: dict) -> tuple[int, int]:
    """(right, asked) over the far-back items of a summary row: facts plus recall items."""
    return (r["correct"] + r.get("recall_correct", 0),
            r["questions"] + r.get("recall_items", 0))


def item_outcomes(row: dict) -> list[bool]:
    """Right/wrong of every far-back item of one result row (facts, then recall items)."""
    return [bool(a["correct"]) for a in row.get("answers", [])] \
        + [bool(a["correct"]) for a in row.get("recall", [])]


def paired_items(rows: list[dict], method: str, budget: float) -> dict:
    """`method` at `budget` against dense on the same far-back items (all tasks), as
    `workbench.stats.paired`: right->wrong and wrong->right flips, exact McNemar p."""
    from workbench.stats import paired

    by = {(r["task"], r["method"], r["budget"]): r for r in rows}
    base, other = [], []
    for task in dict.fromkeys(r["task"] for r in rows):
        if (task, method, budget) in by and (task, "dense", 1.0) in by:
            base += item_outcomes(by[(task, "dense", 1.0)])
            other += item_outcomes(by[(task, method, budget)])
    return {"method": method, "budget": budget, "items": len(base), **paired(base, other)}


def check_targets(summary: list[dict], method: str = "squeezed") -> list[dict]:
    """The issue's quality targets for `method`, each {"target", "value", "met"}, from a summary:
    at 1/4 perplexity within 1% of dense and far-back items equal to dense (facts, and facts +
    recall), at 1/8 within 2%, better perplexity and items than StreamingLLM-like and Quest-like
    at every budget <= 1/4, and a spend (kept, max over the measures) within the budget."""
    by = {(r["method"], r["budget"]): r for r in summary}
    dense = by[("dense", 1.0)]
    out = []

    def add(target, value, met):
        out.append({"method": method, "target": target, "value": value, "met": bool(met)})

    for budget, limit in ((0.25, 1.0), (0.125, 2.0)):
        r = by.get((method, budget))
        if r is not None:
            add(f"ppl within {limit:g}% of dense at 1/{round(1 / budget)}",
                f"{r['ppl_change_pct']:+.2f}%", r["ppl_change_pct"] <= limit)
    r = by.get((method, 0.25))
    if r is not None:
        add("facts equal to dense at 1/4", f"{r['correct']}/{r['questions']} vs "
            f"{dense['correct']}/{dense['questions']}", r["correct"] >= dense["correct"])
        (a, n), (da, dn) = items_right(r), items_right(dense)
        add("facts + recall equal to dense at 1/4", f"{a}/{n} vs {da}/{dn}", a >= da)
    for budget in sorted({b for m, b in by if m == method and b <= 0.25}, reverse=True):
        r = by[(method, budget)]
        rivals = [by[(m, budget)] for m in ("streaming", "quest") if (m, budget) in by]
        if not rivals:
            continue
        best = min(x["ppl"] for x in rivals)
        add(f"ppl better than streaming and quest at 1/{round(1 / budget)}",
            f"{r['ppl']:.3f} vs {best:.3f}", r["ppl"] < best)
        best_items = max(items_right(x)[0] for x in rivals)
        add(f"items better than streaming and quest at 1/{round(1 / budget)}",
            f"{items_right(r)[0]} vs {best_items}", items_right(r)[0] > best_items)
    spends = [(x["budget"], x["kept_max"]) for x in summary
              if x["method"] == method and "kept_max" in x]
    if spends:
        worst = max(k - b for b, k in spends)
        add("spend within the budget at every budget", f"max kept - budget {worst:+.4f}",
            worst <= 1e-6)
    return out


def format_summary(summary: list[dict]) -> str:
    """A text table: perplexity, its change, facts, recall items, and the kept fraction
    (continuation / questions / recall) next to the budget."""
    lines = [f"{'method':18s} {'budget':>7s} {'ppl':>8s} {'vs dense':>9s} {'facts':>7s} "
             f"{'recall':>7s} {'kept (cont/facts/recall)':>25s}"]
    for r in summary:
        kept = "/".join(f"{r[k]:.3f}" for k in ("kept_continuation", "kept_questions",
                                                  "kept_recall") if k in r)
        lines.append(f"{r['method']:18s} {r['budget']:7.4f} {r['ppl']:8.3f} "
                     f"{_pct(r['ppl_change_pct'])} {r['correct']:3d}/{r['questions']:<3d} "
                     f"{r.get('recall_correct', 0):3d}/{r.get('recall_items', 0):<3d} "
                     f"{kept:>25s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--skip", type=int, default=0,
                        help="evaluate only the tasks after the first SKIP (the same texts and "
                             "facts as in a run of all --tasks): more contexts for a run made "
                             "before")
    parser.add_argument("--context-len", type=int, default=3584)
    parser.add_argument("--continuation-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=1,
                        help="user queries per selection block (0: one set per input)")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--centroid-ratio", type=float, default=0.15,
                        help="fine centroids per clustered key (the paper: ~0.05)")
    parser.add_argument("--vote", default="max", choices=("mean", "max"),
                        help="how a KV head's query heads combine their estimates (squeezed "
                             "methods)")
    parser.add_argument("--outlier-ratio", type=float, default=0.0,
                        help="share of the clustered keys kept as singleton clusters (those "
                             "that fit their cluster worst; build_index's outlier_ratio)")
    parser.add_argument("--coarse-factor", type=float, default=3.0,
                        help="squeezed-hier: the coarse level keeps about this many times the "
                             "budget's keys")
    parser.add_argument("--allocation", default="layer",
                        help="how squeezed shares out the budget (see SqueezedSelector)")
    parser.add_argument("--recall", type=int, default=12, help="recall items per context")
    parser.add_argument("--budgets", default="1,1/2,1/4,1/8,1/16")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the JSON")
    parser.add_argument("--name", default="squeezed_quality")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    from benchmarks.harness import environment
    from workbench.models import describe, load_model

    model, tokenizer = load_model()
    budgets = [float(Fraction(b)) for b in args.budgets.split(",")]  # "1/8" -> 0.125
    methods = tuple(m for m in args.methods.split(",") if m)
    tasks = make_tasks(tokenizer, args.tasks, args.context_len, args.continuation_len)[args.skip:]
    started = time.perf_counter()
    block = args.block_size or None
    results = [evaluate_task(model, tokenizer, t, budgets, methods, block, args.window,
                             centroid_ratio=args.centroid_ratio, allocation=args.allocation,
                             n_recall=args.recall, vote=args.vote,
                             outlier_ratio=args.outlier_ratio,
                             coarse_factor=args.coarse_factor) for t in tasks]
    rows = [r for res in results for r in res["rows"]]
    summary = summarize(rows)
    print(format_summary(summary))
    payload = {
        "name": args.name,
        "environment": environment("cpu"),
        "model": {k: v for k, v in describe(model).items() if k != "device"},
        "setup": {"tasks": [t.name for t in tasks], "context_len": args.context_len,
                  "continuation_len": args.continuation_len, "block_size": block,
                  "window": args.window, "n_sink": 4, "centroid_ratio": args.centroid_ratio,
                  "coarse_ratio": 0.125, "coarse_factor": args.coarse_factor,
                  "allocation": args.allocation, "vote": args.vote,
                  "outlier_ratio": args.outlier_ratio,
                  "facts_per_task": len(tasks[0].facts),
                  "recall_items": [len(r["recall"]) for r in results],
                  "kept": "fraction of the context's keys attended, mean over layers, KV heads, "
                          "query blocks and calls; sink and observation window included",
                  "text": "pydoc_data.topics (Python language reference), facts spliced in"},
        "recall": {r["task"]: r["recall"] for r in results},
        "summary": summary,
        "rows": rows,
        "build_s": [r["build_s"] for r in results],
        "seconds": time.perf_counter() - started,
    }
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
