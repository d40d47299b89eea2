"""ReAct baseline: one LLM step per tool call, each call run before the next step is asked for.

    react = ReAct(chat, toolbox)                   # same tools, model, prompt style, grammar
    run = react.run("What is 3*4 + 5*6?")          # RunResult, like LLMCompiler's

Each step the model sees the question and the history (`N. call` as its own turns, the tool's
`Observation: ...` as the user's) and writes the next line: one call, or `N. join()` when it has
what it needs. The call is parsed by the same parser (so `$N` refers to step N's output), run,
and its observation appended. After join() (or `max_steps`), the same Joiner as LLMCompiler's
writes the answer. With a local model the same grammar constrains every step, with the earlier
steps as already-written lines (numbering continues, repeats are impossible).
"""

from __future__ import annotations

import asyncio

from workbench.compiler.executor import TaskFetchingUnit
from workbench.compiler.joiner import Joiner
from workbench.compiler.llm_compiler import Round, RunResult, run_sync
from workbench.compiler.parser import PlanParser, Task
from workbench.compiler.planner import Planner
from workbench.compiler.tools import Toolbox
from workbench.llm import ChatBackend


class ReAct:
    """Sequential think-act-observe loop over the same backend and tools as LLMCompiler."""

    def __init__(self, backend: ChatBackend, toolbox: Toolbox, constrained: bool | str = "auto",
                 max_steps: int = 8, step_tokens: int = 64, tool_timeout: float | None = None,
                 planner: Planner | None = None, joiner: Joiner | None = None):
        self.backend, self.toolbox = backend, toolbox
        self.planner = planner or Planner(backend, toolbox, constrained=constrained,
                                          max_tokens=step_tokens)
        self.joiner = joiner or Joiner(backend)
        self.max_steps, self.step_tokens, self.tool_timeout = max_steps, step_tokens, tool_timeout

    def messages(self, question: str, history: list[tuple[str, str]]) -> list[dict]:
        msgs = [{"role": "system", "content": self.planner.system_prompt(question, react=True)},
                {"role": "user", "content": f"Question: {question}"}]
        for line, observation in history:
            msgs.append({"role": "assistant", "content": line})
            msgs.append({"role": "user", "content": f"Observation: {observation}"})
        return msgs

    def step(self, question: str, history: list[tuple[str, str]], forced: str | None = None):
        """One LLM step: the next line (a call or join). `forced`: make the model write exactly
        this line (teacher forcing, used by the latency benchmark)."""
        procs = []
        if forced is not None:
            from workbench.compiler.forcing import ForceText
            procs = [ForceText(self.backend.tokenizer, forced + "\n")]
        elif self.planner.constrained:
            grammar = self.planner.grammar
            procs = [grammar.processor(self.backend.tokenizer, [h[0] for h in history],
                                       budget=self.step_tokens)]
        return self.backend.chat(self.messages(question, history), max_tokens=self.step_tokens,
                                 stop=["\n"], logits_processor=procs or None)

    def run(self, question: str, forced: list[str] | None = None) -> RunResult:
        return run_sync(self.arun(question, forced))

    async def arun(self, question: str, forced: list[str] | None = None) -> RunResult:
        """forced: the exact lines to write, e.g. reference calls then 'N. join()'."""
        run = RunResult("ReAct", question, "")
        tl = run.timeline
        parser = PlanParser(self.toolbox)
        tfu = TaskFetchingUnit(self.toolbox, 1, tl, self.tool_timeout)
        history: list[tuple[str, str]] = []
        for k in range(self.max_steps + 1):
            line_forced = forced[k] if forced and k < len(forced) else None
            with tl.span("llm", f"step {k + 1}", "llm") as span:
                result = await asyncio.to_thread(self.step, question, history, line_forced)
                span.meta.update(tokens=result.completion_tokens,
                                 cached=getattr(result, "cached_tokens", 0))
            run.llm_calls.append(result)
            line = result.text.strip().splitlines()[0] if result.text.strip() else ""
            events = parser.feed(line + "\n")
            tasks = [e for e in events if isinstance(e, Task)]
            if parser.plan.joined or k == self.max_steps:
                break
            if not tasks:
                why = "; ".join(str(e) for e in events) or "empty step"
                history.append((line, f"Error: {why}. Write one valid call or join()."))
                continue
            rec = tfu.submit(tasks[0])
            await tfu.wait()
            history.append((str(tasks[0]), rec.observation_text()))
        parser.close()
        rnd = Round(parser.plan, tfu.records)
        run.rounds.append(rnd)
        with tl.span("joiner", "answer", "llm") as span:
            decision = await asyncio.to_thread(self.joiner.decide, question, tfu.records, False)
            span.meta.update(tokens=decision.result.completion_tokens,
                             cached=getattr(decision.result, "cached_tokens", 0))
        rnd.decision = decision
        run.llm_calls.append(decision.result)
        run.answer = decision.text
        return run
