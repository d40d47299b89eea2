"""Does compression *help* the small reader? A paired study on the similar-facts task.

    python -m workbench.compression.reader_study --items 20 --tokens 1024 \
        --out benchmarks/results/compression_reader_study.json

Each item is real text from Python's language reference (a different starting topic per item)
with five facts of the same form inserted ("The access code for the blue vault is 48213.", five
colours, five codes); the question asks for one of them. The 135M reader latches onto one of
several similar facts, so its uncompressed accuracy is well below 100% at a few thousand tokens;
a question-aware compressor that drops most of the text (and, ideally, the other facts) may
raise it. Every item is read uncompressed and under every (method, ratio), so the comparison is
paired: per cell, how many items flip right->wrong and wrong->right against the uncompressed
reading, with an exact two-sided McNemar (sign) test on the discordant items. Accuracies carry a
95% Wilson interval. Rows are appended to `<out>.rows.jsonl` as they finish (resumable).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from workbench.compression.tasks import COLORS, Item
from workbench.stats import paired, sign_test_p, wilson  # noqa: F401 (re-exported)

METHODS = ("none", "sentence-bm25", "sentence-minilm", "longllmlingua")
RATIOS = (2.0, 5.0, 10.0)
SLOW = ("longllmlingua",)    # ~130 s per 1K-token item at 3 ratios on the shared 2-core CPU


# ---------------------------------------------------------------- bookkeeping (no model)

def summarize(rows: list[dict]) -> dict:
    """Accuracy (k/n, Wilson 95%) per (method, ratio) and paired flips against 'none'. Each cell
    counts the items that have both that cell and the uncompressed reading (a slow method may
    cover fewer items than the others; its flips are still paired item by item)."""
    cells = sorted({(r["method"], r["ratio"]) for r in rows}, key=lambda c: (c[0] != "none", c))
    by_item: dict[str, dict] = {}
    for r in rows:
        by_item.setdefault(r["item"], {})[(r["method"], r["ratio"])] = r
    base_cell = ("none", 1.0)
    table = []
    for method, ratio in cells:
        items = sorted(i for i, c in by_item.items() if (method, ratio) in c
                       and (base_cell in c or base_cell not in cells))
        rs = [by_item[i][(method, ratio)] for i in items]
        ok = [bool(r["correct"]) for r in rs]
        k, n = sum(ok), len(ok)
        lo, hi = wilson(k, n)
        kept = [bool(r["retention"]) for r in rs]
        ok_kept = [o for o, t in zip(ok, kept, strict=True) if t]
        line = {"method": method, "ratio": ratio, "k": k, "n": n,
                "accuracy": round(k / n, 4) if n else None,
                "wilson95": [round(lo, 4), round(hi, 4)],
                "retained": sum(kept),
                "correct_when_retained": f"{sum(ok_kept)}/{len(ok_kept)}",
                "achieved_ratio": round(sum(r["achieved_ratio"] for r in rs) / n, 3) if n
                else None,
                "compressor_s": round(sum(r["compressor_s"] for r in rs) / n, 2) if n else None,
                "reader_s": round(sum(r["reader_s"] for r in rs) / n, 2) if n else None}
        if base_cell in cells and (method, ratio) != base_cell:
            base = [bool(by_item[i][base_cell]["correct"]) for i in items]
            line["vs_none"] = paired(base, ok)
            line["none_on_same_items"] = f"{sum(base)}/{len(base)}"
        table.append(line)
    return {"items": sorted(by_item), "table": table}


def conclusion(summary: dict, alpha: float = 0.05) -> dict:
    """Which cells beat / lose to the uncompressed reader (exact McNemar p < alpha)."""
    table = summary["table"]
    base = next((t for t in table if t["method"] == "none"), None)
    comp = [t for t in table if "vs_none" in t]
    if base is None or not comp:
        return {}
    best = max(comp, key=lambda t: (t["k"], -t["ratio"]))
    return {
        "uncompressed": f"{base['k']}/{base['n']}",
        "best": {"method": best["method"], "ratio": best["ratio"],
                 "k": best["k"], "n": best["n"], **best["vs_none"]},
        "significantly_better": [f"{t['method']}@{t['ratio']:g}x" for t in comp
                                 if t["vs_none"]["net"] > 0 and t["vs_none"]["mcnemar_p"] < alpha],
        "significantly_worse": [f"{t['method']}@{t['ratio']:g}x" for t in comp
                                if t["vs_none"]["net"] < 0 and t["vs_none"]["mcnemar_p"] < alpha],
        "alpha": alpha,
    }


# ---------------------------------------------------------------- items (real text)

def study_items(tokenizer, count: int = 20, n_tokens: int = 1024, seed: int = 7,
                min_chars: int = 3000) -> list[Item]:
    """`count` similar-facts items, item k starting at the k-th long topic (sorted by name) of
    the language reference and filled up to `n_tokens` with the topics after it."""
    from workbench.compression.tasks import _body, _cut, _insert, _topics

    topics = _topics()
    names = [n for n in sorted(topics) if len(_body(topics[n])) >= min_chars]
    rng = random.Random(seed)
    items = []
    for k in range(count):
        chosen = [names[(k + j) % len(names)] for j in range(4)]
        text = _cut(tokenizer, "\n\n".join(_body(topics[n]) for n in chosen), n_tokens)
        colors = rng.sample(COLORS, 5)
        codes = rng.sample(range(10000, 99999), 5)
        facts = [f"The access code for the {c} vault is {v}." for c, v in
                 zip(colors, codes, strict=True)]
        context = _insert(text, facts, rng)
        ask = rng.randrange(5)
        items.append(Item("similar_facts", f"study-{n_tokens}-{k}", context,
                          f"What is the access code for the {colors[ask]} vault?",
                          str(codes[ask]), meta={"docs": chosen[:2], "asked": ask}))
    return items


# ---------------------------------------------------------------- the run

def run_item(item: Item, tokenizer, chat, methods, ratios):
    """Rows of one item: 'none' once, every other method at every ratio."""
    from workbench.compression.benchmark import compressions, read_answer

    for method, ratio, res, seconds in compressions(item, tokenizer, methods, ratios):
        ans = read_answer(chat, item, res.text)
        yield {"item": item.id, "method": method, "ratio": ratio,
               "achieved_ratio": round(res.achieved_ratio, 4),
               "tokens": res.summary().get("compressed_tokens"), "compressor_s": seconds,
               "retention": bool(item.retained(res.text)), "reply": ans["reply"],
               "correct": bool(ans["score"]), "reader_s": ans["seconds"]}


def plan(items, methods, ratios, slow=SLOW, slow_items: int | None = None, slow_ratios=None):
    """The (item, method, ratios) passes in run order: every fast method on every item first,
    then the slow methods on the first `slow_items` items at `slow_ratios` (so an interrupted
    run still holds the complete fast comparison)."""
    fast = [m for m in methods if m not in slow]
    slow_m = [m for m in methods if m in slow]
    passes = [(it, fast, tuple(ratios)) for it in items]
    n = len(items) if slow_items is None else min(slow_items, len(items))
    sr = tuple(ratios if slow_ratios is None else slow_ratios)
    passes += [(it, slow_m, sr) for it in items[:n]] if slow_m else []
    return passes


def run(out: Path, count: int = 20, n_tokens: int = 1024, methods=METHODS, ratios=RATIOS,
        seed: int = 7, slow_items: int | None = None, slow_ratios=None, log=print) -> dict:
    """Run (or resume) the study; write `out` after every pass and return its content."""
    from workbench.compression.benchmark import environment
    from workbench.llm import LocalChat
    from workbench.models import load_model

    model, tokenizer = load_model()
    chat = LocalChat(model, tokenizer)
    items = study_items(tokenizer, count, n_tokens, seed)
    passes = plan(items, methods, ratios, SLOW, slow_items, slow_ratios)
    wanted = {(it.id, m, r) for it, ms, rs in passes for m in ms
              for r in ((1.0,) if m == "none" else rs)}
    rows_path = out.with_suffix(".rows.jsonl")
    rows = ([json.loads(x) for x in rows_path.read_text().splitlines()]
            if rows_path.exists() else [])
    rows = [r for r in rows if (r["item"], r["method"], r["ratio"]) in wanted]
    done = {(r["item"], r["method"], r["ratio"]) for r in rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"items": count, "n_tokens": n_tokens, "seed": seed, "methods": list(methods),
              "ratios": list(ratios), "slow_methods": sorted(set(SLOW) & set(methods)),
              "slow_items": slow_items, "slow_ratios": list(slow_ratios or ratios),
              "reader": chat.model_name, "facts_per_item": 5,
              "item_meta": [{"id": i.id, **i.meta} for i in items]}
    result = {}
    for item, ms, rs in passes:
        todo = [m for m in ms if any((item.id, m, r) not in done
                                     for r in ((1.0,) if m == "none" else rs))]
        t0 = time.perf_counter()
        with rows_path.open("a") as f:
            for row in run_item(item, tokenizer, chat, todo, rs):
                if (row["item"], row["method"], row["ratio"]) in done:
                    continue
                rows.append(row)
                done.add((row["item"], row["method"], row["ratio"]))
                f.write(json.dumps(row) + "\n")
                f.flush()
        if todo:
            log(f"{item.id} {'+'.join(todo)}: {time.perf_counter() - t0:.0f} s")
        summary = summarize(rows)
        result = {"study": "similar-facts reader study (workbench.compression.reader_study)",
                  "environment": environment(), "config": config, **summary,
                  "conclusion": conclusion(summary), "rows": rows,
                  "complete": wanted <= done}
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/compression_reader_study.json"))
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=1024, help="context length in tokens")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--slow-items", type=int, default=None,
                        help=f"run the slow methods {SLOW} on the first N items only")
    parser.add_argument("--slow-ratios", nargs="+", type=float, default=None,
                        help="ratios for the slow methods (default: --ratios)")
    args = parser.parse_args(argv)
    result = run(args.out, args.items, args.tokens, args.methods, args.ratios, args.seed,
                 args.slow_items, args.slow_ratios)
    print(json.dumps({"table": result.get("table"), "conclusion": result.get("conclusion")},
                     indent=1))


if __name__ == "__main__":
    main()


def study_statement(study: dict) -> str:
    """The study's answer in a few sentences, every number read from `study` (the JSON)."""
    table = study["table"]
    base = next((t for t in table if t["method"] == "none"), None)
    if base is None:
        return "Reader study: no uncompressed reading yet."

    def pct(t):
        lo, hi = t["wilson95"]
        return f"{t['k']}/{t['n']} [{lo:.0%}, {hi:.0%}]"

    parts = [f"Reader study (similar facts, {study['config']['n_tokens']}-token contexts, "
             f"5 same-form facts, 95% Wilson intervals): uncompressed {pct(base)}."]
    for method in dict.fromkeys(t["method"] for t in table if t["method"] != "none"):
        cells = [t for t in table if t["method"] == method]
        parts.append(f"{method}: " + "; ".join(
            f"{t['ratio']:g}x {pct(t)}, {t['vs_none']['wrong_to_right']} wrong->right vs "
            f"{t['vs_none']['right_to_wrong']} right->wrong (p={t['vs_none']['mcnemar_p']:.2g}"
            + ("" if t["n"] == base["n"] else f"; uncompressed {t['none_on_same_items']} on "
               "these items") + ")" for t in cells) + ".")
    c = study.get("conclusion", {})
    better, worse = c.get("significantly_better", []), c.get("significantly_worse", [])
    parts.append("Compression helps the small reader significantly (exact McNemar, p < "
                 f"{c.get('alpha', 0.05):g}) at: " + (", ".join(better) if better else "none")
                 + "; hurts it significantly at: " + (", ".join(worse) if worse else "none") + ".")
    if not study.get("complete", True):
        parts.append("(Partial run: see n per cell.)")
    return " ".join(parts)
