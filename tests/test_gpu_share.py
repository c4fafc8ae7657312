"""One GPU, two tenants: the LLM server is asked to free the card around GPU tools and brought
back before the next request, against scripted vLLM and Ollama servers on 127.0.0.1."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated

import pytest
from fakellm import FakeLLM, call, reply
from rich.console import Console

from booth.agent.approval import AutoApprove
from booth.agent.endpoint import OpenAIChatModel
from booth.agent.gpu_share import GpuShare
from booth.agent.loop import Session
from booth.agent.settings import EndpointSettings
from booth.agent.transcript import TranscriptWriter, make_header, read_transcript
from booth.agent.ui import ChatUI
from booth.tools import ToolContext
from booth.tools.registry import Param, tool

SEEN: list[list[str]] = []  # the server's request log at the moment each GPU tool ran
IDENTIFY = {"GET /version", "GET /api/version", "GET /props"}  # asked once, after an answer


def requests(llm) -> list[str]:
    """The chat and control requests the server received, in order."""
    return [line for line in llm.log if line not in IDENTIFY]


@tool
def paint(ctx, coats: Annotated[int, Param("coats")]) -> dict:
    """Use the GPU for a while."""
    SEEN.append(requests(LLM))
    return {"coats": coats}


@tool
def note(ctx, text: Annotated[str, Param("text")]) -> dict:
    """A tool that needs no GPU."""
    return {"text": text}


paint.uses_gpu = True
TOOLS = {"paint": paint, "note": note}
LLM: FakeLLM
SLEEPING = {"/is_sleeping": {"is_sleeping": False}}
AWAKE_AGAIN = {"/sleep?level=1": [(200, {})], "/wake_up": [(200, {})]}


def session_for(llm: FakeLLM, tmp_path: Path, provider: str = "vllm", mode: str = "always",
                on_cuda: bool = False) -> Session:
    global LLM
    LLM = llm
    SEEN.clear()
    settings = EndpointSettings(base_url=llm.base_url, model=llm.model, provider=provider,
                                max_retries=0, stream=False)
    ui = ChatUI(Console(file=io.StringIO(), width=200, color_system=None))
    header = make_header(model=settings.model, endpoint=settings.describe(), sampling={},
                         tools=[t.openai_spec() for t in TOOLS.values()], system_prompt="s")
    writer = TranscriptWriter.create(tmp_path / "t.jsonl", header)
    ctx = ToolContext.from_options(workspace=str(tmp_path / "ws"), base_model=str(tmp_path),
                                   console=Console(file=io.StringIO()))
    session = Session(OpenAIChatModel(settings), ctx, AutoApprove(ui=ui), system_prompt="s",
                      transcript=writer, ui=ui, tools=TOOLS)
    session.gpu_share = GpuShare(settings, mode, session.notice, lambda: on_cuda,
                                 sleep=lambda seconds: None)
    return session


def notices(tmp_path: Path) -> list[str]:
    return [e["text"] for e in read_transcript(tmp_path / "t.jsonl")[1] if e["type"] == "notice"]


CHAT = "POST /v1/chat/completions"


def test_vllm_sleeps_while_the_gpu_tool_runs_and_wakes_before_the_next_request(tmp_path):
    script = [call("paint", {"coats": 2}), call("note", {"text": "x"}), reply("Done.")]
    with FakeLLM(script, info=SLEEPING, control=AWAKE_AGAIN) as llm:
        assert session_for(llm, tmp_path).send("paint it")
    assert SEEN == [[CHAT, "GET /is_sleeping", "POST /sleep?level=1"]]  # asleep while it ran
    assert requests(llm)[3:] == [
        "POST /wake_up", "GET /is_sleeping", CHAT,  # woken before the model is asked again
        CHAT,  # the tool without a GPU: the server is left alone
    ]
    said = notices(tmp_path)
    assert said[0].startswith("vLLM is asleep to free the GPU for paint")
    assert said[1].startswith("the LLM server is back")


def test_a_wake_that_fails_once_is_tried_again_and_the_tools_result_is_kept(tmp_path):
    control = {"/sleep?level=1": [(200, {})],
               "/wake_up": [(500, {"error": "busy"}), (200, {})]}
    with FakeLLM([call("paint", {"coats": 1}), reply("Done.")], info=SLEEPING,
                 control=control) as llm:
        assert session_for(llm, tmp_path).send("paint it")
    assert llm.log.count("POST /wake_up") == 2
    said = notices(tmp_path)
    assert "did not wake up (HTTP 500); trying again" in said[1]
    assert said[2].startswith("the LLM server is back")
    (result,) = [e for e in read_transcript(tmp_path / "t.jsonl")[1] if e["type"] == "tool_result"]
    assert result["ok"] and result["result"] == {"coats": 1}


def test_a_wake_that_keeps_failing_says_what_to_do_and_the_chat_goes_on(tmp_path):
    control = {"/sleep?level=1": [(200, {})], "/wake_up": [(500, {"error": "stuck"})]}
    with FakeLLM([call("paint", {"coats": 1}), reply("Done.")], info=SLEEPING,
                 control=control) as llm:
        assert session_for(llm, tmp_path).send("paint it")
    assert any("did not wake up (HTTP 500): wake it with `curl -X POST http://127.0.0.1:"
               in text and "/wake_up`, or restart it" in text for text in notices(tmp_path))


def test_a_vllm_without_sleep_mode_is_told_once_with_the_flags_and_the_tool_runs(tmp_path):
    script = [call("paint", {"coats": 1}), call("paint", {"coats": 2}), reply("Done.")]
    with FakeLLM(script) as llm:  # no /is_sleeping: vLLM's 404
        assert session_for(llm, tmp_path).send("paint twice")
    assert len(SEEN) == 2 and "POST /sleep?level=1" not in llm.log
    (said,) = notices(tmp_path)
    assert "--enable-sleep-mode" in said and "VLLM_SERVER_DEV_MODE=1" in said


def test_ollama_unloads_its_model_and_needs_no_wake(tmp_path):
    with FakeLLM([call("paint", {"coats": 1}), reply("Done.")],
                 control={"/api/generate": [(200, {"done": True})]}) as llm:
        assert session_for(llm, tmp_path, provider="ollama").send("paint it")
    assert SEEN == [[CHAT, "POST /api/generate"]]
    assert llm.posted == [("/api/generate", {"model": llm.model, "keep_alive": 0})]
    assert "Ollama unloaded" in notices(tmp_path)[0]


def test_llama_cpp_cannot_free_its_memory_and_says_so_once(tmp_path):
    script = [call("paint", {"coats": 1}), call("paint", {"coats": 2}), reply("Done.")]
    with FakeLLM(script) as llm:
        assert session_for(llm, tmp_path, provider="llamacpp").send("paint twice")
    (said,) = notices(tmp_path)
    assert "keeps its weights for its lifetime" in said and "llama-swap" in said


@pytest.mark.parametrize("mode, on_cuda", [("never", True), ("auto", False)])
def test_never_and_auto_without_cuda_leave_the_server_alone(tmp_path, mode, on_cuda):
    with FakeLLM([call("paint", {"coats": 1}), reply("Done.")], info=SLEEPING,
                 control=AWAKE_AGAIN) as llm:
        assert session_for(llm, tmp_path, mode=mode, on_cuda=on_cuda).send("paint it")
    assert requests(llm) == [CHAT, CHAT] and not notices(tmp_path)


def test_auto_on_cuda_with_the_server_on_this_machine_releases_it(tmp_path):
    with FakeLLM([call("paint", {"coats": 1}), reply("Done.")], info=SLEEPING,
                 control=AWAKE_AGAIN) as llm:
        assert session_for(llm, tmp_path, mode="auto", on_cuda=True).send("paint it")
    assert "POST /sleep?level=1" in llm.log and "POST /wake_up" in llm.log


def test_a_server_that_cannot_be_reached_for_the_release_does_not_stop_the_tool(tmp_path):
    with FakeLLM([call("paint", {"coats": 1}), reply("Done.")], info=SLEEPING,
                 control={"/sleep?level=1": [(503, {"error": "no"})]}) as llm:
        assert session_for(llm, tmp_path).send("paint it")
    assert len(SEEN) == 1
    assert "could not ask the LLM server to free the GPU (HTTP 503); paint runs beside it" in \
        notices(tmp_path)[0]


def test_an_unknown_share_gpu_mode_is_a_clear_error(workspace):
    from typer.testing import CliRunner

    from booth.cli import app

    result = CliRunner().invoke(app, ["-w", workspace, "chat", "--share-gpu", "sometimes", "hi"])
    assert result.exit_code == 2
    assert "--share-gpu must be one of auto, always, never, not 'sometimes'" in \
        " ".join(result.output.split())
