"""The model side of the loop: one assistant turn from a list of messages.

`ChatModel` is what the loop talks to. `OpenAIChatModel` reaches a live OpenAI-compatible
endpoint (vLLM, Mistral, Ollama, llama.cpp); `ReplayModel` plays back the assistant turns of a
saved transcript, so replay and the demo drive the very same loop without any LLM.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from booth.agent import wire


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the raw text the model sent; it may not even be JSON


@dataclass
class AssistantTurn:
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


class EndpointError(Exception):
    """The endpoint could not answer (down, refused, rate limited after retries, 4xx).

    The message is complete and user-facing: which URL, what happened, what to do.
    """


class ChatModel(Protocol):
    def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        on_text: Callable[[str], None] | None = None,
    ) -> AssistantTurn:
        """One assistant turn. `on_text` receives text chunks as they stream in."""
        ...


# --- Where the model lives ------------------------------------------------------------------

VLLM_MODEL = "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
VLLM_SERVE = (
    f"vllm serve {VLLM_MODEL} --tokenizer-mode mistral --config-format mistral "
    "--load-format mistral --tool-call-parser mistral --enable-auto-tool-choice"
)


@dataclass(frozen=True)
class Preset:
    base_url: str
    model: str
    context_window: int
    needs_key: bool
    start_hint: str  # what to run when nothing answers at base_url


# Why these models and windows:
# - vllm: the open weights of Small 3.2 (128k context).
# - ollama: its library tag for Small 3.2. Ollama truncates prompts silently at the server's
#   num_ctx, which the OpenAI endpoint cannot change; start it with OLLAMA_CONTEXT_LENGTH=32768
#   and pass --context-window 32768, else booth assumes a modest 8k.
# - llamacpp: llama-server answers with whatever GGUF it loaded; the name is informational.
#   Its window is `-c`; 32k is what the hint below starts.
# - mistral: the hosted mistral-small-2506 (Small 3.2) was retired on 2026-07-31;
#   `mistral-small-latest` is the Small model Mistral serves now (Small 4, 128k+ context).
#   Pin another with --model / BOOTH_MODEL.
PRESETS: dict[str, Preset] = {
    "vllm": Preset("http://localhost:8000/v1", VLLM_MODEL, 131072, False, VLLM_SERVE),
    "ollama": Preset(
        "http://localhost:11434/v1", "mistral-small3.2:24b", 8192, False,
        "OLLAMA_CONTEXT_LENGTH=32768 ollama serve; ollama pull mistral-small3.2:24b",
    ),
    "llamacpp": Preset(
        "http://localhost:8080/v1", "Mistral-Small-3.2-24B-Instruct-2506", 32768, False,
        "llama-server -m <Mistral-Small-3.2 GGUF> --jinja -c 32768 --port 8080",
    ),
    "mistral": Preset(
        "https://api.mistral.ai/v1", "mistral-small-latest", 131072, True,
        "check your network connection and https://status.mistral.ai",
    ),
}
LOCAL_KEY = "EMPTY"  # local servers want no key, but the SDK insists on one


@dataclass
class EndpointSettings:
    """Everything needed to reach one OpenAI-compatible endpoint, and how to sample from it.

    Sampling parameters left at None are not sent, so the server's defaults apply.
    `repetition_penalty` is not an OpenAI parameter: vLLM takes it as an extra field,
    llama.cpp under its own name `repeat_penalty`; Ollama's OpenAI endpoint ignores it and
    Mistral's API documents no such field, so booth does not send it there.
    """

    base_url: str
    model: str
    api_key: str = field(default=LOCAL_KEY, repr=False)  # never in a repr, log or transcript
    provider: str = "vllm"
    temperature: float | None = 0.15  # Mistral's model card advice for Small 3.2
    top_p: float | None = None
    max_tokens: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = True
    timeout: float = 120.0  # seconds without a byte from the server (per read) before giving up
    max_retries: int = 3  # on 429, 5xx and timeouts; booth retries itself, the SDK never does
    retry_backoff: float = 1.0  # seconds before the first retry, doubling, unless the server says
    context_window: int = 131072  # tokens the server accepts, prompt and reply together

    @property
    def reply_reserve(self) -> int:
        """Tokens to keep free for the reply when fitting the history."""
        return self.max_tokens or min(4096, self.context_window // 4)

    def sampling(self) -> dict[str, Any]:
        """The request's sampling fields: OpenAI ones at top level, others in `extra_body`."""
        names = ("temperature", "top_p", "max_tokens", "frequency_penalty", "presence_penalty")
        params: dict[str, Any] = {n: getattr(self, n) for n in names}
        params = {name: value for name, value in params.items() if value is not None}
        extra_name = {"vllm": "repetition_penalty", "llamacpp": "repeat_penalty"}.get(self.provider)
        if self.repetition_penalty is not None and extra_name:
            params["extra_body"] = {extra_name: self.repetition_penalty}
        return params

    def describe(self) -> str:
        """One line for the transcript header and the banner. Never contains the key."""
        parts = [f"{self.model} at {_safe_url(self.base_url)} ({self.provider})"]
        parts.append("key set" if self.api_key and self.api_key != LOCAL_KEY else "no key")
        sampling = {k: v for k, v in self.sampling().items() if k != "extra_body"}
        if self.repetition_penalty is not None:
            sent = "extra_body" in self.sampling()
            sampling["repetition_penalty"] = (
                self.repetition_penalty if sent else f"{self.repetition_penalty} (not sent: "
                f"{self.provider} does not take it)"
            )
        parts += [f"{k} {v}" for k, v in sampling.items()]
        parts.append("streaming" if self.stream else "not streaming")
        parts.append(f"context {self.context_window} tokens")
        return ", ".join(parts)


