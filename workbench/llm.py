"""One chat interface for every module that needs an LLM: a local HF model or any OpenAI endpoint.

    chat = get_backend()                         # LocalChat over the embedded SmolLM2-135M-Instruct,
                                                 # or OpenAIChat if WORKBENCH_OPENAI_BASE_URL is set
    r = chat.chat("Name a prime.", max_tokens=32, stop=["\\n"])
    r.text, r.prompt_tokens, r.completion_tokens, r.seconds, r.finish_reason

    reply = chat.stream([{"role": "user", "content": "Count to 5."}])
    for piece in reply:                          # text pieces as they are generated
        print(piece, end="")
    reply.result                                 # the ChatResult, once the stream is exhausted

`LocalChat` decodes token by token with the KV cache (no thread), greedy at temperature 0,
sampling otherwise; a `logits_processor` list (grammar-constrained decoding) hooks into each step.
`LocalChat(prefix_cache=True)` keeps the KV cache of the last call and reuses its longest common
token prefix with the next prompt (as llama.cpp's slot cache and vLLM's prefix caching do): a
multi-turn agent then pays prefill only for the new turn (`ChatResult.cached_tokens`).
`OpenAIChat` speaks POST /v1/chat/completions (JSON or SSE streaming) with the standard library.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

Messages = str | list[dict]
ENV_BASE_URL = ("WORKBENCH_OPENAI_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = "WORKBENCH_OPENAI_MODEL"
ENV_API_KEY = ("WORKBENCH_OPENAI_API_KEY", "OPENAI_API_KEY")
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class ChatResult:
    """One finished reply. Token counts are None only when a remote server did not report them."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float          # wall time of the whole call, prompt processing included
    finish_reason: str      # "stop" (end of turn or a stop string) | "length" (max_tokens reached)
    model: str
    backend: str            # "local" | "openai"
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens per wall second (prompt time included), or None if unknown."""
        if not self.completion_tokens or self.seconds <= 0:
            return None
        return self.completion_tokens / self.seconds


class StreamingReply:
    """Iterate for text pieces; `.result` holds the ChatResult once the iteration is exhausted.

    Wraps a generator that yields str and returns a ChatResult. Iterate it once. `close()` (or
    leaving a `with` block) stops generation early; `.result` then stays None.
    """

    def __init__(self, gen: Generator[str, None, ChatResult], on_close: Callable | None = None):
        self._gen = gen
        self._on_close = on_close
        self._result: ChatResult | None = None
        self._done = False

    def __iter__(self) -> Iterator[str]:
        if self._done:
            return
        try:
            self._result = yield from self._gen
        finally:
            self._done = True

    @property
    def result(self) -> ChatResult | None:
        """The ChatResult after the stream was read to the end; None if it was closed early."""
        if not self._done:
            raise WorkbenchError("The reply is still streaming: read it to the end (for piece in "
                                 "reply: ...) before asking for reply.result, or use chat().")
        return self._result

    def collect(self) -> ChatResult | None:
        """Read the rest of the stream and return its ChatResult."""
        for _ in self:
            pass
        return self.result

    def close(self) -> None:
        """Stop generating (for a remote server: drop the connection)."""
        self._gen.close()
        if self._on_close is not None:
            self._on_close()
        self._done = True

    def __enter__(self) -> StreamingReply:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChatBackend(ABC):
    """A chat model: `chat()` returns a ChatResult, `stream()` a StreamingReply."""

    backend = "abstract"
    model_name = "unknown"

    @abstractmethod
    def chat(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0,
             stop: str | Sequence[str] | None = None, seed: int | None = None,
             logits_processor: Sequence[Callable] | None = None) -> ChatResult:
        """Generate one reply. temperature 0 is greedy; stop strings end (and are cut from) it."""

    @abstractmethod
    def stream(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0,
               stop: str | Sequence[str] | None = None, seed: int | None = None,
               logits_processor: Sequence[Callable] | None = None) -> StreamingReply:
        """Like chat(), but yields text pieces as they come; the ChatResult is in `.result`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model_name!r})"


