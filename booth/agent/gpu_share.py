"""One GPU, two tenants: the LLM server gives the card back while a GPU tool runs.

Around a tool that runs on the GPU (`Tool.uses_gpu`), booth asks the server to free its
memory, and brings it back before the next model request:
- vLLM: sleep mode, `POST /sleep?level=1` (weights to host RAM, KV cache dropped) and
  `POST /wake_up`; `GET /is_sleeping` says whether the server offers it (it needs
  `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`). At the server's root, not under /v1.
- Ollama: `POST /api/generate {"model": M, "keep_alive": 0}` unloads the model; the next chat
  request loads it again, so there is nothing to wake.
- llama.cpp keeps its weights for its lifetime (only its router mode or a proxy such as
  llama-swap unloads them): booth says so once and goes on.
`auto` (the default) releases only when the tool runs on CUDA and the endpoint is on this
machine; `always` around every GPU tool; `never` leaves the server alone. Every release and
wake is shown and recorded; a failed wake is tried again, then reported with what to do.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

from booth.agent.servers import server_root

MODES = ("auto", "always", "never")
SLEEP_FLAGS = "start vLLM with --enable-sleep-mode and the environment VLLM_SERVER_DEV_MODE=1"
TIMEOUT = {"check": 5.0, "release": 120.0, "wake": 300.0}  # offloading 50 GB takes a while
WAKE_TRIES = 2


class GpuShare:
    """Releases and wakes the LLM server around GPU tools (see the module docstring).

    `notice(text)` shows and records one line; `on_cuda()` says whether the tools run on a
    CUDA device (it imports torch, so it is asked only when a GPU tool is about to run)."""

    def __init__(self, settings, mode: str, notice: Callable[[str], None],
                 on_cuda: Callable[[], bool], sleep: Callable[[float], None] = time.sleep):
        self.settings, self.mode, self.notice = settings, mode, notice
        self.on_cuda, self._sleep = on_cuda, sleep
        self.root = server_root(settings.base_url)
        self.released = False  # the server gave the card back and must be woken
        self._said_cannot = False

    def describe(self) -> str | None:
        """For the system prompt: what the server does for GPU tools, when it does."""
        if self.mode == "never" or self.settings.provider not in ("vllm", "ollama") \
                or self._said_cannot:
            return None
        return "the LLM server frees its GPU memory while train/sample run"

    def before_tool(self, tool) -> None:
        """Called before a tool runs; never stops it (a failure is a notice)."""
        if self.released or not getattr(tool, "uses_gpu", False) or not self._applies():
            return
        try:
            self._release(tool.name)
        except (OSError, ValueError) as error:  # a server that says nothing useful
            self.notice(f"could not ask the LLM server to free the GPU ({_why(error)}); "
                        f"{tool.name} runs beside it")

    def before_model(self) -> None:
        """Called before each model request, and when the session ends."""
        if not self.released:
            return
        for attempt in range(1, WAKE_TRIES + 1):
            started = time.monotonic()
            try:
                self._wake()
            except (OSError, ValueError) as error:
                if attempt < WAKE_TRIES:
                    self.notice(f"the LLM server did not wake up ({_why(error)}); trying again")
                    self._sleep(2.0)
                    continue
                self.released = False
                self.notice(f"the LLM server did not wake up ({_why(error)}): wake it with "
                            f"`curl -X POST {self.root}/wake_up`, or restart it")
                return
            self.released = False
            self.notice(f"the LLM server is back ({time.monotonic() - started:.1f} s)")
            return

    def gives_back(self, used_by_others: Callable[[], float | None]) -> float | None:
        """Bytes the server would free around a GPU tool, for the memory plan; None when it
        will not be released or will not say. Ollama reports its model's `size_vram`; vLLM
        asleep at level 1 keeps almost nothing on the card, so all the card holds beyond
        booth's own use is counted (`used_by_others()`: an upper bound if others share it)."""
        if self.released or self._said_cannot or not self._applies():
            return None  # already asleep: the card's free memory counts it already
        try:
            if self.settings.provider == "ollama":
                return _ollama_vram(self._get("/api/ps"), self.settings.model)
            if self.settings.provider == "vllm" and not self._get("/is_sleeping").get(
                    "is_sleeping", True):
                return used_by_others()
        except (OSError, ValueError):  # HTTPError too: no sleep mode, no figure
            return None
        return None

    # -- what applies ---------------------------------------------------------------------
    def _applies(self) -> bool:
        if self.mode == "never":
            return False
        if self.mode == "always":
            return True
        return self.on_cuda() and _is_this_machine(urlsplit(self.settings.base_url).hostname)

    def _release(self, tool: str) -> None:
        provider = self.settings.provider
        if provider == "vllm":
            self._release_vllm(tool)
        elif provider == "ollama":
            self._post("/api/generate", {"model": self.settings.model, "keep_alive": 0},
                       TIMEOUT["release"])
            self.notice(f"Ollama unloaded {self.settings.model} to free the GPU for {tool}; "
                        "it loads again with the next request")
        else:
            self._cannot(f"{provider} has no way to free its GPU memory while {tool} runs "
                         + ("(llama-server keeps its weights for its lifetime; its router "
                            "mode or llama-swap can unload them)" if provider == "llamacpp"
                            else "(a server elsewhere holds nothing on this card)"))

    def _release_vllm(self, tool: str) -> None:
        try:
            asleep = self._get("/is_sleeping").get("is_sleeping")
        except HTTPError as error:
            if error.code in (404, 405):
                return self._cannot("this vLLM cannot free its GPU memory while "
                                    f"{tool} runs: {SLEEP_FLAGS}")
            raise
        if asleep:
            self.released = True  # asleep already (another client?): wake it afterwards
            return None
        started = time.monotonic()
        self._post("/sleep?level=1", None, TIMEOUT["release"])
        self.released = True
        self.notice(f"vLLM is asleep to free the GPU for {tool} "
                    f"({time.monotonic() - started:.1f} s); it wakes before the next request")
        return None

    def _wake(self) -> None:
        if self.settings.provider == "vllm":
            self._post("/wake_up", None, TIMEOUT["wake"])
            if self._get("/is_sleeping").get("is_sleeping"):
                raise ValueError("it still says it is sleeping")
        # Ollama reloads on the next request: nothing to do.

    def _cannot(self, text: str) -> None:
        if not self._said_cannot:
            self._said_cannot = True
            self.notice(text)

    # -- HTTP -----------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        from booth.agent.settings import LOCAL_KEY

        key = self.settings.api_key
        headers = {"Content-Type": "application/json"}
        if key and key != LOCAL_KEY:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _get(self, path: str) -> dict:
        return self._request("GET", path, None, TIMEOUT["check"])

    def _post(self, path: str, body: dict | None, timeout: float) -> dict:
        return self._request("POST", path, body, timeout)

    def _request(self, method: str, path: str, body: dict | None, timeout: float) -> dict:
        import urllib.request

        data = json.dumps(body).encode() if body is not None else b""
        request = urllib.request.Request(self.root + path, data=data if method == "POST" else
                                         None, method=method, headers=self._headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read(1 << 20)
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {}
        return answer if isinstance(answer, dict) else {}


def _ollama_vram(status: dict, model: str) -> float | None:
    """`size_vram` of `model` in Ollama's /api/ps answer (0 when it is not loaded)."""
    models = status.get("models")
    if not isinstance(models, list):
        return None
    for entry in models:
        if isinstance(entry, dict) and model in (entry.get("name"), entry.get("model")):
            size = entry.get("size_vram")
            ok = isinstance(size, int | float) and not isinstance(size, bool) and size >= 0
            return float(size) if ok else None
    return 0.0


def _is_this_machine(host: str | None) -> bool:
    """Whether the endpoint's host is this machine (loopback, or one of its own names)."""
    if not host:
        return False
    if host in ("localhost", "::1") or host.startswith("127."):
        return True
    mine = {socket.gethostname(), socket.getfqdn()}
    if host in mine:
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        own = {info[4][0] for name in mine for info in socket.getaddrinfo(name, None)}
    except OSError:  # a name that does not resolve here is no name of this machine
        return False
    return bool(addresses & own) or any(a.startswith("127.") for a in addresses)


def _why(error: Exception) -> str:
    if isinstance(error, HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, URLError):
        return str(error.reason)
    return str(error) or type(error).__name__
