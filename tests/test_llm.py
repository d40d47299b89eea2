"""Chat backends: LocalChat on the embedded model, OpenAIChat against workbench.serve on loopback."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.llm import (
    ChatResult,
    LocalChat,
    OpenAIChat,
    api_root,
    find_stop,
    get_backend,
    safe_length,
)
from workbench.serve import start_server

pytestmark = pytest.mark.slow

PROMPT = "What is 2+2?"
MAX = 12
ENV = ("WORKBENCH_OPENAI_BASE_URL", "OPENAI_BASE_URL", "WORKBENCH_OPENAI_MODEL",
       "WORKBENCH_OPENAI_API_KEY", "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def local():
    return LocalChat()


@pytest.fixture(scope="module")
def reference(local) -> ChatResult:
    """The greedy reply every other path must reproduce."""
    return local.chat(PROMPT, max_tokens=MAX)


@pytest.fixture(scope="module")
def server(local):
    url, stop = start_server(local)
    yield url
    stop()


def _post(url: str, data: bytes, path: str = "/chat/completions"):
    req = urllib.request.Request(url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- stop-string helpers (pure Python) --------------------------------------------------------

def test_find_stop_and_safe_length():
    assert find_stop("abc END def", ["END", "c E"]) == 2
    assert find_stop("abc", ["x"]) is None
    assert safe_length("hello EN", ["END"]) == len("hello ")      # "EN" may grow into "END"
    assert safe_length("hello E", ["END", "Ex"]) == len("hello ")
    assert safe_length("hello", ["END"]) == 5
    assert safe_length("caf\ufffd", []) == 3                        # half-decoded character
    assert api_root("http://h:1") == "http://h:1/v1"
    assert api_root("http://h:1/v1/") == "http://h:1/v1"
    assert api_root("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"


# --- LocalChat ----------------------------------------------------------------------------------

def test_greedy_is_deterministic_and_matches_generate(local, reference):
    again = local.chat([{"role": "user", "content": PROMPT}], max_tokens=MAX)
    assert again.text == reference.text and reference.text.strip()
    # Same tokens as transformers' own greedy generate().
    ids = local.encode(PROMPT)
    out = local.model.generate(ids, max_new_tokens=MAX, do_sample=False)
    assert local.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == reference.text
    assert reference.prompt_tokens == ids.shape[1] > 0
    assert 0 < reference.completion_tokens <= MAX
    assert reference.seconds > 0 and reference.tokens_per_second > 0
    assert reference.finish_reason in ("stop", "length")
    assert (reference.backend, reference.model) == ("local", "SmolLM2-135M-Instruct")


def test_max_tokens_gives_length(local, reference):
    r = local.chat(PROMPT, max_tokens=3)
    assert (r.completion_tokens, r.finish_reason) == (3, "length")
    assert reference.text.startswith(r.text)


def test_stream_joins_to_chat_text(local, reference):
    reply = local.stream(PROMPT, max_tokens=MAX)
    with pytest.raises(WorkbenchError, match="still streaming"):
        _ = reply.result
    pieces = list(reply)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == reference.text
    r = reply.result
    assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason) == (
        reference.text, reference.prompt_tokens, reference.completion_tokens,
        reference.finish_reason)


def test_stop_strings_cut_text_chat_and_stream(local, reference):
    words = reference.text.split()
    assert len(words) >= 4, reference.text
    stop = " ".join(words[2:4])                 # spans several tokens
    want = reference.text[:reference.text.index(stop)]
    r = local.chat(PROMPT, max_tokens=MAX, stop=["never-appears", stop])
    assert (r.text, r.finish_reason) == (want, "stop")
    assert r.completion_tokens < reference.completion_tokens   # generation halted there
    reply = local.stream(PROMPT, max_tokens=MAX, stop=stop)
    assert "".join(reply) == want and reply.result.text == want


def test_seeded_sampling_repeats(local):
    a = local.chat(PROMPT, max_tokens=6, temperature=0.9, seed=7)
    b = local.chat(PROMPT, max_tokens=6, temperature=0.9, seed=7)
    assert a.text == b.text and a.completion_tokens == 6


def test_logits_processor_steers_decoding(local, reference):
    eos = local.tokenizer.eos_token_id

    def force_eos(input_ids, scores):                        # scores: (1, vocab)
        forced = torch.full_like(scores, -float("inf"))
        forced[:, eos] = 0.0
        return forced

    r = local.chat(PROMPT, max_tokens=MAX, logits_processor=[force_eos])
    assert (r.text, r.completion_tokens, r.finish_reason) == ("", 1, "stop")

    first = int(local.tokenizer(reference.text, add_special_tokens=False).input_ids[0])

    def ban_first(input_ids, scores):
        scores = scores.clone()
        scores[:, first] = -float("inf")
        return scores

    r = local.chat(PROMPT, max_tokens=3, logits_processor=[ban_first])
    assert not r.text.startswith(local.tokenizer.decode([first]))


def test_bad_arguments_are_clear(local):
    with pytest.raises(WorkbenchError, match="role"):
        local.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(WorkbenchError, match="max_tokens"):
        local.chat(PROMPT, max_tokens=0)
    with pytest.raises(WorkbenchError, match="temperature"):
        local.chat(PROMPT, temperature=-1)
    with pytest.raises(WorkbenchError, match="prompt is .* tokens"):
        local.chat("hello " * 9000)


# --- OpenAIChat against workbench.serve ----------------------------------------------------------

def test_openai_chat_matches_local(server, reference):
    remote = OpenAIChat(server)                  # model name read from GET /v1/models
    assert remote.model_name == "SmolLM2-135M-Instruct"
    r = remote.chat(PROMPT, max_tokens=MAX)
    assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason) == (
        reference.text, reference.prompt_tokens, reference.completion_tokens,
        reference.finish_reason)
    assert r.backend == "openai" and r.seconds > 0


def test_openai_stream_matches_local(server, reference):
    reply = OpenAIChat(server, model="anything").stream(PROMPT, max_tokens=MAX)
    pieces = list(reply)
    assert len(pieces) > 1 and "".join(pieces) == reference.text
    r = reply.result
    assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason) == (
        reference.text, reference.prompt_tokens, reference.completion_tokens,
        reference.finish_reason)


def test_openai_stop_strings(server, local, reference):
    stop = reference.text.split()[2]
    want = reference.text[:reference.text.index(stop)]
    remote = OpenAIChat(server, model="m")
    assert remote.chat(PROMPT, max_tokens=MAX, stop=stop).text == want
    assert "".join(remote.stream(PROMPT, max_tokens=MAX, stop=[stop])) == want


def test_get_backend(server, local, monkeypatch):
    assert isinstance(get_backend(server), OpenAIChat)
    assert get_backend(local) is local
    assert isinstance(get_backend(), LocalChat)          # no env: the embedded model (cached)
    monkeypatch.setenv("WORKBENCH_OPENAI_BASE_URL", server)
    backend = get_backend()
    assert isinstance(backend, OpenAIChat) and backend.base_url == server


def test_openai_errors(server):
    with pytest.raises(WorkbenchError, match="WORKBENCH_OPENAI_BASE_URL"):
        OpenAIChat()
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(WorkbenchError, match=rf"{url}/chat/completions: connection refused"):
        OpenAIChat(url, model="m").chat(PROMPT)
    with pytest.raises(WorkbenchError, match="connection refused"):
        OpenAIChat(url, model="m").stream(PROMPT)
    remote = OpenAIChat(server, model="m")
    # The server's own message comes through, with the status.
    with pytest.raises(WorkbenchError, match=r"HTTP 400: The prompt is \d+ tokens"):
        remote.chat("hello " * 9000)
    with pytest.raises(WorkbenchError, match=r"HTTP 400: The prompt is \d+ tokens"):
        remote.stream("hello " * 9000)
    with pytest.raises(WorkbenchError, match="only with LocalChat"):
        remote.chat(PROMPT, logits_processor=[lambda i, s: s])


def test_server_rejects_bad_requests(server):
    status, body = _post(server, b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, json.dumps({"model": "m"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _post(server, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": "lots"}).encode())
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = _post(server, b"{}", path="/completions")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server + "/nope", timeout=30)
    assert info.value.code == 404
    with urllib.request.urlopen(server + "/models", timeout=30) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == "SmolLM2-135M-Instruct"


class _Garbage(BaseHTTPRequestHandler):
    """A server that answers 200 with something that is not a chat completion."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html>proxy login</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_malformed_response_is_clear():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        remote = OpenAIChat(f"http://127.0.0.1:{srv.server_address[1]}", model="m")
        with pytest.raises(WorkbenchError, match="malformed reply"):
            remote.chat(PROMPT)
        with pytest.raises(WorkbenchError, match="stream ended without"):
            list(remote.stream(PROMPT))
    finally:
        srv.shutdown()
        srv.server_close()


