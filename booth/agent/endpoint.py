"""The live endpoint: `OpenAIChatModel`, a `ChatModel` over any OpenAI-compatible server."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from booth.agent import reply, servers, text_calls, wire
from booth.agent.endpoint_errors import Retry, classify, server_message, short
from booth.agent.masking import Masker
from booth.agent.model import AssistantTurn, EndpointError
from booth.agent.settings import EndpointSettings, safe_url


def _ignore(*args: Any, **kwargs: Any) -> None:
    pass


class OpenAIChatModel:
    """`ChatModel` over any OpenAI-compatible chat-completions endpoint, via the openai SDK.

    Each request is checked against Mistral's wire rules before it goes out. What comes back
    is read by `booth.agent.reply`, which trusts nothing: a broken reply (not JSON, cut off
    before the model finished, empty) is retried like 429, 5xx and timeouts, `max_retries`
    times with backoff (the server's retry-after wins), then becomes one `EndpointError`
    saying what to do. A call from a reply that did not finish is never returned.
    While booth waits, `on_status` hears how long and for what; the wait for an answer to
    begin ends after `first_token_timeout` seconds, all tries together.
    Tool-call ids are returned as the server sent them: `wire.assistant_message` makes them
    Mistral-valid and unique, and the loop answers each call with the id in that message.
    Every message shown has the known secrets (key, URL password) masked.
    A server that does not parse Mistral's calls hands them back as text: they are read as
    calls (`booth.agent.text_calls`), never shown as prose, and the user is told once how to
    fix the server. A stream that broke where the server's tool-call streaming does (vllm
    #20028) is asked again whole, and the session streams no more. The first turn says what
    the server is (`servers.identify`).
    """

    def __init__(self, settings: EndpointSettings, sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self._sleep = sleep
        self._client = None
        self._mask = Masker(settings.secrets())
        self.streaming = settings.stream  # off for good once the server's tool streaming broke
        self._identified = False  # the server is asked what it is once, after its first answer
        self._server_kind: str | None = None  # a provider name, when the server said
        self._told_text_calls = False
        self._notices: list[str] = []  # for the next turn returned

    def client(self):
        if self._client is None:
            import openai  # ~0.5 s: only when a live endpoint is actually used

            self._client = openai.OpenAI(
                # user:password@ in the URL would make the HTTP library send Basic auth in
                # place of the Bearer key: it is sent nowhere (see EndpointSettings).
                base_url=safe_url(self.settings.base_url),
                api_key=self.settings.api_key,
                max_retries=0,  # retries are ours: one policy, one message
            )
        return self._client

    def complete(
        self,
        messages: list[dict],
        tools: list[dict],
        on_text: Callable[[str], None] | None = None,
        on_status: Callable[..., None] | None = None,
    ) -> AssistantTurn:
        """One assistant turn; text chunks go to `on_text` as they stream in (the whole
        text at once when not streaming); what booth waits for goes to `on_status`.
        Calls the server wrote as text are read as calls (`booth.agent.text_calls`), and
        never shown as text."""
        try:
            wire.check_request(messages, tools, self.settings.model)
        except wire.WireError as err:
            raise EndpointError(f"booth did not send the request: {err}") from None
        request = {"model": self.settings.model, "messages": messages, **self.settings.sampling()}
        if tools:
            request["tools"] = tools
        status, show = on_status or _ignore, on_text or _ignore
        waiting = Waiting(status, self._mask, f"waiting for the model at {self._url}",
                          self.settings.first_token_timeout)
        screen = _Screen(lambda text: self._show(show, text, final=False))
        try:
            turn, form = self._with_retries(request, screen, text_calls.tool_names(tools),
                                            status, waiting)
        finally:
            waiting.stop()
            status(None)
            self._show(show, "")  # whatever ends the turn, text held by the masker is shown
        return self._annotated(turn, form)

    @property
    def _url(self) -> str:
        return safe_url(self.settings.base_url)

    def _with_retries(self, request: dict, screen: _Screen, names: set[str],
                      on_status: Callable[..., None], waiting: Waiting
                      ) -> tuple[AssistantTurn, str | None]:
        settings = self.settings
        tries = settings.max_retries + 1
        deadline = time.monotonic() + settings.first_token_timeout
        attempt = 1
        while True:
            if deadline - time.monotonic() <= 0:
                raise EndpointError(self._mask(self._gave_up(attempt - 1)))
            try:
                return self._send(request, screen, names, waiting, deadline)
            except Exception as err:
                if self.streaming and _broke_tool_streaming(err):
                    self._stop_streaming(err, waiting)  # the same request again, not streamed
                    continue
                failure = classify(err, settings)
                if failure is None:
                    raise  # not an endpoint failure: a bug, keep its traceback
                if not isinstance(failure, Retry):
                    raise EndpointError(self._mask(str(failure))) from None
                if time.monotonic() >= deadline - 0.05:
                    raise EndpointError(self._mask(self._gave_up(attempt))) from None
                if attempt == tries:
                    raise EndpointError(self._mask(f"{failure} ({_tries(tries)})")) from None
                wait = min(_backoff(failure.wait, attempt - 1, settings.retry_backoff),
                           max(0.0, deadline - time.monotonic()))
                on_status(self._mask(f"{failure.short}, retrying in {wait:.0f} s, "
                                     f"{attempt}/{settings.max_retries}"), lasting=True)
                waiting.start()
                screen.forget()  # after the retry line, the answer is shown from its start
                self._sleep(wait)
                attempt += 1

    def _stop_streaming(self, err: Exception, waiting: Waiting) -> None:
        """vllm#20028: the server's streamed tool calls broke, its whole answers work. The
        broken stream's calls are dropped; the user reads why with the turn."""
        self.streaming = False
        why = err.args[0] if isinstance(err, _ToolStreamBroke) else server_message(err)
        self._notices.append(self._mask(servers.STREAM_FALLBACK_NOTICE.format(
            why=short(str(why), 200))))
        waiting.what = f"waiting for the whole answer (not streaming) at {self._url}"

    def _annotated(self, turn: AssistantTurn, form: str | None) -> AssistantTurn:
        """The turn with what booth learned of the server: who it is (first turn only) and
        the notices due (each said once a session)."""
        if not self._identified:
            self._identified = True
            found = servers.identify(self.settings.base_url, self.settings.provider)
            self._server_kind = found.pop("provider", None)
            server = {"model": turn.served_model, **found}
            turn.server = {k: v for k, v in server.items() if v is not None} or None
        if form and not self._told_text_calls:
            self._told_text_calls = True
            self._notices.append(servers.text_calls_notice(form, self._server_kind))
        if turn.finish_reason == "length":  # a call cut mid-way reads as broken JSON
            limit = self.settings.max_tokens
            where = f"--max-tokens {limit}" if limit else "the server's default"
            self._notices.append(f"the model's answer was cut off at the token limit ({where}):"
                                 " pass a larger --max-tokens if calls or answers end mid-way")
        turn.notices, self._notices = self._notices, []
        return turn

    def _gave_up(self, tries: int) -> str:
        return (f"{self._url} did not begin answering within "
                f"{self.settings.first_token_timeout:g} s ({_tries(tries)}; the model may "
                "still be loading or be overloaded; --first-token-timeout waits longer)")

    def _send(self, request: dict, screen: _Screen, names: set[str], waiting: Waiting,
              deadline: float) -> tuple[AssistantTurn, str | None]:
        import openai

        read = min(self.settings.timeout, deadline - time.monotonic())
        timeout = openai.Timeout(read, connect=self.settings.connect_timeout)
        create = self.client().chat.completions.with_streaming_response.create
        waiting.start()
        screen.new_try()
        if not self.streaming:
            with create(**request, timeout=timeout) as response:
                turn, form = text_calls.read_calls(reply.turn_from_body(response.read()), names)
            waiting.stop()
            screen.feed(turn.content)
            return turn, form
        # Closing the response (also on Ctrl-C) tells vLLM to stop generating.
        with create(**request, stream=True, timeout=timeout) as response:
            reader, held = reply.StreamReader(), text_calls.Holdback(names)
            try:
                chunks = _begun_by(response.iter_bytes(), reader, deadline, waiting.stop)
                for piece in reader.read(chunks):
                    waiting.stop()
                    screen.feed(held.feed(piece))
                turn, form = text_calls.read_calls(reader.turn(), names)
            except reply.BrokenReply as err:
                if reader.error and (reader.slots or servers.names_parser_error(reader.error)):
                    raise _ToolStreamBroke(reader.error) from None
                if reader.events:
                    raise
                kind = response.headers.get("content-type") or "no Content-Type"
                raise reply.BrokenReply(f"{err} (it sent {kind})") from None
        if form is None:  # text held back as a possible call was prose after all
            screen.feed(held.rest())
        return turn, form

    def _show(self, on_text: Callable[[str], None], text: str, final: bool = True) -> None:
        """Text to the user with secrets masked (a secret split over chunks included)."""
        shown = self._mask.feed(text) + (self._mask.flush() if final else "")
        if shown:
            on_text(shown)


class _Screen:
    """This turn's text as the user has seen it, over all tries: a later try shows only what
    goes past what an earlier one showed (when it begins the same way), so a retried or
    re-asked answer is not printed twice."""

    def __init__(self, show: Callable[[str], None]):
        self.show, self.seen, self.now = show, "", ""

    def new_try(self) -> None:
        self.now = ""

    def forget(self) -> None:
        self.seen = ""

    def feed(self, text: str) -> None:
        if not text:
            return
        self.now += text
        if self.seen.startswith(self.now):
            return
        fresh = self.now[len(self.seen):] if self.now.startswith(self.seen) else "\n" + self.now
        self.seen = self.now
        self.show(fresh)


class Waiting:
    """Tells `on_status`, once a second, how long booth has waited for the model's answer,
    from a background thread, between `start` and `stop` (the clock runs from creation, so
    it counts every try)."""

    def __init__(self, on_status: Callable[..., None], mask: Callable[[str], str], what: str,
                 limit: float, first_after: float = 2.0):
        self.on_status, self.mask, self.what, self.limit = on_status, mask, what, limit
        self.first_after = first_after
        self.started = time.monotonic()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._tick, args=(self._stop,), daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.on_status(None)

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(max(0.05, min(1.0, self.started + self.first_after
                                          - time.monotonic()))):
            waited = time.monotonic() - self.started
            if waited >= self.first_after:
                self.on_status(self.mask(f"{self.what}… {waited:.0f} s "
                                         f"(gives up at {self.limit:g} s)"))


def _begun_by(chunks: Iterator[bytes], reader: reply.StreamReader, deadline: float,
              begun: Callable[[], None]) -> Iterator[bytes]:
    """The stream's bytes, ended once the deadline passes with no answer begun: a proxy's
    keep-alive comments would otherwise reset every read timeout forever. `begun()` is
    called once the answer has begun, text or tool call (the waiting line then ends)."""
    for chunk in chunks:
        if reader.begun:
            begun()
        elif time.monotonic() > deadline:
            raise reply.BrokenReply("sent nothing but keep-alives")
        yield chunk


class _ToolStreamBroke(reply.BrokenReply):
    """A stream failed where the server's tool-call streaming does: an error event after the
    calls began, or a parser error. Whole answers may still work."""


def _broke_tool_streaming(err: Exception) -> bool:
    import openai

    if isinstance(err, _ToolStreamBroke):
        return True
    return (isinstance(err, openai.APIStatusError) and err.status_code >= 500
            and servers.names_parser_error(server_message(err)))


def _tries(count: int) -> str:
    return "tried once" if count == 1 else f"tried {count} times"


def _backoff(server_wait: float | None, attempt: int, base: float) -> float:
    if server_wait is not None:
        return min(server_wait, 60.0)
    return min(base * 2**attempt, 30.0) * random.uniform(0.8, 1.2)
