"""Time LocalChat's decode per token: the plain loop (dynamic KV cache, eager steps) against
`static_cache=True` (static KV cache, each step a CUDA-graph replay on a GPU).

    python -m benchmarks.bench_llm_decode --config .gpu/smollm2 --out $OUT     # on the GPU

The model is the embedded model's architecture (config + tokenizer folder, see
`workbench.compiler.benchmark`'s docstring) with random bf16 weights: the text is teacher-forced
(`ForceText`), so the weights do not change what is timed. Each variant: a warm-up call, then
`--calls` forced generations of a plan-like text after a ~600-token prompt; the JSON holds the
median seconds per generated token and the first call's time (which includes the capture).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import device_name, write_results


def forced_decode_ms(chat, prompt: list[dict], text: str, calls: int) -> dict:
    """Median ms per generated token over `calls` forced generations (cache cleared between)."""
    from workbench.compiler.forcing import ForceText

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    chat.chat(prompt, max_tokens=8)
    first = time.perf_counter() - t0
    per_token, tokens = [], 0
    for _ in range(calls):
        chat.clear_cache()
        sync()
        t0 = time.perf_counter()
        r = chat.chat(prompt, max_tokens=400, logits_processor=[ForceText(chat.tokenizer, text)])
        sync()
        per_token.append((time.perf_counter() - t0) / r.completion_tokens * 1e3)
        tokens = r.completion_tokens
    return {"median_ms_per_token": statistics.median(per_token), "all_ms_per_token": per_token,
            "tokens": tokens, "first_call_s": first}


def main(argv: list[str] | None = None) -> int:
    from workbench.compiler.benchmark import random_weights_backend

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="config + tokenizer folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    prompt = [{"role": "user", "content": "Plan the calls. " + "word " * 600}]
    text = "".join(f"{i}. get_weather(city=\"City {i}\", unit=\"celsius\")\n" for i in range(1, 9))
    rows = {}
    for static in (False, True):
        chat = random_weights_backend(a.config, device=a.device, static_cache=static)
        name = ("static cache" + (" + CUDA graphs" if a.device.startswith("cuda") else "")
                if static else "dynamic cache, eager")
        rows[name] = forced_decode_ms(chat, prompt, text, a.calls)
        print(f"{name:28s} {rows[name]['median_ms_per_token']:8.2f} ms/token "
              f"({rows[name]['tokens']} tokens; first call {rows[name]['first_call_s']:.1f} s)",
              flush=True)
    plain, fast = (rows[k]["median_ms_per_token"] for k in rows)
    path = write_results(f"llm_decode_{a.device}", [], device=a.device,
                         meta={"model": "SmolLM2-135M architecture, random bf16 weights",
                               "device_name": device_name(a.device), "variants": rows,
                               "speedup": plain / fast}, out_dir=a.out)
    print(f"speedup {plain / fast:.2f}x; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
