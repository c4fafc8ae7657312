"""A real chat-completions server on loopback, answering from a script (for tests).

    from fakellm import FakeLLM, reply, call, calls, error, hang

    with FakeLLM([call("train", {"steps": 10}), reply("Done.")]) as llm:
        model = OpenAIChatModel(EndpointSettings(base_url=llm.base_url, model=llm.model))
        ...
        assert llm.requests[0]["temperature"] == 0.15

Each POST /v1/chat/completions consumes one step of the script. Steps are plain dicts built
by the helpers below: an assistant reply (text and/or tool calls, with raw argument strings
and ids exactly as given, even invalid ones), an HTTP error, or a hang. Replies are served as
one JSON body, or as server-sent events when the request says `"stream": true` — text split
over several chunks, each tool call's id and name first and its arguments in pieces, the way
vLLM streams them. Every request body is kept in `requests` (headers in `headers`). When the
script runs out, the server answers 500 with a body saying so, so a test fails loudly.

For hostile tests a step can also be broken on purpose: `raw(...)` sends any bytes,
`message(...)` any assistant message object (a null `function`, `tool_calls` as a string),
and `broken(step, how)` streams a reply that stops early or ends in an error event (or in
vLLM's tool-parser error, "parse_error"). `written(calls, form)` is a reply whose calls come
back as text, as from a server that does not parse them. GET /version, /api/version and
/props answer what `info` gives (else 404), so booth can ask what the server is.
"""

from __future__ import annotations

import json
import random
import string
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
PIECE = 7  # characters per streamed piece: small, so every reply spans several chunks


def _call_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


def reply(text: str, finish_reason: str = "stop") -> dict:
    """A step: the assistant answers with text only."""
    return {"kind": "reply", "text": text, "tool_calls": [], "finish_reason": finish_reason}


def call(name: str, args: dict | str, id: str | None = None) -> dict:
    """A step with one tool call. `args` as a dict is sent as JSON; a str is sent verbatim
    (so malformed arguments can be scripted). `id` defaults to a valid random 9-char id."""
    raw = args if isinstance(args, str) else json.dumps(args)
    return calls([{"id": id or _call_id(), "name": name, "arguments": raw}])


def calls(tool_calls: list[dict], text: str = "") -> dict:
    """A step with several tool calls (each a `call(...)` step or an {id, name, arguments}
    dict), optionally with text before them."""
    flat: list[dict] = []
    for item in tool_calls:
        flat.extend(item["tool_calls"] if item.get("kind") == "reply" else [item])
    return {"kind": "reply", "text": text, "tool_calls": flat, "finish_reason": "tool_calls"}


def error(status: int, message: str, retry_after_ms: int | None = 10) -> dict:
    """A step: an HTTP error with a vLLM-style JSON body. By default it asks the client to
    retry after 10 ms, so retry tests stay fast; None sends no retry header."""
    headers = {} if retry_after_ms is None else {"retry-after-ms": str(retry_after_ms)}
    return {"kind": "error", "status": status, "message": message, "headers": headers}


def hang(seconds: float = 2.0) -> dict:
    """A step: read the request, then answer nothing for `seconds` (at most 10) and drop the
    connection, for client timeouts."""
    return {"kind": "hang", "seconds": min(float(seconds), 10.0)}


def trickle(seconds: float = 3.0, every: float = 0.2) -> dict:
    """A step: a 200 event stream of keep-alive comments only, for `seconds` (at most 10)."""
    return {"kind": "trickle", "seconds": min(float(seconds), 10.0), "every": every}


def raw(body: bytes | str, content_type: str = "text/event-stream", status: int = 200) -> dict:
    """A step: exactly these bytes, whatever the request asked (garbage, HTML, not UTF-8)."""
    data = body.encode() if isinstance(body, str) else body
    return {"kind": "raw", "body": data, "content_type": content_type, "status": status}


def message(payload: Any, finish_reason: str | None = "tool_calls") -> dict:
    """A step: `payload` as the assistant message (or, streamed, as the one delta), however
    malformed, e.g. {"tool_calls": [{"id": "abcDEF123", "function": None}]}."""
    return {"kind": "message", "message": payload, "finish_reason": finish_reason}


