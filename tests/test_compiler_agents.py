"""LLMCompiler and ReAct end to end over a scripted backend (no model), and the plan views."""

from __future__ import annotations

import asyncio
import time

from workbench.compiler.llm_compiler import LLMCompiler
from workbench.compiler.react import ReAct
from workbench.compiler.tools import Toolbox, tool
from workbench.llm import ChatBackend, ChatResult, StreamingReply
from workbench.widgets.plan_views import (
    compare_figure,
    dag_and_timeline,
    dag_figure,
    timeline_figure,
)

DELAY = 0.15


class ScriptedChat(ChatBackend):
    """Replies from a list, streamed in small pieces with a pause (like a slow model)."""

    backend, model_name = "scripted", "scripted"

    def __init__(self, replies, piece_delay=0.01):
        self.replies, self.calls, self.delay = list(replies), [], piece_delay

    def _next(self, messages):
        self.calls.append(messages)
        return self.replies.pop(0)

    def chat(self, messages, **kw):
        return ChatResult(self._next(messages), 10, 5, 0.0, "stop", "scripted", "scripted")

    def stream(self, messages, **kw):
        text = self._next(messages)

        def gen():
            for i in range(0, len(text), 8):
                time.sleep(self.delay)
                yield text[i:i + 8]
            return ChatResult(text, 10, 5, 0.0, "stop", "scripted", "scripted")
        return StreamingReply(gen())


@tool
async def lookup(city: str) -> str:
    """Weather of a city."""
    await asyncio.sleep(DELAY)
    return f"{city}: sunny"


BOX = Toolbox([lookup])
PLAN = ('1. lookup(city="Paris")\n2. lookup(city="Rome")\n3. lookup(city="Oslo")\n4. join()\n'
        '<END_OF_PLAN>')


def test_llmcompiler_runs_plan_in_parallel_and_finishes():
    chat = ScriptedChat([PLAN, "Action: Finish(all sunny)"])
    run = LLMCompiler(chat, BOX).run("Weather in Paris, Rome, Oslo?")
    assert run.answer == "all sunny" and len(run.llm_calls) == 2
    tools = [s for s in run.timeline.spans if s.kind == "tool"]
    assert len(tools) == 3
    assert tools[0].start < max(s.end for s in run.timeline.spans if s.lane == "planner")
    assert "Paris: sunny" in chat.calls[1][1]["content"]          # joiner saw observations


def test_rejected_plan_is_replanned_with_the_problems():
    chat = ScriptedChat(['1. nope(x=1)\n2. join()\n', PLAN, "Action: Finish(ok)"])
    run = LLMCompiler(chat, BOX, max_replans=1).run("q")
    assert len(run.rounds) == 2 and run.answer == "ok"
    assert "unknown tool 'nope'" in chat.calls[1][1]["content"]


def test_joiner_replan_is_bounded():
    chat = ScriptedChat([PLAN, "Action: Replan(try again)", PLAN, "Action: Replan(again)"])
    run = LLMCompiler(chat, BOX, max_replans=1).run("q")
    assert len(run.rounds) == 2 and run.answer == "again"           # last round must finish


def test_react_is_sequential_with_the_same_tools():
    chat = ScriptedChat(['1. lookup(city="Paris")', '2. lookup(city="Rome")', "3. join()",
                         "Action: Finish(sunny)"])
    run = ReAct(chat, BOX, constrained=False).run("q")
    assert run.answer == "sunny" and len(run.llm_calls) == 4
    tools = sorted((s for s in run.timeline.spans if s.kind == "tool"), key=lambda s: s.start)
    assert tools[1].start >= tools[0].end
    assert chat.calls[1][-1]["content"] == "Observation: Paris: sunny"


def test_views_build_for_both_runs():
    a = LLMCompiler(ScriptedChat([PLAN, "Finish(x)"]), BOX).run("q")
    b = ReAct(ScriptedChat(['1. lookup(city="Paris")', "2. join()", "x"]), BOX,
              constrained=False).run("q")
    dag = dag_figure(a)
    assert sum(len(t.x) for t in dag.data[1:]) == 4                # 3 calls + join
    assert len(timeline_figure(a).data) == 3                        # llm, tool, parsed marks
    assert compare_figure(a, b).layout.xaxis.range[1] >= a.seconds
    assert len(dag_and_timeline(b).data) >= 3
