"""A small OpenAI-compatible HTTP server over LocalChat (standard library only).

    python -m workbench.serve --port 8000                  # the embedded SmolLM2-135M-Instruct
    python -m workbench.serve --model /path/to/model --host 0.0.0.0 --port 8000
    export WORKBENCH_OPENAI_BASE_URL=http://127.0.0.1:8000/v1    # then get_backend() uses it

Endpoints: GET /v1/models, POST /v1/chat/completions (JSON, or SSE with `"stream": true`; usage in
the last event with `"stream_options": {"include_usage": true}`). Errors are OpenAI-style JSON:
{"error": {"message", "type", "param", "code"}} with status 400, 404, 413 or 500.
Requests are accepted concurrently, but one generation runs at a time (a lock): a 2-core CPU gains
nothing from interleaving, and techniques that hook into the model expect one caller.

In tests:  url, stop = start_server(LocalChat())  ->  "http://127.0.0.1:PORT/v1", stop()
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from workbench.errors import WorkbenchError
from workbench.llm import ChatResult, LocalChat

MAX_BODY = 8 * 1024 * 1024  # bytes


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _content_text(content, i: int) -> str:
    """OpenAI content is a string or a list of parts; only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported.",
                                   param="messages")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts.",
                       param="messages")


def parse_request(body: dict) -> dict:
    """Check a /v1/chat/completions body; return LocalChat keyword arguments plus the flags."""
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required: a non-empty list of "
                                "{'role': ..., 'content': ...} objects.", param="messages")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a 'role' string.",
                               param="messages")
        msgs.append({"role": m["role"], "content": _content_text(m.get("content"), i)})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = 256
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0  # the OpenAI default
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError(400, "Only n=1 is supported.", param="n")
    opts = body.get("stream_options") or {}
    return {"kwargs": {"messages": msgs, "max_tokens": max_tokens, "temperature": temperature,
                       "stop": body.get("stop"), "seed": body.get("seed")},
            "stream": bool(body.get("stream")),
            "include_usage": bool(isinstance(opts, dict) and opts.get("include_usage"))}


def _usage(r: ChatResult) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def make_handler(chat: LocalChat, lock: threading.Lock, verbose: bool = False):
    """A request handler class bound to one LocalChat and its generation lock."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "workbench-serve/0.1"

        def log_message(self, fmt, *args):  # quiet unless asked
            if verbose:
                super().log_message(fmt, *args)

        # -- plumbing ------------------------------------------------------------------------
        def _send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, err: RequestError) -> None:
            self._send_json(err.status, {"error": {"message": err.message, "type": err.kind,
                                                   "param": err.param, "code": None}})

        def _path(self) -> str:
            return self.path.split("?", 1)[0].rstrip("/")

        def _read_json(self):
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise RequestError(400, "A JSON body with a Content-Length header is required.")
            if int(length) > MAX_BODY:
                raise RequestError(413, f"The body is {length} bytes; the limit is {MAX_BODY}.")
            raw = self.rfile.read(int(length))
            try:
                return json.loads(raw)
            except ValueError as err:
                raise RequestError(400, f"The body is not valid JSON: {err}.") from None

        # -- endpoints -----------------------------------------------------------------------
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self._path() == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": chat.model_name, "object": "model", "created": 0,
                     "owned_by": "workbench"}]})
            elif self._path() in ("", "/health"):
                self._send_json(200, {"status": "ok", "model": chat.model_name})
            else:
                self._send_error(RequestError(404, f"Unknown path {self.path}; this server has "
                                              "GET /v1/models and POST /v1/chat/completions.",
                                              kind="not_found_error"))

        def do_POST(self):  # noqa: N802
            try:
                if self._path() != "/v1/chat/completions":
                    raise RequestError(404, f"Unknown path {self.path}; POST to "
                                            "/v1/chat/completions.", kind="not_found_error")
                req = parse_request(self._read_json())
                with lock:
                    try:
                        reply = chat.stream(**req["kwargs"])  # argument errors raise here
                    except WorkbenchError as err:
                        raise RequestError(400, str(err)) from None
                    if req["stream"]:
                        self._stream(reply, req["include_usage"])
                    else:
                        result = reply.collect()
                        self._send_json(200, self._completion(result))
            except RequestError as err:
                self._send_error(err)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; the stream generator is closed by then
            except Exception as err:  # noqa: BLE001 - report, keep serving
                self._send_error(RequestError(500, f"{type(err).__name__}: {err}", "server_error"))

        def _completion(self, r: ChatResult) -> dict:
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                    "created": int(time.time()), "model": r.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                                 "finish_reason": r.finish_reason}],
                    "usage": _usage(r)}

        def _stream(self, reply, include_usage: bool) -> None:
            cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(delta: dict, finish: str | None = None, usage: dict | None = None,
                      choices: bool = True) -> None:
                obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": chat.model_name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
                       if choices else []}
                if usage is not None:
                    obj["usage"] = usage
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

            with reply:  # closes the generator if the client drops the connection
                event({"role": "assistant", "content": ""})
                try:
                    for piece in reply:
                        event({"content": piece})
                except OSError:
                    raise  # the client went away
                except Exception as err:  # noqa: BLE001 - headers are sent: report in-stream
                    msg = {"error": {"message": f"{type(err).__name__}: {err}",
                                     "type": "server_error", "param": None, "code": None}}
                    self.wfile.write(f"data: {json.dumps(msg)}\n\n".encode())
                    return
                result = reply.result
            event({}, finish=result.finish_reason)
            if include_usage:
                event({}, usage=_usage(result), choices=False)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(chat: LocalChat | None = None, host: str = "127.0.0.1", port: int = 8000,
                verbose: bool = False) -> ThreadingHTTPServer:
    """An unstarted server (call .serve_forever()). chat defaults to the embedded model."""
    chat = chat or LocalChat()
    server = ThreadingHTTPServer((host, port), make_handler(chat, threading.Lock(), verbose))
    server.daemon_threads = True
    return server


def start_server(chat: LocalChat | None = None, host: str = "127.0.0.1", port: int = 0
                 ) -> tuple[str, Callable[[], None]]:
    """Serve in a background thread. Returns (base URL ending in /v1, stop function).

    port=0 picks a free port. stop() shuts the server down and frees the port.
    """
    server = make_server(chat, host, port)
    thread = threading.Thread(target=server.serve_forever, name="workbench-serve", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return f"http://{bound_host}:{bound_port}/v1", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workbench.serve",
                                     description="OpenAI-compatible chat server over a local model.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--model", default=None,
                        help="model name or path for load_model() (default: embedded SmolLM2)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    try:
        chat = LocalChat(args.model)
        server = make_server(chat, args.host, args.port, args.verbose)
    except WorkbenchError as err:
        parser.exit(1, f"error: {err}\n")
    except OSError as err:
        parser.exit(1, f"error: cannot listen on {args.host}:{args.port}: {err}\n")
    host, port = server.server_address[:2]
    print(f"Serving {chat.model_name} at http://{host}:{port}/v1  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
