"""Teacher forcing: make a local model write a given text, token by token, at its real speed.

    chat.chat(messages, logits_processor=[ForceText(tokenizer, "1. f(x=1)\\n")])

Used by the latency benchmark: the planner (or a ReAct step) writes exactly the reference plan,
so its time is the model's real prefill + decode time for that text, and the plan is right.
"""

from __future__ import annotations

import numpy as np
import torch


class ForceText:
    """Logits processor that allows only the next token of `text` (then only end-of-text)."""

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer(text, add_special_tokens=False).input_ids
        self.eos = tokenizer.eos_token_id
        self._prompt_len: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        i = input_ids.shape[1] - self._prompt_len
        target = self.ids[i] if i < len(self.ids) else self.eos
        out = np.full(tuple(scores.shape), -np.inf, dtype=np.float32)  # numpy: one thread
        out[:, target] = 0.0
        return torch.from_numpy(out).to(scores.device)
