"""The joiner: read the plan's observations, then answer (Finish) or ask for a new plan (Replan).

    decision = Joiner(chat).decide(question, records)   # Decision(action, text, result)

The LLM is asked to reply with one line, `Action: Finish(<answer>)` or `Action: Replan(<what to
fix>)`. A reply in neither form is taken as the answer (small models often answer directly).
The ReAct baseline ends with the same call, so both agents spend the same on their last answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.compiler.executor import TaskRecord
from workbench.llm import ChatBackend, ChatResult

_ACTION = re.compile(r"(Finish|Replan)\s*\((.*)\)?", re.IGNORECASE | re.DOTALL)

SYSTEM = """You answer the user's question from the results of tool calls that were already made.
Reply with ONE line:
Action: Finish(<the answer, using the results>)
or, only if a call failed and a different plan could fix it:
Action: Replan(<what went wrong>)"""


@dataclass
class Decision:
    action: str                 # "finish" | "replan"
    text: str                   # the answer, or why a new plan is needed
    result: ChatResult | None = None


def observations_text(records: dict[int, TaskRecord]) -> str:
    """`1. tool(args) -> result` lines, in id order, for the joiner's and replanner's prompt."""
    lines = []
    for idx in sorted(records):
        rec = records[idx]
        if rec.task.is_join:
            continue
        lines.append(f"{rec.task} -> {rec.observation_text()}")
    return "\n".join(lines) or "(no tool was called)"


def parse_decision(text: str) -> Decision:
    """Read `Action: Finish(...)` / `Action: Replan(...)`; anything else is the answer itself."""
    m = _ACTION.search(text)
    if not m:
        return Decision("finish", text.strip())
    body = m.group(2).strip()
    if body.endswith(")"):
        body = body[:-1]
    return Decision(m.group(1).lower(), body.strip().strip('"').strip())


class Joiner:
    """Asks the LLM for the final answer (or a replan) given the question and the observations."""

    def __init__(self, backend: ChatBackend, max_tokens: int = 48):
        self.backend, self.max_tokens = backend, max_tokens

    def messages(self, question: str, records: dict[int, TaskRecord]) -> list[dict]:
        user = (f"Question: {question}\n\nTool calls and results:\n"
                f"{observations_text(records)}\n\nAction:")
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    def decide(self, question: str, records: dict[int, TaskRecord],
               allow_replan: bool = True) -> Decision:
        result = self.backend.chat(self.messages(question, records), max_tokens=self.max_tokens,
                                   stop=["\n"])      # the reply is one line
        decision = parse_decision(result.text)
        if decision.action == "replan" and not allow_replan:
            decision = Decision("finish", decision.text)
        decision.result = result
        return decision
