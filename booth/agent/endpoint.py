"""The live endpoint: `OpenAIChatModel`, a `ChatModel` over any OpenAI-compatible server."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from booth.agent import wire
from booth.agent.model import AssistantTurn, EndpointError, ToolCall
from booth.agent.settings import LOCAL_KEY, PRESETS, EndpointSettings, safe_url


class _Retry(Exception):
    """A failure worth another try; `message` is what the user reads if tries run out."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class OpenAIChatModel:
    """`ChatModel` over any OpenAI-compatible chat-completions endpoint, via the openai SDK.

    Each request is checked against Mistral's wire rules before it goes out. Failures become
    one `EndpointError` with a message saying what to do; 429, 5xx and timeouts are retried
    `max_retries` times with backoff (the server's retry-after wins). Returned tool calls
    carry ids that are already Mistral-valid and unique in the conversation, so the loop can
    answer them with `turn.tool_calls[i].id` and `wire.assistant_message(turn)` keeps them.
    """

    def __init__(self, settings: EndpointSettings, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self._sleep = sleep
        self._client = None

    def client(self):
        if self._client is None:
            import openai  # ~0.5 s: only when a live endpoint is actually used

            self._client = openai.OpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key,
                timeout=self.settings.timeout,
                max_retries=0,  # retries are ours: one policy, one message
            )
        return self._client

    def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        on_text: Callable[[str], None] | None = None,
    ) -> AssistantTurn:
        """One assistant turn; text chunks go to `on_text` as they stream in."""
        try:
            wire.check_request(messages, tools, self.settings.model)
        except wire.WireError as err:
            raise EndpointError(f"booth did not send the request: {err}") from None
        request = {"model": self.settings.model, "messages": messages, **self.settings.sampling()}
        if tools:
            request["tools"] = tools
        turn = self._with_retries(request, on_text)
        _normalize_ids(turn, messages)
        return turn

    def _with_retries(self, request: dict, on_text: Callable[[str], None] | None) -> AssistantTurn:
        tries = self.settings.max_retries + 1
        for attempt in range(tries):
            streamed: list[str] = []  # text already shown: a retry would show it twice

            def emit(text: str, streamed: list[str] = streamed) -> None:
                streamed.append(text)
                if on_text:
                    on_text(text)

            try:
                return self._send(request, emit)
            except Exception as err:
                failure = _classify(err, self.settings)
                if failure is None:
                    raise  # not an endpoint failure: a bug, keep its traceback
                if not isinstance(failure, _Retry):
                    raise failure from None
                if streamed:
                    raise EndpointError(f"The answer broke off mid-stream: {failure}") from None
                if attempt + 1 == tries:
                    raise EndpointError(f"{failure} (tried {tries} times)") from None
                self._sleep(_backoff(failure.wait, attempt, self.settings.retry_backoff))
        raise AssertionError("unreachable")

    def _send(self, request: dict, emit: Callable[[str], None]) -> AssistantTurn:
        create = self.client().chat.completions.create
        if not self.settings.stream:
            return _from_message(create(**request), safe_url(self.settings.base_url))
        # Closing the response (also on Ctrl-C) tells vLLM to stop generating.
        with create(**request, stream=True) as stream:
            return _from_stream(stream, emit)


def _from_message(response, url: str) -> AssistantTurn:
    if not getattr(response, "choices", None):
        raise EndpointError(f"{url} did not answer like a chat-completions endpoint.")
    choice = response.choices[0]
    calls = [
        ToolCall(call.id or "", call.function.name or "", _text(call.function.arguments))
        for call in choice.message.tool_calls or []
    ]
    return AssistantTurn(choice.message.content or "", calls, choice.finish_reason)


def _from_stream(stream, emit: Callable[[str], None]) -> AssistantTurn:
    """Assemble a streamed turn: text as it comes, tool calls accumulated by index.

    As vLLM streams them, a call's id and name come in its first delta and its arguments in
    pieces after; a server that sends a call whole in one delta works the same way.
    """
    text: list[str] = []
    slots: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices or []:  # the final usage chunk has no choices
            delta = choice.delta
            if delta and delta.content:
                text.append(delta.content)
                emit(delta.content)
            for part in (delta.tool_calls if delta else None) or []:
                index = part.index if part.index is not None else len(slots)
                slot = slots.setdefault(index, {"id": "", "name": "", "arguments": ""})
                slot["id"] = part.id or slot["id"]
                if part.function:
                    slot["name"] = part.function.name or slot["name"]
                    slot["arguments"] += _text(part.function.arguments)
            finish = choice.finish_reason or finish
    calls = [ToolCall(s["id"], s["name"], s["arguments"]) for _, s in sorted(slots.items())]
    return AssistantTurn("".join(text), calls, finish)


