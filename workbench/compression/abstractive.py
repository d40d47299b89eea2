"""Abstractive compression: the LLM backend writes a (question-aware) summary of the budget's
length.

Length control: on the local backend the end-of-turn token (and every special token) is banned
until the summary holds `budget` tokens, generation stops a few tokens later, and the text is cut
back to exactly `budget` reader tokens; a 4-gram no-repeat rule keeps a forced long summary from
looping. An OpenAI-compatible endpoint gets max_tokens instead (it may stop early: its achieved
ratio is then higher than asked, and the result says so in `info["short"]`).
"""

from __future__ import annotations

import torch

from workbench.compression.base import Compressor, count_tokens
from workbench.errors import WorkbenchError


class MinLengthNoRepeat:
    """Logits processor: no special tokens before `min_new` new tokens; no repeated 4-grams."""

    def __init__(self, prompt_len: int, min_new: int, banned: list[int], ngram: int = 4):
        self.prompt_len, self.min_new, self.banned, self.ngram = prompt_len, min_new, banned, ngram

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = ids[0, self.prompt_len:].tolist()  # ids: (1, seq); scores: (1, vocab)
        if len(new) < self.min_new:
            scores[:, self.banned] = float("-inf")
        k = self.ngram - 1
        if len(new) >= k:
            tail = new[-k:]
            for i in range(len(new) - k):
                if new[i:i + k] == tail:
                    scores[0, new[i + k]] = float("-inf")
        return scores


def summary_prompt(context: str, question: str | None, words: int) -> list[dict]:
    ask = (f"Summarize the document above in about {words} words. Keep every fact that is needed "
           f"to answer this question: {question.strip()}" if question else
           f"Summarize the document above in about {words} words. Keep the key facts.")
    return [{"role": "user", "content": f"Document:\n{context.strip()}\n\n{ask}"}]


class Abstractive(Compressor):
    """Query-aware summary through a chat backend (default: `workbench.llm.get_backend()`)."""

    name, family, question_aware = "abstractive", "abstractive", True

    def __init__(self, backend=None):
        self._backend = backend

    @property
    def backend(self):
        if self._backend is None:
            from workbench.llm import get_backend

            self._backend = get_backend()
        return self._backend

    def prepare(self, tokenizer, tok, question):
        return None

    def select(self, tokenizer, tok, question, state, budget):
        chat = self.backend
        messages = summary_prompt(tok.text, question, max(1, round(budget * 0.75)))
        processors = None
        if chat.backend == "local":
            prompt_len = chat.encode(messages).shape[1]
            if chat.max_positions and prompt_len + budget + 8 > chat.max_positions:
                raise WorkbenchError(
                    f"The summary prompt ({prompt_len} tokens) plus a {budget}-token summary "
                    f"exceed the model's {chat.max_positions} positions: use a higher ratio or a "
                    "shorter document.")
            banned = sorted(set(chat.tokenizer.all_special_ids) | chat.eos_ids)
            processors = [MinLengthNoRepeat(prompt_len, budget, banned)]
        reply = chat.chat(messages, max_tokens=budget + 8, logits_processor=processors)
        text = reply.text.strip()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > budget:
            text = tokenizer.decode(ids[:budget]).strip()
            if count_tokens(tokenizer, text) > budget:  # a re-split at the cut: drop one more
                text = tokenizer.decode(ids[:budget - 1]).strip()
        return text, [], {"generated_tokens": reply.completion_tokens,
                          "short": count_tokens(tokenizer, text) < 0.95 * budget,
                          "backend": chat.backend, "model": chat.model_name}