def written(tool_calls: list[dict], form: str = "v11", text: str = "") -> dict:
    """A step whose calls (`call(...)` steps or {name, arguments} dicts) come back as text in
    `content`, after `text`: "v11" `[TOOL_CALLS]name[ARGS]{...}` one after the other,
    "marker_list" `[TOOL_CALLS][{"name":..., "arguments":...}]`, "list" the bare JSON list,
    "bare" `name{...}` (special tokens stripped)."""
    flat: list[dict] = []
    for item in tool_calls:
        flat.extend(item["tool_calls"] if item.get("kind") == "reply" else [item])
    def args(c):
        return c["arguments"] if isinstance(c["arguments"], str) else json.dumps(c["arguments"])
    listed = json.dumps([{"name": c["name"], "arguments": json.loads(args(c))} for c in flat])
    body = {"v11": "".join(f"[TOOL_CALLS]{c['name']}[ARGS]{args(c)}" for c in flat),
            "marker_list": "[TOOL_CALLS]" + listed, "list": listed,
            "bare": "".join(f"{c['name']}{args(c)}" for c in flat)}[form]
    return reply(text + body, "tool_calls" if form != "bare" else "stop")


BROKEN = ("cut", "no_finish", "no_done", "error_event", "empty_choices", "parse_error")
# What vLLM's Mistral tool parser said when it broke on a stream (vllm#20028).
PARSE_ERROR = ("Error trying to handle streaming tool call: partial_json_parser.core.exceptions"
               ".MalformedJSON: Malformed node or string on line 1")


def broken(step: dict, how: str) -> dict:
    """A streamed reply `step` broken `how`: "cut" (connection closed before the finish chunk
    and [DONE]), "no_finish" ([DONE] but no finish_reason), "no_done" (finish_reason but no
    [DONE], which is fine), "error_event" (an error event after the deltas),
    "empty_choices" (every chunk with `choices: []`), "parse_error" (after the deltas, an
    error event with code 500 naming partial_json_parser, then [DONE], as vLLM sends it).
    Served whole (not streamed), the step is the reply unbroken."""
    assert how in BROKEN, how
    return {**step, "broken": how}


class FakeLLM:
    """Context manager running the scripted server on 127.0.0.1 (a free port) in a thread.

    `models`: the model names served; a request for another gets vLLM's 404 without using a
    step. None (default) accepts any name. `served`: the model name its answers report
    (default: the one asked for). `info`: JSON bodies for GET paths at the server's root
    ("/version"), or `hang(...)`; every GET path asked is kept in `gets`, its headers in
    `get_headers`.
    """

    def __init__(self, script: list[dict], model: str = MODEL, models: list[str] | None = None,
                 served: str | None = None, info: dict[str, dict] | None = None,
                 control: dict[str, list[tuple[int, dict]]] | None = None):
        self.script = list(script)
        # POST paths besides chat completions (vLLM's /sleep, Ollama's /api/generate): each
        # answers (status, JSON body) in turn, the last one again once the rest are used.
        self.control = {path: list(answers) for path, answers in (control or {}).items()}
        self.log: list[str] = []  # "GET /path" / "POST /path" of every request, in order
        self.posted: list[tuple[str, dict]] = []
        self.model = model
        self.models = models
        self.served, self.info = served, dict(info or {})
        self.gets: list[str] = []
        self.get_headers: list[dict[str, str]] = []
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use FakeLLM as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def remaining(self) -> int:
        return len(self.script)

    def __enter__(self) -> FakeLLM:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True  # a hanging handler must not block shutdown
        # A short poll keeps shutdown (which waits for one poll) from adding 0.5 s per test.
        serve = self._server.serve_forever
        threading.Thread(target=serve, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def next_step(self, body: dict, headers: dict[str, str]) -> dict:
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in headers.items()})
            if self.script:
                return self.script.pop(0)
            count = len(self.requests)
        return error(500, f"FakeLLM script exhausted: request {count} has no scripted step")


