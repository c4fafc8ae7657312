"""What booth learns about the server it talks to, and what it tells the user about it.

`identify` asks the server, once, what it is: vLLM answers GET /version, Ollama GET
/api/version, llama-server GET /props (its build), all at the server's root, not under /v1.
One short GET, to the path of the provider booth was told it talks to; any failure is ignored
(a proxy, LM Studio or a hosted API simply says nothing). Nothing is sent but the GET: no key.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit, urlunsplit

from booth.agent.settings import safe_url

PROBE_TIMEOUT = 1.5  # seconds: it is only for the record
# provider -> (path at the server's root, the JSON field holding the version)
_VERSION_AT = {"vllm": ("/version", "version"), "ollama": ("/api/version", "version"),
               "llamacpp": ("/props", "build_info")}
_KIND = {"vllm": "vLLM", "ollama": "Ollama", "llamacpp": "llama.cpp"}

# What a server says when its tool-call parser failed on a stream (vllm#20028).
_PARSER_ERROR = re.compile(r"partial_json_parser|failed to parse|tool.?call.?pars", re.IGNORECASE)


def names_parser_error(message: str) -> bool:
    """Whether a server's error message blames its (tool-call) parser."""
    return bool(_PARSER_ERROR.search(message))


TEXT_CALL_FIXES = {
    "vllm": "start vLLM with --tool-call-parser mistral --enable-auto-tool-choice",
    "llamacpp": "start llama-server with --jinja",
    "ollama": ("Ollama's template for this model cannot parse its tool calls (ollama#11155): "
               "use a model tag whose template supports tools, or a newer Ollama"),
}


def server_root(base_url: str) -> str:
    """The server's root for `base_url` (its /v1 taken off), without credentials."""
    parts = urlsplit(safe_url(base_url))
    path = parts.path.rstrip("/").removesuffix("/v1")
    return urlunsplit(parts._replace(path=path, query="", fragment=""))


def identify(base_url: str, provider: str) -> dict:
    """{"kind": ..., "version": ...} when the server says, else {}."""
    if provider not in _VERSION_AT:
        return {}
    import urllib.request

    path, field = _VERSION_AT[provider]
    try:
        with urllib.request.urlopen(server_root(base_url) + path,
                                    timeout=PROBE_TIMEOUT) as response:
            body = json.loads(response.read(65536))
    except Exception:  # noqa: BLE001 - anything at all: the record just lacks the version
        return {}
    version = body.get(field) if isinstance(body, dict) else None
    if not isinstance(version, (str, int, float)) or isinstance(version, bool):
        return {}
    return {"kind": _KIND[provider], "version": str(version)[:200], "provider": provider}


def text_calls_notice(form: str, provider: str | None) -> str:
    """Told once a session: the server handed the calls back as text, and how to fix it.
    `provider` is the server's kind when it said (`identify`); else every fix is listed."""
    fix = TEXT_CALL_FIXES.get(provider or "") or "; ".join(
        f"{_KIND[p]}: {hint}" for p, hint in TEXT_CALL_FIXES.items())
    return (f"The server returned the model's tool calls as text ({form}) instead of parsing "
            "them; booth read them as calls this time, but a server that parses them is more "
            f"reliable. To fix it: {fix}.")


STREAM_FALLBACK_NOTICE = (
    "The server's streamed tool calls broke ({why}); booth asked again without streaming and "
    "will not stream for the rest of this session (vLLM's Mistral tool parser had this bug "
    "when streaming, vllm#20028: a newer vLLM, or --no-stream, avoids it)."
)
