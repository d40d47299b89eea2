"""LLMCompiler end to end: stream a plan, run its tasks while it streams, join, maybe replan.

    agent = LLMCompiler(chat, toolbox)            # constrained decoding on for a local model
    run = agent.run("What is 3*4 + 5*6?")         # works inside Jupyter's event loop too
    run.answer, run.timeline, run.rounds[0].plan, run.rounds[0].records

One round: the planner streams in a worker thread; each completed line goes to the parser and
from there to the Task Fetching Unit, which starts it once its inputs exist; when the stream
ends and all tasks finished, the joiner answers or asks for a replan (at most `max_replans`
times; a plan that was rejected or had no valid call is replanned without asking the joiner).
Every LLM call and every task is a span on `run.timeline`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from workbench.compiler.executor import (
    TaskFetchingUnit,
    TaskRecord,
    execute_stream,
    iterate_in_thread,
)
from workbench.compiler.joiner import Decision, Joiner, observations_text
from workbench.compiler.parser import Plan, PlanParser, Task
from workbench.compiler.planner import Planner, describe_context
from workbench.compiler.timeline import Timeline
from workbench.compiler.tools import Toolbox, run_sync
from workbench.llm import ChatBackend, ChatResult


@dataclass
class Round:
    """One plan-and-execute round."""

    plan: Plan
    records: dict[int, TaskRecord]
    planner: ChatResult | None = None
    decision: Decision | None = None


@dataclass
class RunResult:
    """What an agent did for one question: answer, rounds, all LLM calls, the timeline."""

    agent: str
    question: str
    answer: str
    rounds: list[Round] = field(default_factory=list)
    llm_calls: list[ChatResult] = field(default_factory=list)
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def seconds(self) -> float:
        return self.timeline.total

    @property
    def records(self) -> dict[int, TaskRecord]:
        return self.rounds[-1].records if self.rounds else {}

    def summary(self) -> str:
        calls = sum(1 for r in self.rounds for t in r.records.values() if not t.task.is_join)
        return (f"{self.agent}: {len(self.llm_calls)} LLM calls, {calls} tool calls, "
                f"{len(self.rounds)} round(s), {self.seconds:.2f} s")


class LLMCompiler:
    """Planner + Task Fetching Unit + executor + joiner over one chat backend and toolbox."""

    def __init__(self, backend: ChatBackend, toolbox: Toolbox, constrained: bool | str = "auto",
                 max_concurrency: int = 8, max_replans: int = 1, tool_timeout: float | None = None,
                 mode: str = "repair", planner: Planner | None = None,
                 joiner: Joiner | None = None):
        self.backend, self.toolbox = backend, toolbox
        self.planner = planner or Planner(backend, toolbox, constrained=constrained)
        self.joiner = joiner or Joiner(backend)
        self.max_concurrency, self.max_replans = max_concurrency, max_replans
        self.tool_timeout, self.mode = tool_timeout, mode

    def run(self, question: str, forced_plan: str | None = None) -> RunResult:
        return run_sync(self.arun(question, forced_plan))

    async def arun(self, question: str, forced_plan: str | None = None) -> RunResult:
        """forced_plan: make the planner write exactly this plan text (latency benchmark)."""
        run = RunResult("LLMCompiler", question, "")
        tl = run.timeline
        context = None
        for round_no in range(self.max_replans + 1):
            rnd = await self._round(question, context, tl, round_no, run,
                                    forced_plan if round_no == 0 else None)
            run.rounds.append(rnd)
            last = round_no == self.max_replans
            problems = [str(i) for i in rnd.plan.errors]
            if not rnd.plan.calls or rnd.plan.rejected:
                if last:
                    run.answer = "I could not make a valid plan: " + "; ".join(problems[:3])
                    break
                context = describe_context(rnd.plan, {}, problems or ["no valid tool call"])
                continue
            with tl.span("joiner", f"joiner (round {round_no + 1})", "llm") as span:
                decision = await asyncio.to_thread(self.joiner.decide, question, rnd.records,
                                                   not last)
                span.meta.update(tokens=decision.result.completion_tokens,
                                 cached=getattr(decision.result, "cached_tokens", 0))
            rnd.decision = decision
            run.llm_calls.append(decision.result)
            if decision.action == "finish":
                run.answer = decision.text
                break
            obs = {i: r.observation_text() for i, r in rnd.records.items()}
            context = describe_context(rnd.plan, obs, [decision.text])
        return run

    async def _round(self, question: str, context: str | None, tl: Timeline, round_no: int,
                     run: RunResult, forced: str | None = None) -> Round:
        parser = PlanParser(self.toolbox, self.mode)
        tfu = TaskFetchingUnit(self.toolbox, self.max_concurrency, tl, self.tool_timeout)
        holder: dict = {}

        def make_stream():
            holder["reply"] = self.planner.stream(question, context, forced=forced)
            return holder["reply"]

        with tl.span("planner", f"planner (round {round_no + 1})", "llm") as span:
            pieces = iterate_in_thread(make_stream)
            plan = await _parse_while_streaming(pieces, parser, tfu)
            span.end = tl.now()
            reply = holder.get("reply")
            result = reply.result if reply is not None and reply._done else None
            span.meta.update(tokens=getattr(result, "completion_tokens", None),
                             cached=getattr(result, "cached_tokens", 0))
        if result is not None:
            run.llm_calls.append(result)
        await tfu.wait()
        return Round(plan, tfu.records, result)


async def _parse_while_streaming(pieces, parser: PlanParser, tfu: TaskFetchingUnit) -> Plan:
    """Feed streamed text to the parser and submit each task at once (tasks are not awaited)."""
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            for event in parser.feed(piece):
                if isinstance(event, Task):
                    tfu.submit(event)
            if parser.plan.rejected:
                tfu.cancel_pending()
                break
    for event in parser.close():
        if isinstance(event, Task):
            tfu.submit(event)
    return parser.plan


__all__ = ["LLMCompiler", "Round", "RunResult", "run_sync", "execute_stream",
           "observations_text"]
