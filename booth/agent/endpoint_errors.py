"""What an endpoint failure means to the user: the OpenAI SDK's and the HTTP library's errors,
and broken replies, turned into a retry (`Retry`, with what the notice says) or an
`EndpointError` that says what to do."""

from __future__ import annotations

from booth.agent import reply
from booth.agent.model import EndpointError
from booth.agent.settings import LOCAL_KEY, PRESETS, EndpointSettings, safe_url


class Retry(Exception):
    """A failure worth another try. `message` is what the user reads if tries run out,
    `short` what the retry notice says ("server busy (429)")."""

    def __init__(self, message: str, short: str, wait: float | None = None):
        super().__init__(message)
        self.short, self.wait = short, wait


def classify(err: Exception, settings: EndpointSettings) -> Exception | None:
    """The user-facing failure for an SDK/transport error or a broken reply: `Retry`,
    `EndpointError`, or None when `err` is no endpoint failure at all (a bug)."""
    import openai

    timeouts, transport, _ = _http_errors()
    url, model = safe_url(settings.base_url), settings.model
    if isinstance(err, reply.BrokenReply):
        return Retry(f"{url} sent a broken answer: it {err}", "broken answer")
    if _is_connect_failure(err):  # before timeouts: a connect timeout is one of them
        hint = PRESETS.get(settings.provider, PRESETS["vllm"]).start_hint
        return EndpointError(
            f"Could not reach the model endpoint at {url} ({_root_cause(err)}). Start the "
            f"server ({hint}), or point booth at another endpoint with --base-url or "
            f"--provider ({', '.join(PRESETS)})."
        )
    if isinstance(err, (openai.APITimeoutError, *timeouts)):
        return Retry(
            f"{url} did not answer within {settings.timeout:g} s (the model may still be "
            "loading or be overloaded; --timeout waits longer)", "no answer in time"
        )
    if isinstance(err, (openai.APIConnectionError, *transport)):
        return Retry(f"The connection to {url} broke ({_root_cause(err)})", "connection broke")
    if isinstance(err, openai.APIStatusError):
        return _status_failure(err, url, model, settings.api_key == LOCAL_KEY)
    if isinstance(err, openai.OpenAIError):  # anything else the SDK makes of a reply
        return EndpointError(f"{url} could not be used: {short(str(err))}")
    return None


def _status_failure(err, url: str, model: str, no_key: bool) -> Exception:
    status, message = err.status_code, server_message(err)
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
        short = f"server busy ({status})" if status == 429 else f"server error ({status})"
        return Retry(f"{url} {what} (HTTP {status}: {message})", short, _retry_after(err))
    return EndpointError(f"{url} rejected the request (HTTP {status}): {message}")


def server_message(err) -> str:
    """The server's own words: OpenAI, vLLM and Mistral each nest them a little differently."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            body = inner.get("message") or inner.get("detail") or inner
        else:
            body = inner
    return short(body if isinstance(body, str) else reply.as_text(body) if body else str(err))


def short(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    """(timeout, transport, connect-failure) error classes of the HTTP library under the SDK.

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
        tuple(c for m in modules for c in (m.ConnectError, m.ConnectTimeout)),
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