# ---------------------------------------------------------------------------------------------
# Shared argument checks and stop-string handling


def normalize_messages(messages: Messages) -> list[dict]:
    """A string becomes one user message; a list must hold {"role", "content"} dicts of str."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise WorkbenchError("messages must be a string or a non-empty list of "
                             "{'role': ..., 'content': ...} dicts.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise WorkbenchError(f"messages[{i}] must be a dict with 'role' and 'content'; got {m!r:.80}.")
        if m["role"] not in ROLES:
            raise WorkbenchError(f"messages[{i}] has role {m['role']!r}; use one of {list(ROLES)}.")
        if not isinstance(m["content"], str):
            raise WorkbenchError(f"messages[{i}]['content'] must be a string, "
                                 f"not {type(m['content']).__name__}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_args(max_tokens: int, temperature: float, stop, seed=None) -> list[str]:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise WorkbenchError(f"seed must be an integer or None, not {seed!r}.")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise WorkbenchError(f"max_tokens must be a positive integer, not {max_tokens!r}.")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise WorkbenchError(f"temperature must be a number >= 0 (0 = greedy), not {temperature!r}.")
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        raise WorkbenchError(f"stop must be a string or a list of strings, not {stop!r}.")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise WorkbenchError(f"stop must be a non-empty string or a list of them, not {stop!r}.")
    return stops


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stream_step(text: str, stops: Sequence[str], shown: int) -> tuple[str, bool, str, int]:
    """One step of streaming with stop strings, after `text` grew: (text, cut at the earliest
    stop; whether a stop was hit; the piece that can be shown now; how much is shown after)."""
    cut = find_stop(text, stops)
    if cut is not None:
        return text[:cut], True, "", shown
    end = safe_length(text, stops)
    return text, False, text[shown:end] if end > shown else "", max(shown, end)


def safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of text can be shown now: hold back a tail that may still grow into a stop
    string, and a trailing U+FFFD (a multi-byte character whose bytes are not all decoded yet)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                hold = max(hold, k)
                break
    return end - hold


# ---------------------------------------------------------------------------------------------
# Local Hugging Face model


def _common_prefix(a: list[int], b: list[int]) -> list[int]:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return a[:k]


class LocalChat(ChatBackend):
    """Chat with a loaded HF causal LM (default: the embedded SmolLM2-135M-Instruct).

    model: a loaded model (then pass its tokenizer too), a name/path for load_model(), or None.
    Decoding is a plain loop over the KV cache: one forward pass per token, no background thread.
    Not locked: calls from several threads run concurrently on the same weights; serialize them
    yourself if hooks or context managers change the model (workbench.serve does).
    prefix_cache: keep the last call's KV cache (one slot) and start the next call from the longest
    common token prefix; a concurrent call simply finds the slot empty. Reused prefill gives the
    same logits up to float rounding (greedy text can differ in rare near-ties). Call
    clear_cache() after changing the model's weights or hooks: the kept keys were made without.
    static_cache: decode over a static KV cache of `static_len` positions (default: the model's
    maximum, at most 4096), each one-token step replayed from a CUDA graph on a GPU
    (`workbench.static_decode`): a small model's decode step is ~1,000 kernel launches, which
    is what an eager GPU step spends its time on. Reuses the common prefix with the previous
    call like prefix_cache. Meant for GPUs (on a CPU every step attends over all static_len
    positions); a call made while another one is decoding falls back to the plain loop.
    """

    backend = "local"

    def __init__(self, model=None, tokenizer=None, name: str | None = None,
                 prefix_cache: bool = False, static_cache: bool = False,
                 static_len: int | None = None):
        from workbench.models import EMBEDDED_NAME, load_model

        if model is None or isinstance(model, str):
            if tokenizer is not None:
                raise WorkbenchError("LocalChat got a tokenizer but no model object; pass both, "
                                     "or neither to load the embedded model.")
            name = name or model or EMBEDDED_NAME
            model, tokenizer = load_model(model)
        elif tokenizer is None:
            raise WorkbenchError("LocalChat(model) needs the model's tokenizer too: "
                                 "LocalChat(model, tokenizer).")
        self.model, self.tokenizer = model, tokenizer
        self.model_name = name or os.path.basename(str(getattr(model.config, "name_or_path", "")
                                                       ).rstrip("/")) or type(model).__name__
        eos = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
        flat = set()
        for e in eos:
            flat.update(e if isinstance(e, (list, tuple)) else [e])
        self.eos_ids = {int(e) for e in flat if e is not None}
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        # transformers 5.x renamed forward's `past_key_values` to `cache`; accept either.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.prefix_cache = prefix_cache
        self._slot: tuple[list[int], object] | None = None    # (token ids, their KV cache)
        self._slot_lock = threading.Lock()
        self._decoder = None
        self._decoder_lock = threading.Lock()
        if static_cache:
            from workbench.static_decode import StaticDecoder

            self._decoder = StaticDecoder(model, static_len or min(self.max_positions or 4096,
                                                                   4096))

    def clear_cache(self) -> None:
        """Forget the kept prefix (e.g. between two agents that must not share it)."""
        with self._slot_lock:
            self._slot = None
        if self._decoder is not None:
            with self._decoder_lock:
                self._decoder.tokens = []

    def _take_prefix(self, ids: list[int]):
        """(k, cache holding ids[:k]) from the slot, or (0, None). Always leaves >= 1 id to run."""
        with self._slot_lock:
            slot, self._slot = self._slot, None
        if not self.prefix_cache or slot is None:
            return 0, None
        old, cache = slot
        k = 0
        for a, b in zip(old, ids[:-1], strict=False):
            if a != b:
                break
            k += 1
        layers = getattr(cache, "layers", None)
        if k == 0 or not layers or any(type(la).__name__ != "DynamicLayer" for la in layers):
            return 0, None            # only plain full-attention layers can be cut back safely
        for la in layers:
            if getattr(la, "keys", None) is not None and la.keys.numel():
                la.keys = la.keys[..., :k, :]        # (batch, kv_heads, k, head_dim)
                la.values = la.values[..., :k, :]
        return k, cache

    def _keep_prefix(self, ids: list[int], cache) -> None:
        if self.prefix_cache and cache is not None:
            with self._slot_lock:
                self._slot = (ids, cache)

    def encode(self, messages: Messages) -> torch.Tensor:
        """Prompt token ids for messages (chat template applied).  # (1, prompt_len) int64"""
        from workbench.models import chat_prompt

        prompt = chat_prompt(self.tokenizer, normalize_messages(messages))
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        return ids.to(self.model.device)

    def chat(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0,
             stop=None, seed: int | None = None, logits_processor=None) -> ChatResult:
        reply = self.stream(messages, max_tokens=max_tokens, temperature=temperature, stop=stop,
                            seed=seed, logits_processor=logits_processor)
        for _ in reply:
            pass
        return reply.result

    def stream(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0,
               stop=None, seed: int | None = None, logits_processor=None) -> StreamingReply:
        # Check arguments and build the prompt now, so mistakes raise here, not on first next().
        stops = _check_args(max_tokens, temperature, stop, seed)
        ids = self.encode(messages)
        if self.max_positions and ids.shape[1] >= self.max_positions:
            raise WorkbenchError(f"The prompt is {ids.shape[1]} tokens, but {self.model_name} "
                                 f"allows {self.max_positions} positions in all. Shorten it.")
        if self.max_positions:
            max_tokens = min(max_tokens, self.max_positions - ids.shape[1])
        if self._decoder is not None:
            if ids.shape[1] >= self._decoder.max_len:
                raise WorkbenchError(f"The prompt is {ids.shape[1]} tokens, but this LocalChat's "
                                     f"static cache holds {self._decoder.max_len} positions; "
                                     "pass a larger static_len.")
            max_tokens = min(max_tokens, self._decoder.max_len - ids.shape[1])
        return StreamingReply(self._generate(ids, max_tokens, float(temperature), stops, seed,
                                             list(logits_processor or [])))

    def _generate(self, ids, max_tokens, temperature, stops, seed, processors
                  ) -> Generator[str, None, ChatResult]:
        t0 = time.perf_counter()
        prompt_len = ids.shape[1]
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=ids.device)
            gen.manual_seed(seed if seed is not None else torch.seed())
        all_ids = ids[0].tolist()
        dec = self._decoder if self._decoder is not None \
            and self._decoder_lock.acquire(blocking=False) else None
        if dec is not None:
            cached, past = len(_common_prefix(dec.tokens, all_ids[:-1])), None
        else:
            cached, past = self._take_prefix(all_ids)
        step_in = ids[:, cached:]
        new: list[int] = []
        text, shown, finish = "", 0, "length"
        try:
            while len(new) < max_tokens:
                with torch.no_grad():  # per step: grad mode must not leak to the caller across yields
                    if dec is not None:    # static cache; one CUDA-graph replay per step on a GPU
                        scores = (dec.step(new[-1]) if new else dec.prefill(all_ids))[None]
                    else:
                        out = self.model(input_ids=step_in, use_cache=True,
                                         **{self._cache_arg: past}, **self._extra)
                        past = getattr(out, self._cache_arg)
                        scores = out.logits[:, -1, :].float()  # (1, vocab)
                    for proc in processors:
                        scores = proc(ids, scores)
                    if temperature > 0:
                        probs = torch.softmax(scores / temperature, dim=-1)
                        token = int(torch.multinomial(probs, 1, generator=gen))
                    else:
                        # numpy: one thread; a torch reduction over the vocabulary opens an OpenMP
                        # region that stalls when other processes hold the cores
                        token = int(scores[0].cpu().numpy().argmax())
                step_in = torch.tensor([[token]], device=ids.device)  # (1, 1)
                ids = torch.cat([ids, step_in], dim=1)  # (1, seq + 1)
                new.append(token)
                if token in self.eos_ids:
                    finish = "stop"
                    break
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                text, stopped, piece, shown = stream_step(text, stops, shown)
                if stopped:
                    finish = "stop"
                    break
                if piece:
                    yield piece
        finally:
            if dec is not None:
                self._decoder_lock.release()
            else:
                # the cache holds every id fed so far: the prompt and all new tokens but the last
                self._keep_prefix(all_ids + new[:-1], past)
        if len(text) > shown:  # the held-back tail (or a trailing U+FFFD at max_tokens)
            yield text[shown:]
        return ChatResult(text=text, prompt_tokens=prompt_len, completion_tokens=len(new),
                          seconds=time.perf_counter() - t0, finish_reason=finish,
                          model=self.model_name, backend=self.backend, cached_tokens=cached)


