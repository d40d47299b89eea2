"""Few-shot examples for the planner, and how to pick the ones that fit the tools at hand.

An Example is a question, the signatures of the tools it uses, its plan, and (for the ReAct
prompt) what each call returned. `choose_examples(toolbox, question, k)` prefers examples whose
tools are all in the toolbox (as TinyAgent does), then examples whose tools and question share
the most words with the toolbox's descriptions and the question, and with as many distinct tools
as the toolbox has (one tool: examples that call one tool several times).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.compiler.tools import Toolbox


@dataclass(frozen=True)
class Example:
    question: str
    tools: tuple[str, ...]          # signatures shown with the example
    plan: tuple[str, ...]           # call lines without numbers; join() is added
    observations: tuple[str, ...] = ()

    @property
    def tool_names(self) -> set[str]:
        return {t.split("(", 1)[0] for t in self.tools}

    def render(self, react: bool = False) -> str:
        lines = [f"Tools: {'; '.join(self.tools)}", f"Question: {self.question}"]
        for i, call in enumerate(self.plan, 1):
            lines.append(f"{i}. {call}")
            if react and i <= len(self.observations):
                lines.append(f"Observation: {self.observations[i - 1]}")
        lines.append(f"{len(self.plan) + 1}. join()")
        if not react:
            lines.append("<END_OF_PLAN>")
        return "\n".join(lines)


DEFAULT_EXAMPLES = (
    Example("What is the weather in Paris and in Tokyo, in fahrenheit?",
            ("get_weather(city: str, unit: str = 'celsius')",),
            ('get_weather(city="Paris", unit="fahrenheit")',
             'get_weather(city="Tokyo", unit="fahrenheit")'),
            ("Paris: 61 F, cloudy", "Tokyo: 70 F, sunny")),
    Example("What is 3 times 4, plus 5 times 6?",
            ("multiply(a: float, b: float)", "add(a: float, b: float)"),
            ("multiply(a=3, b=4)", "multiply(a=5, b=6)", "add(a=$1, b=$2)"),
            ("12", "30", "42")),
    Example("Convert 250 US dollars to euros, and get the stock price of Apple.",
            ("convert_currency(amount: float, from_currency: str, to_currency: str)",
             "get_stock_price(symbol: str)"),
            ('convert_currency(amount=250, from_currency="USD", to_currency="EUR")',
             'get_stock_price(symbol="AAPL")'),
            ("230.5 EUR", "AAPL: 189.3 USD")),
    Example("Find the population of the capital of Japan.",
            ("get_capital(country: str)", "get_population(city: str)"),
            ('get_capital(country="Japan")', "get_population(city=$1)"),
            ("Tokyo", "13960000")),
    Example("Calculate the BMI of a person who weighs 70 kg and is 1.75 m tall.",
            ("calculate_bmi(weight_kg: float, height_m: float)",),
            ("calculate_bmi(weight_kg=70, height_m=1.75)",),
            ("22.9",)),
    Example("Find Italian and Thai restaurants in Boston, and book a table for 4 at the first "
            "Italian one.",
            ("find_restaurants(location: str, cuisine: list[str])",
             "book_table(restaurant: str, people: int)"),
            ('find_restaurants(location="Boston", cuisine=["Italian"])',
             'find_restaurants(location="Boston", cuisine=["Thai"])',
             "book_table(restaurant=$1, people=4)"),
            ("Trattoria Roma", "Bangkok Garden", "booked: Trattoria Roma, 4 people")),
)

_WORD = re.compile(r"[a-z]{3,}")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower().replace("_", " ")))


def choose_examples(toolbox: Toolbox, question: str = "", k: int = 2,
                    pool: tuple[Example, ...] | list[Example] = DEFAULT_EXAMPLES) -> list[Example]:
    """The k examples that fit the toolbox and question best (see the module doc)."""
    words = _words(question + " " + " ".join(f"{t.name} {t.description}" for t in toolbox))
    n_tools = len(toolbox)

    def score(ex: Example) -> tuple:
        own = ex.tool_names <= set(toolbox.names)
        overlap = len(words & _words(ex.question + " " + " ".join(ex.tools)))
        shape = -abs(len(ex.tool_names) - min(n_tools, 2))
        return (own, shape, overlap)

    return sorted(pool, key=score, reverse=True)[:k]