def test_prefix_cache_reuses_the_last_call_and_keeps_the_text(local):
    """A second turn that extends the first prefills only the new tokens, with the same text."""
    cached = LocalChat(local.model, local.tokenizer, prefix_cache=True)
    turn = [{"role": "user", "content": PROMPT}]
    first = cached.chat(turn, max_tokens=MAX)
    assert first.cached_tokens == 0
    nxt = turn + [{"role": "assistant", "content": first.text},
                  {"role": "user", "content": "And 3+3?"}]
    second = cached.chat(nxt, max_tokens=MAX)
    plain = local.chat(nxt, max_tokens=MAX)
    assert second.text == plain.text and plain.cached_tokens == 0
    assert first.prompt_tokens < second.cached_tokens < second.prompt_tokens
    cached.clear_cache()
    assert cached.chat(nxt, max_tokens=2).cached_tokens == 0


def test_static_cache_gives_the_same_text_and_reuses_prefixes(local, reference):
    """LocalChat(static_cache=True) (the GPU decode path, eager here) writes the same greedy text
    as the plain loop and starts a follow-up turn from the kept prefix."""
    static = LocalChat(local.model, local.tokenizer, static_cache=True, static_len=256)
    assert static.chat(PROMPT, max_tokens=MAX).text == reference.text
    turn = [{"role": "user", "content": PROMPT},
            {"role": "assistant", "content": reference.text},
            {"role": "user", "content": "And 3+3?"}]
    second = static.chat(turn, max_tokens=MAX)
    assert second.text == local.chat(turn, max_tokens=MAX).text
    assert 0 < second.cached_tokens < second.prompt_tokens
    static.clear_cache()
    assert static.chat(turn, max_tokens=2).cached_tokens == 0
    with pytest.raises(WorkbenchError, match="static cache holds 256"):
        static.chat("word " * 300, max_tokens=2)