# ---------------------------------------------------------------------------------------------
# Any OpenAI-compatible HTTP endpoint


def _env(names) -> str | None:
    for n in (names,) if isinstance(names, str) else names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def api_root(base_url: str) -> str:
    """'http://host:8000' or 'http://host:8000/v1/' -> 'http://host:8000/v1'."""
    url = base_url.strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise WorkbenchError(f"Base URL {base_url!r} is not an http(s) URL; use e.g. "
                             "http://127.0.0.1:8000/v1.")
    return url if re.search(r"/v\d+[a-z]*$", url) else url + "/v1"


class OpenAIChat(ChatBackend):
    """Chat through POST {base_url}/chat/completions of an OpenAI-compatible server.

    base_url: like http://127.0.0.1:8000/v1 (a missing /v1 is added); default from
    WORKBENCH_OPENAI_BASE_URL, then OPENAI_BASE_URL. model: default WORKBENCH_OPENAI_MODEL, else
    the server's only model from GET /models. api_key: default WORKBENCH_OPENAI_API_KEY, then
    OPENAI_API_KEY (sent as a Bearer token). timeout: seconds to wait for each read.
    """

    backend = "openai"

    def __repr__(self) -> str:
        return f"OpenAIChat(base_url={self.base_url!r}, model={self._model!r})"

    def __init__(self, base_url: str | None = None, model: str | None = None,
                 api_key: str | None = None, timeout: float = 120.0):
        base_url = base_url or _env(ENV_BASE_URL)
        if not base_url:
            raise WorkbenchError(
                "OpenAIChat has no server URL. Pass base_url='http://HOST:PORT/v1' or set "
                f"{ENV_BASE_URL[0]} (or {ENV_BASE_URL[1]}). To serve the embedded model yourself: "
                "python -m workbench.serve --port 8000")
        self.base_url = api_root(base_url)
        self.api_key = api_key or _env(ENV_API_KEY)
        self.timeout = timeout
        self._model = model or _env(ENV_MODEL)

    @property
    def model_name(self) -> str:
        if self._model is None:
            self._model = self._only_model()
        return self._model

    def _only_model(self) -> str:
        try:
            data = json.loads(self._open("GET", "/models").read())
            ids = [m["id"] for m in data["data"]]
        except WorkbenchError as err:
            raise WorkbenchError(f"No model name given and GET {self.base_url}/models failed: "
                                 f"{err}. Pass model=... or set {ENV_MODEL}.") from None
        except (ValueError, KeyError, TypeError):
            raise WorkbenchError(f"GET {self.base_url}/models gave a malformed model list. "
                                 f"Pass model=... or set {ENV_MODEL}.") from None
        if len(ids) != 1:
            raise WorkbenchError(f"The server at {self.base_url} offers {len(ids)} models "
                                 f"({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}); pick "
                                 f"one with model=... or {ENV_MODEL}.")
        return ids[0]

    def _open(self, method: str, path: str, body: dict | None = None):
        """Send one request; return the open response, or raise a WorkbenchError that says why."""
        url = self.base_url + path
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise WorkbenchError(f"{method} {url} failed with HTTP {err.code}: "
                                 f"{_server_message(err)}") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, ConnectionRefusedError):
                raise WorkbenchError(f"Could not connect to {url}: connection refused. Is the "
                                     "server running on that host and port? (Start one with "
                                     "python -m workbench.serve --port PORT)") from None
            if isinstance(reason, socket.gaierror):
                raise WorkbenchError(f"Could not connect to {url}: unknown host "
                                     f"({reason}). Check the base URL.") from None
            if isinstance(reason, TimeoutError):
                raise WorkbenchError(f"{url} did not answer within {self.timeout} s "
                                     "(raise timeout=... for slow servers).") from None
            raise WorkbenchError(f"Could not connect to {url}: {reason}") from None
        except TimeoutError:
            raise WorkbenchError(f"{url} did not answer within {self.timeout} s "
                                 "(raise timeout=... for slow servers).") from None
        except OSError as err:
            raise WorkbenchError(f"Could not talk to {url}: {err}") from None

    def _body(self, messages, max_tokens, temperature, stop, seed, logits_processor, stream):
        if logits_processor:
            raise WorkbenchError("logits_processor runs inside the decoding loop, so it works only "
                                 "with LocalChat, not with a remote OpenAI-compatible server.")
        stops = _check_args(max_tokens, temperature, stop, seed)
        body = {"model": self.model_name, "messages": normalize_messages(messages),
                "max_tokens": max_tokens, "temperature": float(temperature)}
        if stops:
            body["stop"] = stops
        if seed is not None:
            body["seed"] = seed
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body, stops

    def chat(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0,
             stop=None, seed: int | None = None, logits_processor=None) -> ChatResult:
        body, stops = self._body(messages, max_tokens, temperature, stop, seed, logits_processor,
                                 stream=False)
        t0 = time.perf_counter()
        where = f"POST {self.base_url}/chat/completions"
        with self._open("POST", "/chat/completions", body) as resp:
            try:
                raw = resp.read()
            except OSError as err:  # includes TimeoutError
                raise WorkbenchError(f"{where}: reading the reply failed: {err!r}") from None
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            finish = choice.get("finish_reason") or "stop"
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise WorkbenchError(f"{where} returned a malformed reply (expected JSON with "
                                 f"choices[0].message.content): {raw[:200]!r}") from None
        cut = find_stop(text, stops)  # some servers leave the stop string in
        text = text if cut is None else text[:cut]
        return ChatResult(text=text, prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"),
                          seconds=time.perf_counter() - t0, finish_reason=_finish(finish),
                          model=data.get("model") or self.model_name, backend=self.backend)

    def stream(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0,
               stop=None, seed: int | None = None, logits_processor=None) -> StreamingReply:
        body, stops = self._body(messages, max_tokens, temperature, stop, seed, logits_processor,
                                 stream=True)
        t0 = time.perf_counter()
        resp = self._open("POST", "/chat/completions", body)  # connection errors raise here
        return StreamingReply(self._sse(resp, stops, t0), on_close=resp.close)

    def _sse(self, resp, stops: list[str], t0: float) -> Generator[str, None, ChatResult]:
        where = f"POST {self.base_url}/chat/completions"
        text, shown, finish, usage, model = "", 0, None, {}, None
        with resp:
            for raw in _lines(resp, where):
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, ": comments", "event:" lines
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    event = json.loads(payload)
                    if "error" in event:
                        raise WorkbenchError(f"{where} failed mid-stream: "
                                             f"{_error_text(event['error'])}")
                    model = event.get("model") or model
                    usage = event.get("usage") or usage
                    choices = event.get("choices") or []
                    delta = (choices[0].get("delta") or {}) if choices else {}
                    piece = delta.get("content") or ""
                    finish = (choices[0].get("finish_reason") if choices else None) or finish
                except (ValueError, TypeError, AttributeError, KeyError):
                    raise WorkbenchError(f"{where} sent a malformed stream event: "
                                         f"{payload[:200]!r}") from None
                text, stopped, piece, shown = stream_step(text + piece, stops, shown)
                if stopped:
                    finish = "stop"
                    break
                if piece:
                    yield piece
            else:
                if finish is None:
                    raise WorkbenchError(f"{where}: the stream ended without [DONE] or a "
                                         "finish_reason; the server may have crashed.")
        if len(text) > shown:
            yield text[shown:]
        return ChatResult(text=text, prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"),
                          seconds=time.perf_counter() - t0, finish_reason=_finish(finish or "stop"),
                          model=model or self.model_name, backend=self.backend)