def _safe_url(url: str) -> str:
    """The URL without any user:password@ part, for display."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _guess_provider(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.hostname == "api.mistral.ai":
        return "mistral"
    return {11434: "ollama", 8080: "llamacpp"}.get(parts.port or 0, "vllm")


def resolve_settings(env: Mapping[str, str] | None = None, **cli_options: Any) -> EndpointSettings:
    """Settings from flags > environment > the provider's preset.

    `cli_options` are EndpointSettings fields (None means "flag not given"). Environment:
    BOOTH_PROVIDER, BOOTH_BASE_URL, BOOTH_MODEL, BOOTH_API_KEY, and MISTRAL_API_KEY as the
    key for Mistral's API only (a Mistral key is never handed to another server). With no
    provider or URL at all, a local vLLM is assumed, even when MISTRAL_API_KEY is set: the
    hosted Small 3.2 is retired, and quietly switching to another model would surprise.
    Raises EndpointError for an unknown provider or a missing key.
    """
    env = os.environ if env is None else env
    known = {f.name for f in fields(EndpointSettings)}
    unknown = set(cli_options) - known
    if unknown:
        raise TypeError(f"unknown endpoint options: {sorted(unknown)}")
    given = {k: v for k, v in cli_options.items() if v is not None}
    base_url = given.get("base_url") or env.get("BOOTH_BASE_URL")
    provider = given.get("provider") or env.get("BOOTH_PROVIDER")
    if not provider:
        provider = _guess_provider(base_url) if base_url else "vllm"
    if provider not in PRESETS:
        raise EndpointError(f"Unknown provider {provider!r}: choose one of {', '.join(PRESETS)}.")
    preset = PRESETS[provider]
    key = given.get("api_key") or env.get("BOOTH_API_KEY")
    if not key and provider == "mistral":
        key = env.get("MISTRAL_API_KEY")
    if not key and preset.needs_key:
        raise EndpointError(
            f"{provider} needs an API key: set MISTRAL_API_KEY (or BOOTH_API_KEY), "
            "or pass --api-key."
        )
    settings = EndpointSettings(
        base_url=(base_url or preset.base_url).rstrip("/"),
        model=given.get("model") or env.get("BOOTH_MODEL") or preset.model,
        api_key=key or LOCAL_KEY,
        provider=provider,
        context_window=preset.context_window,
    )
    rest = {k: v for k, v in given.items() if k not in ("base_url", "model", "api_key", "provider")}
    return replace(settings, **rest)


# --- The live endpoint ------------------------------------------------------------------------


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
            return _from_message(create(**request), self.settings.base_url)
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
    url, model = settings.base_url, settings.model
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


# --- Models without an endpoint ---------------------------------------------------------------


class ScriptedModel:
    """Answers with the given turns in order, recording what it was sent (for tests)."""

    def __init__(self, turns: list[AssistantTurn]):
        self.turns = list(turns)
        self.requests: list[tuple[list[dict], list[dict]]] = []

    def complete(self, messages, tools, on_text=None) -> AssistantTurn:
        self.requests.append((list(messages), list(tools)))
        if not self.turns:
            raise EndpointError(
                f"The scripted model has no turn left (it was asked {len(self.requests)} times)."
            )
        turn = self.turns.pop(0)
        if on_text and turn.content:
            on_text(turn.content)
        return turn


class ReplayModel(ScriptedModel):
    """Plays back the assistant turns recorded in a transcript, in order."""

    def complete(self, messages, tools, on_text=None) -> AssistantTurn:
        if not self.turns:
            raise EndpointError(
                "The transcript has no more recorded assistant turns: the replay asked the "
                f"model for turn {len(self.requests) + 1}, but the session recorded "
                f"{len(self.requests)}. The conversation went differently from the recording."
            )
        return super().complete(messages, tools, on_text)
