"""`booth doctor`'s endpoint checks: what the server serves, and one real request with booth's
tools, streamed and not (see booth.commands.doctor for why the probe is not forced)."""

from __future__ import annotations

from booth.commands.checks import FAIL, OK, Check

PROBE = "Call sample with prompts ['a photo of a dog']. Do not answer in text."
PROBE_TIMEOUT = 60.0  # seconds: a short call from a loaded model takes a few
PROBE_TOKENS = 200


def endpoint_checks(settings) -> list[Check]:
    import openai

    from booth.agent.settings import safe_url

    url = safe_url(settings.base_url)
    client = openai.OpenAI(base_url=url, api_key=settings.api_key, max_retries=0,
                           timeout=openai.Timeout(min(settings.timeout, PROBE_TIMEOUT),
                                                  connect=settings.connect_timeout))
    served = _models(client, settings, url)
    if served.status == FAIL:  # a probe could only fail the same way
        return [served]
    plain = _probe(client, settings, stream=False)
    if not settings.stream:
        return [served, plain]
    streamed = _probe(client, settings, stream=True)
    if plain.status == OK and streamed.status == FAIL:  # vLLM #20028: streamed calls broke
        streamed.fix = " ".join([streamed.fix, "(until then, chat with --no-stream)"]).strip()
    return [served, plain, streamed]


def _models(client, settings, url: str) -> Check:
    from booth.agent.settings import PRESETS

    try:
        served = [model.id for model in client.models.list().data]
    except Exception as error:  # the network and the SDK: any failure is the finding
        hint = PRESETS.get(settings.provider, PRESETS["vllm"]).start_hint
        return Check("endpoint", FAIL, f"nothing usable answers at {url}: "
                     f"{_why(error)}", f"start the server ({hint}), or pass --base-url or "
                     "--provider")
    if settings.model in served or not served:
        return Check("endpoint", OK, f"{url} serves {settings.model}")
    if settings.provider == "llamacpp":  # it answers with whatever GGUF it loaded
        return Check("endpoint", OK, f"{url} serves {', '.join(served[:3])}")
    return Check("endpoint", FAIL, f"{url} does not serve {settings.model!r} (it "
                 f"serves {', '.join(served[:5])})", "choose one with --model or BOOTH_MODEL")


def _probe(client, settings, stream: bool) -> Check:
    """One real request with booth's tools: it passes only when a structured call comes back."""
    from booth.agent import reply, wire
    from booth.tools import TOOLS

    name = "tool calls (streamed)" if stream else "tool calls"
    tools = [tool.openai_spec() for tool in TOOLS.values()]
    messages = [{"role": "user", "content": PROBE}]
    wire.check_request(messages, tools, settings.model)
    request = {"model": settings.model, "messages": messages, "tools": tools,
               **settings.sampling(), "max_tokens": PROBE_TOKENS}
    create = client.chat.completions.with_streaming_response.create
    try:
        if stream:
            with create(**request, stream=True) as response:
                stream_reader = reply.StreamReader()
                for _ in stream_reader.read(response.iter_bytes()):
                    pass
                turn = stream_reader.turn()
        else:
            with create(**request) as response:
                turn = reply.turn_from_body(response.read())
    except Exception as error:  # the network, the SDK, a broken reply: the finding
        return Check(name, FAIL, f"the probe failed: {_why(error)}")
    return _judge(name, turn, settings.provider)


def _judge(name: str, turn, provider: str) -> Check:
    from booth.agent.servers import TEXT_CALL_FIXES

    fix = TEXT_CALL_FIXES.get(provider, TEXT_CALL_FIXES["vllm"])
    if provider == "mistral":
        fix = "Mistral's API parses calls itself: check --base-url and --model"
    if turn.tool_calls:
        called = ", ".join(f"{c.name}({c.arguments})" for c in turn.tool_calls)
        return Check(name, OK, f"structured call: {_cut(called)}")
    if _written_as_text(turn.content):
        return Check(name, FAIL, f"the call came back as text, not parsed by the server: "
                     f"{_cut(turn.content)!r}", fix)
    answered = f"the model answered {_cut(turn.content)!r}" if turn.content.strip() else (
        "an empty answer")
    return Check(name, FAIL, f"no tool call came back ({answered}); the server may not pass "
                 "the tools on", fix)


def _written_as_text(content: str) -> bool:
    """A call the server left in the text, in any of the forms chat would read it in."""
    from booth.agent.text_calls import find_calls
    from booth.tools import TOOLS

    return find_calls(content, TOOLS) is not None


def _why(error: BaseException) -> str:
    """The error in a line, with its root cause ("Connection error. (Connection refused)")."""
    status = getattr(error, "status_code", None)
    text = " ".join(str(error).split()) or type(error).__name__
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    if root is not error and str(root):
        text += f" ({' '.join(str(root).split())})"
    return _cut(f"HTTP {status}: {text}" if status else text)


def _cut(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
