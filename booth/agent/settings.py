"""Where the model lives and how to sample from it: endpoint presets and settings resolved
from flags, environment and the chosen provider."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from booth.agent.model import EndpointError

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
#   num_ctx, which the OpenAI endpoint cannot change: the hint starts it with the window booth
#   then assumes (pass --context-window if yours was started otherwise).
# - llamacpp: llama-server answers with whatever GGUF it loaded; the name is informational.
#   Its window is `-c`, started by the hint with the window booth assumes.
# - mistral: the hosted mistral-small-2506 (Small 3.2) was retired on 2026-07-31;
#   `mistral-small-latest` is the Small model Mistral serves now (Small 4, 128k+ context).
#   Pin another with --model / BOOTH_MODEL.
LOCAL_WINDOW = 32768  # what the ollama and llamacpp hints start their servers with
PRESETS: dict[str, Preset] = {
    "vllm": Preset("http://localhost:8000/v1", VLLM_MODEL, 131072, False, VLLM_SERVE),
    "ollama": Preset(
        "http://localhost:11434/v1", "mistral-small3.2:24b", LOCAL_WINDOW, False,
        f"OLLAMA_CONTEXT_LENGTH={LOCAL_WINDOW} ollama serve; ollama pull mistral-small3.2:24b",
    ),
    "llamacpp": Preset(
        "http://localhost:8080/v1", "Mistral-Small-3.2-24B-Instruct-2506", LOCAL_WINDOW, False,
        f"llama-server -m <Mistral-Small-3.2 GGUF> --jinja -c {LOCAL_WINDOW} --port 8080",
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
    A `user:password@` in `base_url` is sent nowhere: the HTTP library would turn it into
    Basic auth in place of the Bearer `api_key`, which is what OpenAI-compatible servers
    check. It is treated as a secret (masked in everything shown) and `describe` says so.
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
    # Seconds, all tries of one turn together, booth waits for an answer to begin (for a whole
    # answer when not streaming): a hung endpoint ends here with a clear message.
    first_token_timeout: float = 180.0
    connect_timeout: float = 5.0  # seconds to open a connection: a host that is down says so fast
    max_retries: int = 3  # on 429, 5xx and timeouts; booth retries itself, the SDK never does
    retry_backoff: float = 1.0  # seconds before the first retry, doubling, unless the server says
    context_window: int = 131072  # tokens the server accepts, prompt and reply together

    def secrets(self) -> list[str]:
        """What must never be shown or written: the key (not the local placeholder) and any
        user:password in the URL."""
        found = [self.api_key] if self.api_key and self.api_key != LOCAL_KEY else []
        parts = urlsplit(self.base_url)
        if parts.password:
            found.append(parts.password)
        if "@" in parts.netloc:
            found.append(parts.netloc.rsplit("@", 1)[0])
        return [s for s in found if len(s) >= 4]

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
        parts = [f"{self.model} at {safe_url(self.base_url)} ({self.provider})"]
        parts.append("key set" if self.api_key and self.api_key != LOCAL_KEY else "no key")
        sampling = {k: v for k, v in self.sampling().items() if k != "extra_body"}
        if self.repetition_penalty is not None:
            sent = "extra_body" in self.sampling()
            sampling["repetition_penalty"] = (
                self.repetition_penalty if sent else f"{self.repetition_penalty} (not sent: "
                f"{self.provider} does not take it)"
            )
        parts += [f"{k} {v}" for k, v in sampling.items()]
        if "@" in urlsplit(self.base_url).netloc:
            parts.append("user:password in the URL not sent")
        parts.append("streaming" if self.stream else "not streaming")
        parts.append(f"context {self.context_window} tokens")
        return ", ".join(parts)


MISTRAL_HOST = "api.mistral.ai"


def safe_url(url: str) -> str:
    """The URL without any user:password@ part, for display."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _check_url(url: str) -> None:
    """An endpoint URL booth can use, or an EndpointError saying what is wrong with it."""
    shown = re.sub(r"//[^/@]*@", "//", url)  # no password in the message, even unparsed
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it is the check: "80x0" raises here
    except ValueError as error:
        raise EndpointError(f"--base-url {shown!r} is not an http(s) URL ({error})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"--base-url {shown!r} is not an http(s) URL: give it as "
                            "http://HOST:PORT/v1")


def _guess_provider(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.hostname == MISTRAL_HOST:
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
    if base_url:
        _check_url(base_url)
    provider = given.get("provider") or env.get("BOOTH_PROVIDER")
    if not provider:
        provider = _guess_provider(base_url) if base_url else "vllm"
    if provider not in PRESETS:
        raise EndpointError(f"Unknown provider {provider!r}: choose one of {', '.join(PRESETS)}.")
    preset = PRESETS[provider]
    key = given.get("api_key") or env.get("BOOTH_API_KEY")
    if not key and urlsplit(base_url or preset.base_url).hostname == MISTRAL_HOST:
        key = env.get("MISTRAL_API_KEY")  # a Mistral key goes to Mistral's API, nowhere else
    if not key and preset.needs_key:
        where = ("set MISTRAL_API_KEY (or BOOTH_API_KEY), or pass --api-key"
                 if urlsplit(base_url or preset.base_url).hostname == MISTRAL_HOST else
                 f"set BOOTH_API_KEY or pass --api-key (MISTRAL_API_KEY is only sent to "
                 f"{MISTRAL_HOST})")
        raise EndpointError(f"{provider} needs an API key: {where}.")
    settings = EndpointSettings(
        base_url=(base_url or preset.base_url).rstrip("/"),
        model=given.get("model") or env.get("BOOTH_MODEL") or preset.model,
        api_key=key or LOCAL_KEY,
        provider=provider,
        context_window=preset.context_window,
    )
    rest = {k: v for k, v in given.items() if k not in ("base_url", "model", "api_key", "provider")}
    return replace(settings, **rest)