def _text(arguments: Any) -> str:
    """Arguments as text; a few servers send an object rather than its JSON text."""
    if arguments is None:
        return ""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _normalize_ids(turn: AssistantTurn, messages: list[dict]) -> None:
    """Give the turn's calls Mistral-valid ids unique in the conversation (in place)."""
    used = {m["tool_call_id"] for m in messages if m.get("tool_call_id")}
    for message in messages:
        used.update(c.get("id") for c in message.get("tool_calls") or [] if c.get("id"))
    for call in turn.tool_calls:
        call.id = wire.normalize_call_id(call.id, used)


def _backoff(server_wait: float | None, attempt: int, base: float) -> float:
    if server_wait is not None:
        return min(server_wait, 60.0)
    return min(base * 2**attempt, 30.0) * random.uniform(0.8, 1.2)


def _classify(err: Exception, settings: EndpointSettings) -> Exception | None:
    """The user-facing failure for an SDK/transport error: `_Retry`, `EndpointError`, or
    None when `err` is no endpoint failure at all."""
    import openai

    timeouts, transport, _ = _http_errors()
    url, model = safe_url(settings.base_url), settings.model
    if isinstance(err, (openai.APITimeoutError, *timeouts)):
        return _Retry(
            f"{url} did not answer within {settings.timeout:g} s (the model may still be "
            "loading or be overloaded; --timeout waits longer)"
        )
    if isinstance(err, (openai.APIConnectionError, *transport)):
        reason = _root_cause(err)
        if not _is_connect_failure(err):
            return _Retry(f"The connection to {url} broke ({reason})")
        hint = PRESETS.get(settings.provider, PRESETS["vllm"]).start_hint
        return EndpointError(
            f"Could not reach the model endpoint at {url} ({reason}). Start the server "
            f"({hint}), or point booth at another endpoint with --base-url or "
            f"--provider ({', '.join(PRESETS)})."
        )
    if isinstance(err, openai.APIStatusError):
        return _status_failure(err, url, model, settings.api_key == LOCAL_KEY)
    if isinstance(err, openai.APIError):  # an error event inside the stream
        return EndpointError(f"{url} reported an error while answering: {_server_message(err)}")
    return None


def _status_failure(err, url: str, model: str, no_key: bool) -> Exception:
    status, message = err.status_code, _server_message(err)
    if status in (401, 403):
        sent = "booth sent no key" if no_key else "the key was refused"
        return EndpointError(
            f"{url} answered HTTP {status} ({message}): {sent}. Set BOOTH_API_KEY "
            "(or MISTRAL_API_KEY for Mistral's API), or pass --api-key."
        )
    if status == 404:
        return EndpointError(
            f"{url} answered HTTP 404 for model {model!r} ({message}). GET {url}/models lists "
            "the models it serves: choose one with --model or BOOTH_MODEL (and check that "
            "--base-url ends in /v1)."
        )
    if status in (408, 429) or status >= 500:
        what = "is rate limiting requests" if status == 429 else "failed"
        return _Retry(f"{url} {what} (HTTP {status}: {message})", _retry_after(err))
    return EndpointError(f"{url} rejected the request (HTTP {status}): {message}")


def _server_message(err) -> str:
    """The server's own words: OpenAI, vLLM and Mistral each nest them a little differently."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            body = inner.get("message") or inner.get("detail") or inner
        else:
            body = inner
    text = body if isinstance(body, str) else json.dumps(body) if body else str(err)
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


def _retry_after(err) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms or retry-after), if it did."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return max(0.0, float(headers[name]) * scale)
        except (KeyError, TypeError, ValueError):  # absent, or an HTTP date: use our backoff
            continue
    return None


def _http_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(timeout, transport, connect) error classes of the HTTP library under the SDK.

    Errors raised while iterating a stream are not wrapped by the SDK. openai 1.x/2.x sit on
    httpx, 3.x on its fork httpx2: accept whichever is installed.
    """
    import importlib

    modules = []
    for name in ("httpx2", "httpx"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return (
        tuple(m.TimeoutException for m in modules),
        tuple(m.TransportError for m in modules),
        tuple(m.ConnectError for m in modules),
    )


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__


def _is_connect_failure(err: BaseException) -> bool:
    """Nothing listening / no such host: retrying will not help, starting a server will."""
    connect = _http_errors()[2]
    while err is not None:
        if isinstance(err, (*connect, ConnectionRefusedError)):
            return True
        err = err.__cause__
    return False
