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

Recall items (`recall_items`) ask about the real text itself: a line of the context from far
back (5-75% deep) is repeated as the user input, cut after its first `prefix_len` tokens, and the
model must continue it with the `answer_len` tokens that follow it in the context (checked token
by token). An item is only used when its prefix occurs once in the context and the model does
*not* produce the answer from the prefix alone (no context): the answer must come from the
context. They give many more far-back questions per context than the four placed facts.
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
class Recall:
    prefix_ids: torch.Tensor   # (prefix_len,) tokens of a context line, the user input
    answer_ids: torch.Tensor   # (answer_len,) the tokens that follow them in the context
    answer: str                # answer_ids decoded, for people
    position: int              # token position of the prefix in the context

    def user_ids(self, tokenizer) -> torch.Tensor:
        """(q_len,) the user input: a paragraph break, then the prefix."""
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        return torch.cat([torch.tensor(sep, dtype=torch.long), self.prefix_ids])


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


def _occurrences(seq: torch.Tensor, pattern: torch.Tensor) -> int:
    """How many times `pattern` (p,) occurs in `seq` (n,)."""
    p = pattern.numel()
    if p > seq.numel():
        return 0
    windows = seq.unfold(0, p, 1)                                          # (n - p + 1, p)
    return int((windows == pattern).all(dim=1).sum())


@torch.no_grad()
def recall_items(model, tokenizer, task: QualityTask, n_items: int = 12, prefix_len: int = 12,
                 answer_len: int = 4, depths: tuple[float, float] = (0.05, 0.75),
                 candidates: int = 4) -> list[Recall]:
    """Up to `n_items` recall items from lines that start between `depths` of the context.

    The depth range is cut into `n_items` equal segments, one item each: the line starts of a
    segment are tried from its middle outwards (at most `candidates` of them); a candidate is
    skipped when its prefix is not unique in the context, when it overlaps a placed fact, when
    its answer crosses a line break, or when the model continues the prefix correctly without
    the context.
    """
    ids = task.context_ids
    n = ids.numel()
    newline = {t for t in set(ids.tolist()) if "\n" in tokenizer.decode([t])}
    span = prefix_len + answer_len
    starts = [i + 1 for i in range(n - 1) if int(ids[i]) in newline
              and int(ids[i + 1]) not in newline and i + 1 + span < n]
    facts = [(f.position, f.position + 32) for f in task.facts]
    device = next(model.parameters()).device
    lo, hi = depths[0] * n, depths[1] * n
    step = (hi - lo) / n_items
    items: list[Recall] = []
    for k in range(n_items):
        a, b = lo + k * step, lo + (k + 1) * step
        mid = (a + b) / 2
        inside = sorted((s for s in starts if a <= s < b), key=lambda s: abs(s - mid))
        for s in inside[:candidates]:
            prefix, ans = ids[s:s + prefix_len], ids[s + prefix_len:s + span]
            if any(fa < s + span and s < fb for fa, fb in facts):
                continue
            if any(int(t) in newline for t in ans) or _occurrences(ids, prefix) != 1:
                continue
            item = Recall(prefix, ans, tokenizer.decode(ans), s)
            user = item.user_ids(tokenizer)[None].to(device)
            out = model.generate(user, do_sample=False, max_new_tokens=answer_len,
                                 pad_token_id=tokenizer.eos_token_id)
            if out[0, user.shape[1]:].cpu().tolist() == ans.tolist():
                continue                                # answerable without the context
            items.append(item)
            break
    return items
