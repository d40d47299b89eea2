"""Greedy-loop decoding with a static KV cache, one-token steps replayed from a CUDA graph.

    dec = StaticDecoder(model, max_len=4096)
    logits = dec.prefill(ids)     # (vocab,) float32 after the prompt ids (list of int)
    logits = dec.step(token)      # (vocab,) after one more token: a CUDA-graph replay on a GPU

Why: a decode step of a small model is ~1,000 tiny kernels (SmolLM2-135M: 30 layers), so on a
GPU its time is the host launching them, not the GPU running them: on the H200 machine an eager
step of SmolLM2-135M measured 27-68 ms, about what the 2-core CPU here needs. A CUDA graph
launches the whole step at once (gpt-fast's and vLLM's trick). The cache is transformers'
`StaticCache` (fixed addresses, written in place), so the graph replays against it; positions
past the current one hold stale keys that the causal mask hides.

Prefix reuse: `prefill` keeps the longest common token prefix with the previous call (the cache
already holds it) and runs only the rest, so a chat that grows turn by turn re-reads nothing.

Works on CPU too (eager steps on the same static cache: the tests check it against the dynamic
cache); the graph is used only on CUDA. Not thread-safe: one decoder serves one call at a time.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from workbench.errors import WorkbenchError


class StaticDecoder:
    """Prefill + one-token steps of a HF causal LM over a `StaticCache` of `max_len` positions."""

    def __init__(self, model, max_len: int, use_graph: bool | None = None):
        from transformers import StaticCache

        self.model = model
        self.max_len = int(max_len)
        self.device = next(model.parameters()).device
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.tokens: list[int] = []             # ids whose keys/values the cache holds
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)   # (1, 1)
        self._pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)   # (1, 1)
        self._graph = None
        self._graph_logits: torch.Tensor | None = None

    # -- cache position ---------------------------------------------------------------------

    def _set_length(self, k: int) -> None:
        """Make the cache hold the first k tokens (later slots are overwritten as it grows)."""
        for layer in self.cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if length is None:
                raise WorkbenchError("StaticDecoder needs transformers' StaticLayer with a "
                                     "cumulative_length counter (transformers 5.x).")
            if isinstance(length, torch.Tensor):
                length.fill_(k)
            else:
                layer.cumulative_length = k
        self.tokens = self.tokens[:k]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the last position. ids, positions (1, t) int64 -> (1, vocab)."""
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True,
                         **{self._cache_arg: self.cache}, **self._extra)
        return out.logits[:, -1, :]

    # -- public -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Run the prompt (reusing the common prefix with what the cache holds). -> (vocab,)"""
        n = len(ids)
        if n == 0 or n >= self.max_len:
            raise WorkbenchError(f"StaticDecoder: the prompt is {n} tokens; it must be between "
                                 f"1 and {self.max_len - 1} (max_len).")
        k = 0
        for a, b in zip(self.tokens, ids[:-1], strict=False):   # keep >= 1 token to run
            if a != b:
                break
            k += 1
        self._set_length(k)
        run = torch.tensor([ids[k:]], dtype=torch.long, device=self.device)        # (1, n - k)
        pos = torch.arange(k, n, device=self.device)[None]                          # (1, n - k)
        logits = self._forward(run, pos)
        self.tokens = list(ids)
        return logits[0].float()

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the next position. -> (vocab,) float32 logits after it."""
        n = len(self.tokens)
        if n == 0:
            raise WorkbenchError("StaticDecoder.step before prefill.")
        if n >= self.max_len:
            raise WorkbenchError(f"StaticDecoder: the cache is full ({self.max_len} positions).")
        self._ids.fill_(int(token))
        self._pos.fill_(n)
        if self.use_graph and self._graph is None:
            try:
                self._capture()
            except Exception as error:  # noqa: BLE001 - any capture failure: run eager instead
                warnings.warn(f"StaticDecoder: CUDA-graph capture failed ({type(error).__name__}: "
                              f"{str(error)[:200]}); decoding eagerly on the static cache.",
                              stacklevel=2)
                self.use_graph, self._graph = False, None
                self._set_length(n)
        if self.use_graph:
            self._graph.replay()
            logits = self._graph_logits
        else:
            logits = self._forward(self._ids, self._pos)
        self.tokens.append(int(token))
        return logits[0].float()

    def _capture(self) -> None:
        """Record one decode step on the static inputs (warm-up runs on a side stream first,
        as torch.cuda.graphs asks). The warm-up and capture write the same token at the same
        position as the real step, which overwrites it."""
        n = len(self.tokens)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._set_length(n)
                self._forward(self._ids, self._pos)
        torch.cuda.current_stream().wait_stream(stream)
        self._set_length(n)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._forward(self._ids, self._pos)
        self._graph = graph
        self._set_length(n)          # capture advanced nothing on the GPU, but be explicit
