"""Real text for perplexity and long contexts: the Python language reference and ShareGPT answers.

    text = python_docs_text()                            # ~465 K characters of English prose
    docs = list(long_documents(min_chars=8000))          # Document(source, name, text), long ones
    ids = text_chunks(tokenizer, n_tokens=1024, count=8) # (8, 1024) token ids of real text

`pydoc_data.topics` (in every Python install) holds the language reference pages that `help()`
shows, as plain text keyed by topic name; topics are used in sorted-name order so every run sees
the same text. ShareGPT answers come from `workbench.data.sharegpt` (real, varied, partly code).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from workbench.errors import WorkbenchError

SOURCES = ("python_docs", "sharegpt", "all")
SEPARATOR = "\n\n"           # between documents in a token stream
SHAREGPT_CHUNK_MIN_CHARS = 2000  # ShareGPT answers shorter than this are not used for chunks


@dataclass(frozen=True)
class Document:
    """A piece of real text: `source` ('python_docs' or 'sharegpt'), a stable `name`, `text`."""

    source: str
    name: str
    text: str


def python_docs_topics() -> list[Document]:
    """The topics of `pydoc_data.topics` in sorted-name order (79 on Python 3.11)."""
    from pydoc_data.topics import topics

    return [Document("python_docs", name, topics[name].strip()) for name in sorted(topics)]


def python_docs_text() -> str:
    """All of `python_docs_topics()` as one string, topics in sorted-name order.

    Each topic's text begins with its own title (e.g. 'The "assert" statement').
    """
    return SEPARATOR.join(doc.text for doc in python_docs_topics())


def _sharegpt_answers(min_chars: int) -> Iterator[Document]:
    from workbench.data.sharegpt import load_sharegpt

    seen = set()  # the split file repeats some answers across the parts of a long conversation
    for conversation in load_sharegpt():
        for i, turn in enumerate(conversation.turns):
            if turn.role == "assistant" and len(turn.text) >= min_chars and turn.text not in seen:
                seen.add(turn.text)
                yield Document("sharegpt", f"{conversation.id}/{i}", turn.text)


def long_documents(min_chars: int = 4000,
                   sources: tuple[str, ...] = ("python_docs", "sharegpt")) -> Iterator[Document]:
    """Real documents of at least `min_chars` characters: Python docs topics, then ShareGPT
    assistant answers (named "<conversation id>/<turn index>", repeats dropped), in a stable order.

    For scale (Python 3.11): 15 Python topics and 6 distinct ShareGPT answers have 8,000
    characters or more (about 2,000 tokens).
    """
    unknown = set(sources) - {"python_docs", "sharegpt"}
    if unknown:
        raise WorkbenchError(f"Unknown text source(s) {sorted(unknown)}; use 'python_docs' "
                             "and/or 'sharegpt'.")
    if "python_docs" in sources:
        yield from (d for d in python_docs_topics() if len(d.text) >= min_chars)
    if "sharegpt" in sources:
        yield from _sharegpt_answers(min_chars)


def _documents(source: str) -> Iterator[Document]:
    if source not in SOURCES:
        raise WorkbenchError(f"Unknown text source {source!r}; use one of {', '.join(SOURCES)}.")
    if source in ("python_docs", "all"):
        yield from python_docs_topics()
    if source in ("sharegpt", "all"):
        yield from _sharegpt_answers(SHAREGPT_CHUNK_MIN_CHARS)


def text_chunks(tokenizer, n_tokens: int, count: int, source: str = "python_docs"):
    """`count` non-overlapping windows of exactly `n_tokens` token ids of real text.

    Returns a LongTensor of shape (count, n_tokens). The documents of `source` ('python_docs':
    every topic; 'sharegpt': assistant answers of 2,000+ characters; 'all': both) are tokenized
    one by one (each followed by a blank line, no special tokens) into one stream that is cut
    into consecutive windows, so the result is deterministic and the first k windows do not
    depend on `count`. Add a BOS token yourself if your model expects one. The Python 3.11 docs
    give 113,030 SmolLM2 tokens (110 windows of 1,024); other Python versions differ a little.
    """
    import torch

    if n_tokens < 1 or count < 1:
        raise WorkbenchError(f"n_tokens and count must be >= 1, got {n_tokens} and {count}.")
    needed = n_tokens * count
    stream: list[int] = []
    for doc in _documents(source):
        stream += tokenizer(doc.text + SEPARATOR, add_special_tokens=False,
                            verbose=False)["input_ids"]
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise WorkbenchError(f"Source {source!r} holds {len(stream):,} tokens: "
                             f"{len(stream) // n_tokens} windows of {n_tokens}, not {count}. "
                             "Ask for fewer or shorter windows, or use source='all'.")
    return torch.tensor(stream[:needed], dtype=torch.long).view(count, n_tokens)
