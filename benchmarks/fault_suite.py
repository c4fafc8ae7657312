"""Fault suite: malformed tool calls and broken endpoints against a real booth Session.

    OMP_NUM_THREADS=1 python benchmarks/fault_suite.py        # ~30 s, loopback only

A scripted chat-completions server (tests/fakellm.py) on 127.0.0.1 plays each case to a
Session built as `booth chat` builds one (real OpenAIChatModel and openai SDK, real
transcript writer, auto-approval), whose only tool counts its runs. The URL carries a
user:password and an API key is set; servers echo both back. It prints one line per case and:

    tracebacks 0, executed malformed calls 0, secrets found in output/transcript 0,
    broken replies taken as answers 0

and exits 1 if any is not 0. Not part of the test run (tests/test_endpoint_faults.py is).
"""

from __future__ import annotations

import dataclasses
import io
import json
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's booth, and tests/fakellm.py

from fakellm import (  # noqa: E402
    FakeLLM,
    broken,
    call,
    error,
    hang,
    message,
    raw,
    reply,
    trickle,
)
from rich.console import Console  # noqa: E402

from booth.agent.approval import AutoApprove  # noqa: E402
from booth.agent.endpoint import OpenAIChatModel  # noqa: E402
from booth.agent.loop import Session  # noqa: E402
from booth.agent.settings import EndpointSettings  # noqa: E402
from booth.agent.transcript import TranscriptWriter, make_header, read_transcript  # noqa: E402
from booth.agent.ui import ChatUI  # noqa: E402
from booth.tools import ToolContext  # noqa: E402
from booth.tools.registry import Param, tool  # noqa: E402

KEY = "sk-fault-suite-5f4e3d2c1b0a"
PASSWORD = "pw-fault-7788"
RUNS: list[str] = []


@tool
def note(ctx, text: Annotated[str, Param("what to note")]) -> dict:
    """Count a run; touch nothing."""
    RUNS.append(text)
    return {"noted": text}


DEEP_ARRAY = "[" * 2000 + "]" * 2000
DEEP_OBJECT = '{"a":' * 2000 + "1" + "}" * 2000


def _msg(tool_calls: Any) -> dict:
    return message({"role": "assistant", "content": None, "tool_calls": tool_calls})


def _fn(function: Any, id: Any = "abcDEF123") -> dict:
    return _msg([{"id": id, "type": "function", "function": function}])


# Each is one assistant step whose call must be refused; both streamed and not.
MALFORMED_CALLS: dict[str, dict] = {
    "unparseable JSON": call("note", '{"text": '),
    "empty arguments": call("note", ""),
    "arguments null": call("note", "null"),
    "arguments an array": call("note", '["x"]'),
    "arguments a number": call("note", "42"),
    "arguments a string": call("note", '"x"'),
    "arguments double-encoded": call("note", json.dumps('{"text": "x"}')),
    "NaN value": call("note", '{"text": NaN}'),
    "arrays nested 2000 deep": call("note", DEEP_ARRAY),
    "objects nested 2000 deep": call("note", DEEP_OBJECT),
    "unclosed 100000 deep": call("note", "[" * 100000),
    "trailing garbage": call("note", '{"text": "x"} and more'),
    "byte-order mark": call("note", '\ufeff{"text": "x"}'),
    "unknown tool": call("notes", {"text": "x"}),
    "name with spaces": call("note it!", {"text": "x"}),
    "empty name": call("", {"text": "x"}),
    "name of 10000 chars": call("n" * 10000, {"text": "x"}),
    "unicode look-alike name": call("nоte", {"text": "x"}),  # Cyrillic o
    "required field missing": call("note", {}),
    "wrong type": call("note", {"text": 5}),
    "null value": call("note", {"text": None}),
    "extra field": call("note", {"text": "x", "colour": "red"}),
    "duplicate key, last wrong": call("note", '{"text": "x", "text": 5}'),
    "function null": _fn(None),
    "function missing": _msg([{"id": "abcDEF123", "type": "function"}]),
    "function a string": _fn("note"),
    "tool_calls a string": _msg('note(text="x")'),
    "tool_calls an object, unknown name": _msg({"function": {"name": "nope", "arguments": "{}"}}),
    "a call that is a number": _msg([7]),
    "a call that is null": _msg([None]),
    "name a list": _fn({"name": ["note"], "arguments": '{"text": "x"}'}),
    "name a number": _fn({"name": 12, "arguments": '{"text": "x"}'}),
    "arguments an object of the wrong type": _fn({"name": "note", "arguments": {"text": 5}}),
    "arguments a list object": _fn({"name": "note", "arguments": ["x"]}),
}

