"""Benchmark tasks built from real text nobody here wrote, with automatically checked answers.

Documents are topics of Python's language reference (`pydoc_data.topics`) and real ShareGPT
summarization requests with the assistant's summary as reference. Tasks:

- `needle`: one inserted fact ("The access code for the blue vault is 48213.") in real text of
  growing length (~500 / 1,000 / 2,000 tokens). The embedded reader finds such a fact almost
  always, so its accuracy measures what compression loses.
- `passage_id`: five real passages labelled "Passage 1:" ... "Passage 5:" (topic titles
  removed); which one is about a named topic? Answer: the number. Retention-scored here: the
  135M reader answers "Passage 1" almost whatever the question (1/6 in a probe, chance level).
- `similar_facts`: five facts of the same form (five vaults, five codes) in real text; asked for
  one. Hard for the 135M reader (it latches onto one fact); compression may help it.
- `cloze`: a real sentence with one rare word blanked; retention-scored (is that word still in
  the compressed prompt) because the reader answers such questions poorly.
- `summary`: a ShareGPT "summarize this" request; the reader's summary is scored by ROUGE-L
  against the real assistant's summary.

Retention needs no reader: the answer (a code, a label with its topic word, a rare word) occurs
once in the context, so it is in the compressed prompt only if its evidence was kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from workbench.compression.metrics import contains_answer, first_number, rouge_l

COLORS = ("blue", "red", "green", "yellow", "black", "white", "orange", "purple")
QA_TEMPLATE = "{context}\n\n{question}"


@dataclass(frozen=True)
class Item:
    """One benchmark item. `reader`: the local reader is scored on it (not retention-only)."""

    task: str
    id: str
    context: str
    question: str
    answer: str
    reader: bool = True
    instruction: str = "Answer with the number only."
    max_tokens: int = 20
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def prompt(self, context: str) -> str:
        """The reader's user message for a (compressed) context."""
        return f"{context}\n\n{self.question} {self.instruction}".strip()

    def retained(self, text: str) -> bool | float:
        if self.task == "passage_id":
            return passage_retained(text, int(self.answer), self.meta["keyword"])
        if self.task == "summary":
            return rouge_l(text, self.answer)["r"]
        return contains_answer(text, self.answer)

    def correct(self, reply: str) -> bool | float:
        if self.task == "summary":
            return rouge_l(reply, self.answer)["f"]
        if self.task in ("needle", "similar_facts", "passage_id"):
            return first_number(reply) == self.answer
        return contains_answer(reply, self.answer)


def passage_retained(text: str, label: int, keyword: str) -> bool:
    """The label "Passage n" survives and the topic word follows it before the next label."""
    m = re.search(rf"Passage {label}\b(.*?)(?=Passage \d|\Z)", text, re.S)
    return bool(m) and keyword.lower() in m.group(1).lower()


def _topics() -> dict[str, str]:
    from workbench.data import python_docs_topics

    return {d.name: d.text for d in python_docs_topics()}


def _body(text: str) -> str:
    """A topic without its title lines ('The "assert" statement' + a line of stars)."""
    lines = text.split("\n")
    if len(lines) > 2 and set(lines[1].strip()) <= set("*=-"):
        lines = lines[2:]
    return "\n".join(lines).strip()


def _sentences(text: str) -> list[tuple[int, int]]:
    from workbench.compression.segment import split_units

    return split_units(text, "sentence")


def _cut(tokenizer, text: str, n_tokens: int) -> str:
    """The first ~n_tokens of text, cut at a paragraph (else sentence) end."""
    ids = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(ids["input_ids"]) <= n_tokens:
        return text
    end = ids["offset_mapping"][n_tokens][0]
    para = text.rfind("\n\n", 0, end)
    if para > end // 2:
        return text[:para]
    sent = max(text.rfind(". ", 0, end), text.rfind(".\n", 0, end))
    return text[:sent + 1] if sent > end // 2 else text[:end]


def _haystack(tokenizer, names: list[str], n_tokens: int) -> str:
    topics = _topics()
    text = "\n\n".join(_body(topics[n]) for n in names)
    return _cut(tokenizer, text, n_tokens)


