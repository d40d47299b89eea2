"""Long-context tasks on real text for squeezed attention: a fixed context, its real
continuation, and questions whose evidence lies far back in the context.

Each task takes consecutive real text (the Python language reference from `pydoc_data.topics`,
via `workbench.data.text_chunks`): the first `context_len` tokens are the fixed context, the next
`continuation_len` real tokens are the held-out continuation whose perplexity is measured. A few
fact sentences of distinct kinds (a vault code, a password, a pet's name, a room) are spliced in
at fixed depths of the context (10-45%, far from the end, so a recent window misses them), and
each gets a question answered by greedy decoding and checked by substring. The text around the
facts stays real; the facts are what the model must find, the "needle" test. The values are drawn
from a seeded generator, so a task set is the same on every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from workbench.data import text_chunks
from workbench.errors import WorkbenchError

FACT_TEMPLATES = (
    ("The access code for the blue vault is {v}.", "What is the access code for the blue vault?",
     "The access code for the blue vault is", "number"),
    ("The secret password of the old wizard is {v}.",
     "What is the secret password of the old wizard?",
     "The secret password of the old wizard is", "word"),
    ("Alice's grey cat is called {v}.", "What is Alice's grey cat called?",
     "Alice's grey cat is called", "name"),
    ("The meeting with the auditors takes place in room {v}.",
     "In which room does the meeting with the auditors take place?",
     "The meeting with the auditors takes place in room", "room"),
)
WORDS = ("pineapple", "thunderbolt", "marmalade", "snowflake", "butterscotch", "lighthouse",
         "avalanche", "sunflower")
NAMES = ("Whiskers", "Pumpkin", "Marmaduke", "Biscuit", "Tiberius", "Clementine", "Jasper",
         "Pepper")
DEPTHS = (0.10, 0.20, 0.30, 0.45)


@dataclass(frozen=True)
class Fact:
    statement: str      # the sentence placed in the context
    question: str       # asked after the context
    prompt: str         # the answer's start, so a small model only has to complete it
    answer: str         # what the greedy completion must contain
    position: int       # token position of the statement in the context


@dataclass(frozen=True)
class QualityTask:
    name: str
    context_ids: torch.Tensor       # (context_len,) int64: real text with the facts spliced in
    continuation_ids: torch.Tensor  # (continuation_len,) int64: the real text that follows
    facts: tuple[Fact, ...]

    def question_ids(self, tokenizer, fact: Fact) -> torch.Tensor:
        """(q_len,) the user input that asks about `fact`."""
        text = f"\n\nQuestion: {fact.question}\nAnswer: {fact.prompt}"
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def _value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(10000, 99999))
    if kind == "word":
        return rng.choice(WORDS)
    if kind == "name":
        return rng.choice(NAMES)
    return str(rng.randint(100, 999))


def make_tasks(tokenizer, n_tasks: int = 3, context_len: int = 3584,
               continuation_len: int = 256, n_facts: int = 4, seed: int = 0,
               first_chunk: int = 1) -> list[QualityTask]:
    """`n_tasks` tasks from consecutive windows of real text (window `first_chunk` onwards)."""
    if not 1 <= n_facts <= len(FACT_TEMPLATES):
        raise WorkbenchError(f"n_facts must be in [1, {len(FACT_TEMPLATES)}], got {n_facts}.")
    total = context_len + continuation_len
    chunks = text_chunks(tokenizer, total, first_chunk + n_tasks)[first_chunk:]
    newline = set(tokenizer("\n\n\n", add_special_tokens=False)["input_ids"])
    rng = random.Random(seed)
    tasks = []
    for t, chunk in enumerate(chunks):
        pieces, facts_raw = [], []
        for template, question, prompt, kind in FACT_TEMPLATES[:n_facts]:
            v = _value(kind, rng)
            ids = tokenizer(" " + template.format(v=v), add_special_tokens=False)["input_ids"]
            pieces.append(ids)
            facts_raw.append((template.format(v=v), question, prompt, v))
        n_fact_tokens = sum(len(p) for p in pieces)
        text = chunk[:total - n_fact_tokens].tolist()
        ctx_text, cont = text[:context_len - n_fact_tokens], text[context_len - n_fact_tokens:]
        out, facts, last = [], [], 0
        for depth, ids, raw in zip(DEPTHS, pieces, facts_raw, strict=False):
            cut = int(depth * len(ctx_text))
            # move the cut to just after a line break nearby, so the fact starts a sentence
            for j in range(cut, min(cut + 200, len(ctx_text))):
                if ctx_text[j] in newline:
                    cut = j + 1
                    break
            out += ctx_text[last:cut]
            facts.append(Fact(*raw[:3], answer=raw[3], position=len(out)))
            out += ids
            last = cut
        out += ctx_text[last:]
        assert len(out) == context_len, (len(out), context_len)
        tasks.append(QualityTask(f"python_docs window {first_chunk + t}",
                                 torch.tensor(out), torch.tensor(cont[:continuation_len]),
                                 tuple(facts)))
    return tasks