GOOD = reply("Understood.")
CUT_CALL = broken(call("note", {"text": "x"}), "cut")


def _same(step: dict, tries: int = 2) -> list[dict]:
    return [step] * tries  # every try gets the same fault, so retries run out


# (script, stream, extra settings); the session must end the turn with a clear error or
# recover, never run a call from a broken reply, never show a secret.
ENDPOINT_FAULTS: dict[str, tuple[list[dict], bool, dict]] = {
    "garbage SSE line": (_same(raw('data: {"choices": []}\n\ndata: {oops\n\n')), True, {}),
    "non-UTF-8 stream": (_same(raw(b"data: {\"x\": \"\xff\xfe\"}\n\n")), True, {}),
    "non-UTF-8 body": (_same(raw(b"\xff\xfe{}", "application/json")), False, {}),
    "HTML page, streaming": (_same(raw("<html>login</html>", "text/html")), True, {}),
    "HTML page, whole": (_same(raw("<html>login</html>", "text/html")), False, {}),
    "stream cut before finishing": (_same(broken(reply("I will"), "cut")), True, {}),
    "stream cut mid tool call": (_same(CUT_CALL), True, {}),
    "[DONE] without finish_reason": (_same(broken(reply("Half"), "no_finish")), True, {}),
    "empty choices": (_same(broken(reply("Hello"), "empty_choices")), True, {}),
    # After tool deltas the same error is the server's tool streaming breaking: booth asks
    # once more without streaming and that whole answer may run (tests/test_text_calls.py).
    "error event before any tool delta": (_same(broken(reply("I will note"), "error_event")),
                                          True, {}),
    "empty answer": (_same(reply("")), True, {}),
    "event that is a number": (_same(raw("data: 42\n\n")), True, {}),
    "choices not a list": (_same(raw('data: {"choices": "x"}\n\n')), True, {}),
    "empty 200 stream": (_same(raw("")), True, {}),
    "empty 200 body": (_same(raw("", "application/json")), False, {}),
    "body not JSON": (_same(raw("upstream hiccup", "text/plain")), False, {}),
    "body a JSON list": (_same(raw("[1, 2]", "application/json")), False, {}),
    "body nested 2000 deep": (_same(raw(DEEP_OBJECT, "application/json")), False, {}),
    "message null": (_same(message(None)), False, {}),
    "500 with HTML body": (_same(raw("<h1>oops</h1>", "text/html", 500)), True, {}),
    "429 throughout": (_same(error(429, "slow down")), True, {}),
    "401 echoing the key": ([error(401, f"bad key {KEY} for bob:{PASSWORD}")], True, {}),
    "400 echoing the key": ([error(400, f"key {KEY} not allowed")], True, {}),
    "404 unknown model": ([error(404, "The model does not exist.")], True, {}),
    "hang past the first-token timeout": (_same(hang(5)), True, {"first_token_timeout": 1.0}),
    "keep-alives only, past the first-token timeout": (_same(trickle(4)), True,
                                                       {"first_token_timeout": 1.0}),
    "broken then good": ([broken(reply("I"), "cut"), GOOD], True, {}),
}


class Tally:
    def __init__(self) -> None:
        self.tracebacks = self.executed = self.secrets = self.cases = self.accepted = 0
        self.failures: list[str] = []

    def check(self, label: str, fn) -> None:
        self.cases += 1
        RUNS.clear()
        try:
            outcome = fn()
        except BaseException as err:  # noqa: BLE001 - anything escaping is the finding
            self.tracebacks += 1
            frames = [f for f in traceback.extract_tb(err.__traceback__) if "/booth/" in f.filename]
            where = (f" (in {Path(frames[-1].filename).name}:{frames[-1].lineno} "
                     f"{frames[-1].name})" if frames else "")
            self.failures.append(f"{label}: {type(err).__name__}{where}: {err}"[:200])
            print(f"  {label:44.44} TRACEBACK {type(err).__name__}{where}  <-- FAIL")
            return
        text, transcript, ran, wrong_end = outcome
        self.accepted += wrong_end
        leaked = [s for s in (KEY, PASSWORD) if s in text or s in transcript]
        self.secrets += len(leaked)
        self.executed += ran
        failed = leaked or ran or wrong_end or "Traceback" in text
        flag = "  <-- FAIL" if failed else ""
        self.tracebacks += "Traceback" in text
        last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
        print(f"  {label:44.44} ran {ran}  {last[0][:90]}{flag}")