def _insert(text: str, facts: list[str], rng: random.Random) -> str:
    """Insert each fact as its own sentence after a random sentence end (not in the first 10%)."""
    for fact in facts:
        spans = _sentences(text)
        ends = [b for _, b in spans if b > len(text) // 10 and text[b - 1:b] == "."]
        at = rng.choice(ends) if ends else len(text)
        text = text[:at] + " " + fact + text[at:]
    return text


# long topics in a fixed order (each >= 8,000 characters on Python 3.11)
HAYSTACKS = [["compound", "types"], ["specialnames", "atom-identifiers"], ["exprlists",
             "formatstrings"], ["typesseq", "import"], ["numeric-types", "typesmapping"],
             ["class", "execmodel"]]


def needle_items(tokenizer, lengths=(512, 1024, 2048), per_length: int = 2, seed: int = 0):
    rng = random.Random(seed)
    items = []
    for li, n in enumerate(lengths):
        for k in range(per_length):
            names = HAYSTACKS[(li * per_length + k) % len(HAYSTACKS)]
            color, code = rng.choice(COLORS), str(rng.randint(10000, 99999))
            fact = f"The access code for the {color} vault is {code}."
            context = _insert(_haystack(tokenizer, names, n), [fact], rng)
            items.append(Item("needle", f"needle-{n}-{k}", context,
                              f"What is the access code for the {color} vault?", code,
                              meta={"length": n, "docs": names}))
    return items


def similar_facts_items(tokenizer, count: int = 3, n_tokens: int = 1024, seed: int = 1):
    rng = random.Random(seed)
    items = []
    for k in range(count):
        names = HAYSTACKS[(k + 3) % len(HAYSTACKS)]
        colors = rng.sample(COLORS, 5)
        codes = rng.sample(range(10000, 99999), 5)
        facts = [f"The access code for the {c} vault is {v}." for c, v in zip(colors, codes,
                                                                               strict=True)]
        context = _insert(_haystack(tokenizer, names, n_tokens), facts, rng)
        ask = rng.randrange(5)
        items.append(Item("similar_facts", f"similar-{k}", context,
                          f"What is the access code for the {colors[ask]} vault?", str(codes[ask]),
                          meta={"docs": names, "distractors": 4}))
    return items


# (topic name, word the question and retention use) for passage identification
PASSAGE_TOPICS = [("assert", "assert"), ("break", "break"), ("continue", "continue"),
                  ("del", "del"), ("global", "global"), ("pass", "pass"), ("raise", "raise"),
                  ("return", "return"), ("while", "while"), ("yield", "yield"),
                  ("if", "if"), ("try", "try"), ("with", "with"), ("lambda", "lambda"),
                  ("nonlocal", "nonlocal")]


def passage_items(tokenizer, count: int = 3, passages: int = 5, passage_tokens: int = 150,
                  seed: int = 2):
    rng = random.Random(seed)
    topics = _topics()
    items = []
    for k in range(count):
        chosen = rng.sample(PASSAGE_TOPICS, passages)
        blocks = [f"Passage {i + 1}: " + _cut(tokenizer, _body(topics[name]), passage_tokens)
                  for i, (name, _) in enumerate(chosen)]
        ask = rng.randrange(passages)
        keyword = chosen[ask][1]
        items.append(Item("passage_id", f"passage-{k}", "\n\n".join(blocks),
                          f'Which passage describes the "{keyword}" statement?', str(ask + 1),
                          instruction="Answer with the passage number only.", reader=False,
                          meta={"keyword": keyword, "topics": [c[0] for c in chosen]}))
    return items


def cloze_items(tokenizer, count: int = 4, n_tokens: int = 1024, seed: int = 3):
    """A real sentence with a rare word (once in the context, 6+ letters) blanked out."""
    rng = random.Random(seed)
    items = []
    for k in range(count):
        names = HAYSTACKS[(k + 1) % len(HAYSTACKS)]
        context = _haystack(tokenizer, names, n_tokens)
        low = context.lower()
        spans = [(a, b) for a, b in _sentences(context)
                 if 60 <= b - a <= 300 and "\n   " not in context[a:b]]
        rng.shuffle(spans)
        for a, b in spans:
            sentence = " ".join(context[a:b].split())
            words = [w for w in re.findall(r"\b[a-z]{6,}\b", sentence)
                     if len(re.findall(rf"\b{w}\b", low)) == 1]
            if words:
                word = rng.choice(words)
                blanked = re.sub(rf"\b{word}\b", "____", sentence, count=1)
                items.append(Item("cloze", f"cloze-{k}", context,
                                  f'Which word fills the blank in this sentence of the document: '
                                  f'"{blanked}"?', word, reader=False,
                                  instruction="Answer with one word.", max_tokens=8,
                                  meta={"docs": names}))
                break
    return items


def summary_items(count: int = 2, min_chars: int = 2500, max_chars: int = 5000):
    """Real ShareGPT requests "Summarize ...: <text>" with the assistant's reply as reference."""
    from workbench.data import load_sharegpt

    items = []
    for conv in load_sharegpt():
        t = conv.turns
        for i in range(len(t) - 1):
            user, ref = t[i], t[i + 1]
            if user.role != "user" or ref.role != "assistant":
                continue
            head, _, body = user.text.partition("\n")
            if (re.match(r"\s*(please\s+)?summari[sz]e\b", head, re.I) and len(head) < 200
                    and min_chars <= len(body) <= max_chars and 300 <= len(ref.text) <= 1500):
                items.append(Item("summary", f"summary-{conv.id}-{i}", body.strip(),
                                  "Summarize the text in a few sentences.", ref.text.strip(),
                                  instruction="", max_tokens=64,
                                  meta={"request": head.strip()}))
                break
        if len(items) >= count:
            break
    return items


TASKS = ("needle", "passage_id", "similar_facts", "cloze", "summary")


SIZES = ("quick", "small", "full")


def build_items(tokenizer, size: str = "small") -> list[Item]:
    """The benchmark items. quick: 4 short items (notebook, tests); small: 6 items, one per task
    and two needle lengths (what a shared 2-core CPU runs in about an hour); full: 18 items."""
    if size == "quick":
        return (needle_items(tokenizer, lengths=(512,), per_length=1)
                + passage_items(tokenizer, count=1, passage_tokens=80)
                + similar_facts_items(tokenizer, count=1, n_tokens=512)
                + cloze_items(tokenizer, count=1, n_tokens=512))
    if size == "small":
        return (needle_items(tokenizer, lengths=(512,), per_length=1)
                + similar_facts_items(tokenizer, count=1, n_tokens=512)
                + summary_items(count=1, max_chars=3600)
                + needle_items(tokenizer, lengths=(1024,), per_length=1, seed=10)
                + passage_items(tokenizer, count=1, passage_tokens=80)
                + cloze_items(tokenizer, count=1, n_tokens=512))
    if size == "full":
        return (needle_items(tokenizer) + passage_items(tokenizer)
                + similar_facts_items(tokenizer) + cloze_items(tokenizer) + summary_items())
    from workbench.errors import WorkbenchError

    raise WorkbenchError(f"Unknown benchmark size {size!r}; use one of {SIZES}.")
