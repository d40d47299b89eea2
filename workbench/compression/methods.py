"""The registry of compression methods and the one `compress` function over all of them."""

from __future__ import annotations

from workbench.compression.abstractive import Abstractive
from workbench.compression.base import CompressionResult, Compressor, NoCompression, Truncate
from workbench.compression.extractive import Extractive
from workbench.compression.token_pruning import TokenPruning
from workbench.errors import WorkbenchError

FACTORIES = {
    "none": NoCompression,
    "truncate": Truncate,
    **{f"{g}-{r}": (lambda g=g, r=r: Extractive(g, r))
       for g in ("sentence", "paragraph") for r in ("bm25", "minilm", "lm")},
    "abstractive": Abstractive,
    "llmlingua": lambda: TokenPruning(contrastive=False),
    "longllmlingua": lambda: TokenPruning(contrastive=True),
}
METHODS = tuple(FACTORIES)
DESCRIPTIONS = {
    "none": "no compression (the full context)",
    "truncate": "keep the first tokens",
    "sentence-bm25": "extractive, sentences ranked by BM25",
    "sentence-minilm": "extractive, sentences ranked by MiniLM similarity",
    "sentence-lm": "extractive, sentences ranked by log p(question | sentence)",
    "paragraph-bm25": "extractive, paragraphs ranked by BM25",
    "paragraph-minilm": "extractive, paragraphs ranked by MiniLM similarity",
    "paragraph-lm": "extractive, paragraphs ranked by log p(question | paragraph)",
    "abstractive": "query-aware summary written by the LLM",
    "llmlingua": "token pruning by self-information (LLMLingua-style)",
    "longllmlingua": "token pruning by question-contrastive perplexity (LongLLMLingua-style)",
}
_CACHE: dict[str, Compressor] = {}


def get_compressor(method: str) -> Compressor:
    """The compressor registered as `method` (one shared instance per name)."""
    if method not in FACTORIES:
        raise WorkbenchError(f"Unknown compression method {method!r}; use one of "
                             f"{', '.join(METHODS)}.")
    if method not in _CACHE:
        _CACHE[method] = FACTORIES[method]()
    return _CACHE[method]


def compress(context: str, question: str | None = None, target=4.0,
             method: str = "sentence-minilm", tokenizer=None) -> CompressionResult:
    """Compress `context` to `target` (a ratio like 4.0 or '4x', or Target(tokens=N)).

    The question is never compressed; question-aware methods use it to decide what to keep.
    Token counts use `tokenizer` (default: the embedded SmolLM2's, the default reader's).
    """
    if tokenizer is None:
        from workbench.models import load_model

        tokenizer = load_model()[1]
    return get_compressor(method).compress(tokenizer, context, question, target)