def _lines(resp, where: str) -> Iterator[bytes]:
    """Lines of a streaming response; a dropped connection or a timeout becomes a WorkbenchError."""
    while True:
        try:
            line = resp.readline()
        except OSError as err:  # includes TimeoutError
            raise WorkbenchError(f"{where}: the stream broke off: {err!r}") from None
        if not line:
            return
        yield line


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _error_text(err) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def _server_message(err: urllib.error.HTTPError) -> str:
    """The server's own error message from an HTTP error body (OpenAI style, or plain text)."""
    try:
        raw = err.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        data = json.loads(raw)
        if isinstance(data, dict):
            if "error" in data:
                return _error_text(data["error"])
            if "detail" in data:  # FastAPI-style servers
                return str(data["detail"])
            if "message" in data:
                return str(data["message"])
    except ValueError:
        pass
    return raw.strip()[:500] or err.reason or "no message"


# ---------------------------------------------------------------------------------------------


def get_backend(spec: str | ChatBackend | None = None) -> ChatBackend:
    """Pick a chat backend.

    None: OpenAIChat if WORKBENCH_OPENAI_BASE_URL is set, else LocalChat over the embedded model.
    (OPENAI_BASE_URL alone does not switch: it is often set for other tools.)
    "http(s)://...": OpenAIChat at that URL.  "local"/"embedded": the embedded model.
    Any other string: LocalChat over load_model(spec).  A ChatBackend is returned as it is.
    """
    if isinstance(spec, ChatBackend):
        return spec
    if spec is None:
        return OpenAIChat() if os.environ.get(ENV_BASE_URL[0]) else LocalChat()
    if not isinstance(spec, str):
        raise WorkbenchError(f"get_backend() takes None, a URL, a model name or a ChatBackend; "
                             f"got {type(spec).__name__}.")
    if re.match(r"^https?://", spec):
        return OpenAIChat(base_url=spec)
    if spec == "openai":
        return OpenAIChat()
    if spec in ("local", "embedded"):
        return LocalChat()
    return LocalChat(spec)
