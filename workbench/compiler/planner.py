"""The planner: one LLM call writes the whole plan, streamed, optionally grammar-constrained.

    planner = Planner(chat, toolbox)                 # constrained="auto": on for LocalChat
    reply = planner.stream("What is 3*4 + 5*6?")     # StreamingReply of plan text
    plan, result = planner.plan("...")               # parsed Plan and the ChatResult

The prompt lists the tools (signature, description, parameter notes), the plan rules, and a few
examples chosen for the tools at hand (`examples.choose_examples`). A replan adds the previous
plan, its observations and its problems to the request.
"""

from __future__ import annotations

from collections.abc import Sequence

from workbench.compiler.examples import DEFAULT_EXAMPLES, Example, choose_examples
from workbench.compiler.grammar import PlanGrammar
from workbench.compiler.parser import END_MARKER, Plan, parse_plan
from workbench.compiler.tools import Toolbox
from workbench.errors import WorkbenchError
from workbench.llm import ChatBackend, ChatResult, StreamingReply

RULES = f"""Rules:
- Write one tool call per line: "N. tool_name(arg=value, ...)", numbered from 1.
- Use only the tools listed above, with their own argument names.
- Values are Python literals: "text", 12, 3.5, True, ["a", "b"].
- To use the output of an earlier task N, write $N (for example a=$1), or ${{N}} inside a string.
- Calls that do not need each other's outputs must not refer to each other: they run in parallel.
- Do not repeat a call. After the last call write "N. join()" and then {END_MARKER}."""

REACT_RULES = """Rules:
- Write ONE tool call per step: "N. tool_name(arg=value, ...)"; you will then see its Observation.
- Use only the tools listed above, with their own argument names.
- Values are Python literals: "text", 12, 3.5, True, ["a", "b"]; $N is the output of step N.
- Do not repeat a call. When you have everything the question needs, write "N. join()"."""


def describe_context(plan: Plan | None, observations: dict[int, str] | None,
                     problems: Sequence[str] = ()) -> str:
    """Text that tells a replanner what the previous plan did and what went wrong."""
    lines = ["Previous plan and results:"]
    if plan is not None:
        for t in plan.calls:
            lines.append(f"{t} -> {(observations or {}).get(t.idx, '(not run)')}")
    if problems:
        lines.append("Problems: " + "; ".join(problems))
    lines.append("Write a new plan that fixes the problems. Do not repeat calls that worked.")
    return "\n".join(lines)


class Planner:
    """Builds the planner prompt and streams a plan from a chat backend.

    constrained: True (grammar-constrained decoding; needs a LocalChat), False, or "auto" (on
    whenever the backend is a local model with a tokenizer).
    """

    def __init__(self, backend: ChatBackend, toolbox: Toolbox, constrained: bool | str = "auto",
                 examples: Sequence[Example] | None = None, n_examples: int = 2,
                 max_tokens: int = 320, max_tasks: int = 8):
        if not len(toolbox):
            raise WorkbenchError("The planner needs at least one tool in its Toolbox.")
        self.backend, self.toolbox = backend, toolbox
        local = hasattr(backend, "tokenizer")
        if constrained == "auto":
            constrained = local
        if constrained and not local:
            raise WorkbenchError("Constrained decoding runs inside the local decoding loop; "
                                 f"{backend!r} is a remote backend. Use constrained=False.")
        self.constrained = bool(constrained)
        self.pool = tuple(examples) if examples is not None else DEFAULT_EXAMPLES
        self.n_examples, self.max_tokens = n_examples, max_tokens
        self.grammar = PlanGrammar(toolbox, max_tasks=max_tasks) if self.constrained else None
        self.last_processor = None

    def system_prompt(self, question: str, react: bool = False) -> str:
        examples = choose_examples(self.toolbox, question, self.n_examples, self.pool)
        shots = "\n\n".join(ex.render(react) for ex in examples)
        what = ("You solve the question step by step with tool calls." if react else
                "You are a planner. Write a plan of tool calls that answers the question.")
        return (f"{what}\n\nTools:\n{self.toolbox.describe()}\n\n"
                f"{REACT_RULES if react else RULES}\n\nExamples (with other tools):\n\n{shots}")

    def messages(self, question: str, context: str | None = None) -> list[dict]:
        user = f"Question: {question}"
        if context:
            user += f"\n\n{context}"
        return [{"role": "system", "content": self.system_prompt(question)},
                {"role": "user", "content": user}]

    def stream(self, question: str, context: str | None = None,
               constrained: bool | None = None, forced: str | None = None) -> StreamingReply:
        """Stream the plan text (the end marker is the stop string and is not included).

        forced: make a local model write exactly this plan (latency benchmark)."""
        use = self.constrained if constrained is None else constrained
        procs = []
        if forced is not None:
            from workbench.compiler.forcing import ForceText
            procs = [ForceText(self.backend.tokenizer, forced)]
        elif use:
            grammar = self.grammar or PlanGrammar(self.toolbox)
            self.last_processor = grammar.processor(self.backend.tokenizer,
                                                    budget=self.max_tokens)
            procs = [self.last_processor]
        return self.backend.stream(self.messages(question, context), max_tokens=self.max_tokens,
                                   stop=[END_MARKER], logits_processor=procs or None)

    def plan(self, question: str, context: str | None = None,
             constrained: bool | None = None) -> tuple[Plan, ChatResult]:
        """Generate and parse a whole plan (no execution)."""
        reply = self.stream(question, context, constrained)
        result = reply.collect()
        text = result.text
        if result.finish_reason == "stop" and END_MARKER not in text and "join()" in text:
            text += END_MARKER  # the stop string was cut off by the backend
        return parse_plan(text, self.toolbox), result