def _handler_for(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        llm = fake

    return Handler


class _Handler(BaseHTTPRequestHandler):
    llm: FakeLLM

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.llm.log.append(f"GET {self.path}")
        self.llm.gets.append(self.path)
        self.llm.get_headers.append({k.lower(): v for k, v in self.headers.items()})
        answer = self.llm.info.get(self.path)
        if isinstance(answer, dict) and answer.get("kind") == "hang":  # a `hang(...)` step
            self.llm.stopping.wait(answer["seconds"])
            self.close_connection = True
            return None
        if self.path in self.llm.info:
            return self._json(200, answer)
        if self.path.rstrip("/") != "/v1/models":
            return self._json(404, _error_body(404, f"no route {self.path}"))
        names = self.llm.models or [self.llm.model]
        self._json(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.llm.log.append(f"POST {self.path}")
        if self.path in self.llm.control:
            self.llm.posted.append((self.path, body))
            answers = self.llm.control[self.path]
            status, answer = answers.pop(0) if len(answers) > 1 else answers[0]
            return self._json(status, answer)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._json(404, _error_body(404, f"no route {self.path}"))
        if self.llm.models is not None and body.get("model") not in self.llm.models:
            message = f"The model `{body.get('model')}` does not exist."
            return self._json(404, _error_body(404, message))
        step = self.llm.next_step(body, dict(self.headers))
        if step["kind"] == "error":
            return self._json(step["status"], _error_body(step["status"], step["message"]), step)
        if step["kind"] == "hang":
            self.llm.stopping.wait(step["seconds"])
            self.close_connection = True
            return None
        if step["kind"] == "raw":
            return self._raw(step)
        if step["kind"] == "trickle":
            return self._trickle(step)
        model = self.llm.served or body.get("model", self.llm.model)
        if step["kind"] == "message":
            return self._message(step, model, bool(body.get("stream")))
        if body.get("stream"):
            return self._stream(step, model)
        return self._json(200, _completion(step, model))

    def _json(self, status: int, payload: dict, step: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in ((step or {}).get("headers") or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _raw(self, step: dict) -> None:
        self.send_response(step["status"])
        self.send_header("Content-Type", step["content_type"])
        self.send_header("Content-Length", str(len(step["body"])))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(step["body"])
        self.close_connection = True

    def _trickle(self, step: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        ends = time.monotonic() + step["seconds"]
        while time.monotonic() < ends and not self.llm.stopping.is_set():
            try:
                self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
            except OSError:  # the client gave up
                break
            time.sleep(step["every"])
        self.close_connection = True

    def _message(self, step: dict, model: str, stream: bool) -> None:
        if not stream:
            choice = {"index": 0, "message": step["message"],
                      "finish_reason": step["finish_reason"]}
            return self._json(200, {**_head(model, "chat.completion"), "choices": [choice]})
        events = [_chunk(model, step["message"]), _chunk(model, {}, step["finish_reason"])]
        return self._events(events, done=True)

    def _stream(self, step: dict, model: str) -> None:
        how = step.get("broken")
        events = list(_chunks(step, model))
        if how in ("cut", "no_finish", "error_event", "parse_error"):
            events = events[:-1]  # the finish chunk
        if how == "error_event":
            events.append({"error": {"message": "CUDA out of memory", "code": 500}})
        if how == "parse_error":
            events.append({"error": {**_error_body(500, PARSE_ERROR)}})
        if how == "empty_choices":
            events = [{**e, "choices": []} for e in events]
        self._events(events, done=how not in ("cut", "no_done", "error_event"))

    def _events(self, events: list, done: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        if done:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        self.close_connection = True


def _error_body(status: int, message: str) -> dict:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}
    return {
        "object": "error",
        "message": message,
        "type": kind.get(status, "InternalServerError" if status >= 500 else "Error"),
        "param": None,
        "code": status,
    }


def _head(model: str, kind: str) -> dict:
    return {"id": "chatcmpl-fake", "object": kind, "created": int(time.time()), "model": model}


def _completion(step: dict, model: str) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": step["text"] or None}
    if step["tool_calls"]:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in step["tool_calls"]
        ]
    choice = {"index": 0, "message": message, "finish_reason": step["finish_reason"]}
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    return {**_head(model, "chat.completion"), "choices": [choice], "usage": usage}


def _pieces(text: str) -> list[str]:
    return [text[i : i + PIECE] for i in range(0, len(text), PIECE)]


def _chunk(model: str, delta: Any, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {**_head(model, "chat.completion.chunk"), "choices": [choice]}


def _chunks(step: dict, model: str):
    """The SSE chunks of one reply, in vLLM's order."""

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return _chunk(model, delta, finish)

    yield chunk({"role": "assistant", "content": ""})
    for piece in _pieces(step["text"]):
        yield chunk({"content": piece})
    for index, c in enumerate(step["tool_calls"]):
        first = {"index": index, "id": c["id"], "type": "function",
                 "function": {"name": c["name"]}}
        yield chunk({"tool_calls": [first]})
        for piece in _pieces(c["arguments"]):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, step["finish_reason"])