def _session(llm: FakeLLM, folder: Path, stream: bool, **extra: Any) -> Session:
    url = llm.base_url.replace("http://", f"http://bob:{PASSWORD}@")
    known = {f.name for f in dataclasses.fields(EndpointSettings)}  # runs on older booths too
    settings = EndpointSettings(base_url=url, model=llm.model, api_key=KEY, stream=stream,
                                max_retries=1, retry_backoff=0.01,
                                **{k: v for k, v in extra.items() if k in known})
    ui = ChatUI(Console(file=io.StringIO(), width=200, color_system=None))
    header = make_header(model=settings.model, endpoint=settings.describe(), sampling={},
                         tools=[note.openai_spec()], system_prompt="You are booth.")
    writer = TranscriptWriter.create(folder / "t.jsonl", header, secrets=[KEY, PASSWORD])
    ctx = ToolContext.from_options(workspace=str(folder / "ws"), base_model=str(folder),
                                   console=Console(file=io.StringIO()))
    return Session(OpenAIChatModel(settings), ctx, AutoApprove(ui=ui),
                   system_prompt="You are booth.", transcript=writer, ui=ui,
                   tools={"note": note})


def _play(script: list[dict], stream: bool, expect_events: tuple[str, ...],
          answered: bool = True, **extra: Any):
    """Play `script`; `answered`: whether the turn should end in an answer (True) or in one
    endpoint error (False, for a broken reply that must not be taken as an answer)."""
    with tempfile.TemporaryDirectory() as tmp, FakeLLM(script) as llm:
        folder = Path(tmp)
        session = _session(llm, folder, stream, **extra)
        ended_well = session.send("note x")
        text = session.ui.console.file.getvalue()
        transcript = (folder / "t.jsonl").read_text()
        kinds = {e["type"] for e in read_transcript(folder / "t.jsonl")[1]}
        if not kinds & set(expect_events):
            raise AssertionError(f"transcript lacks {expect_events}: {sorted(kinds)}")
        return text, transcript, len(RUNS), ended_well != answered


def _refused_down() -> tuple[str, str, int]:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    class Gone:
        base_url, model = f"http://127.0.0.1:{port}/v1", "m"

    with tempfile.TemporaryDirectory() as tmp:
        session = _session(Gone, Path(tmp), True)  # type: ignore[arg-type]
        started = time.monotonic()
        ended_well = session.send("hi")
        assert time.monotonic() - started < 5
        return (session.ui.console.file.getvalue(), (Path(tmp) / "t.jsonl").read_text(),
                len(RUNS), ended_well)


def main() -> int:
    tally = Tally()
    started = time.monotonic()
    print(f"malformed tool calls ({len(MALFORMED_CALLS)} kinds, streamed and whole):")
    for label, step in MALFORMED_CALLS.items():
        for stream in (True, False):
            tally.check(f"{label} [{'stream' if stream else 'whole'}]",
                        lambda s=step, st=stream: _play([s, GOOD], st, ("validation_error",)))
    malformed_runs = tally.executed
    print(f"endpoint faults ({len(ENDPOINT_FAULTS) + 1} kinds):")
    for label, (script, stream, extra) in ENDPOINT_FAULTS.items():
        answered = label == "broken then good"
        tally.check(label, lambda sc=script, st=stream, ex=extra, a=answered:
                    _play(sc, st, ("endpoint_error", "assistant"), a, **ex))
    tally.check("nothing listening", _refused_down)
    print("control: a valid call runs:", end=" ")
    RUNS.clear()
    _play([call("note", {"text": "ok"}), GOOD], True, ("tool_result",))
    print("yes" if RUNS == ["ok"] else f"NO ({RUNS})")
    print(f"\n{tally.cases} plays in {time.monotonic() - started:.0f} s: "
          f"tracebacks {tally.tracebacks}, executed malformed calls {malformed_runs} "
          f"(+{tally.executed - malformed_runs} from broken replies), "
          f"secrets found in output/transcript {tally.secrets}, "
          f"broken replies taken as answers {tally.accepted}")
    for failure in tally.failures:
        print("  -", failure)
    return 1 if tally.tracebacks or tally.executed or tally.secrets or tally.accepted else 0


if __name__ == "__main__":
    sys.exit(main())
