"""`booth chat` as a user or a script meets it, driven by typer's CliRunner (approvals typed
on stdin) against the fake chat-completions server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fakellm import FakeLLM, call, reply
from typer.testing import CliRunner

from booth.agent.approval import NO_TERMINAL
from booth.agent.transcript import read_transcript
from booth.agent.wire import check_request
from booth.cli import app
from booth.commands import session

runner = CliRunner()


@pytest.fixture
def photos(tmp_path) -> str:
    from booth.demo import draw_subject_photos

    folder = tmp_path / "photos" / "rex"
    draw_subject_photos(folder, count=3, size=64)
    return str(folder)


@pytest.fixture
def tty(monkeypatch):
    """Pretend stdin is a terminal, so approvals are asked (CliRunner's stdin is a pipe)."""
    monkeypatch.setattr(session, "stdin_is_tty", lambda: True)


def prepare(photos: str) -> dict:
    return call("prepare_dataset", {"images_dir": photos, "class_noun": "dog",
                                    "resolution": 64, "name": "rex"})


def chat(workspace, llm_url, *args, input=None, env=None):
    return runner.invoke(app, ["--workspace", workspace, "chat", "--base-url", llm_url, *args],
                         input=input, env=env)


def said(result) -> str:
    """What the user saw, with rich's line wrapping undone."""
    return " ".join(result.output.split())


def transcript_events(path) -> list[dict]:
    return read_transcript(path)[1]


def test_approval_typed_at_the_prompt_runs_the_call(tty, workspace, photos, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([prepare(photos), reply("Your dataset rex is ready.")]) as llm:
        result = chat(workspace, llm.base_url, "prepare my photos", "--transcript", str(path),
                      input="y\n")
    assert result.exit_code == 0, result.output
    assert "tool call: prepare_dataset" in said(result) and "[y] run" in said(result)
    assert "Your dataset rex is ready." in said(result)
    assert (tmp_path / "workspace" / "datasets" / "rex" / "manifest.json").is_file()
    kinds = [e["type"] for e in transcript_events(path)]
    assert kinds == ["user", "assistant", "approval", "tool_result", "assistant"]
    for body in llm.requests:
        check_request(body["messages"], body["tools"], body["model"])
    # The second request's system prompt already lists the dataset the first call made.
    first, second = (body["messages"][0]["content"] for body in llm.requests)
    assert "- rex: 3 images kept" not in first and "- rex: 3 images kept" in second


def test_the_chat_goes_on_after_the_goal_until_exit(tty, workspace, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([reply("Hello!"), reply("Bonjour !")]) as llm:
        result = chat(workspace, llm.base_url, "hi", "--transcript", str(path),
                      input="et en français ?\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert "Bonjour !" in said(result)
    users = [m["content"] for m in llm.requests[1]["messages"] if m["role"] == "user"]
    assert users == ["hi", "et en français ?"]  # the whole history goes each turn


def test_without_a_terminal_calls_are_refused_with_a_clear_message(workspace, photos, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([prepare(photos), reply("I could not run it.")]) as llm:
        result = chat(workspace, llm.base_url, "prepare my photos", "--transcript", str(path))
        assert len(llm.requests) == 1, "refused for want of a terminal: the turn ends at once"
    assert result.exit_code == 1, result.output  # the goal was not done
    assert "Nothing ran: no terminal" in said(result) and "rerun with --yes" in said(result)
    told = [e["message"]["content"] for e in transcript_events(path) if e["type"] == "approval"]
    assert told == [f"Cancelled by the user: {NO_TERMINAL}"]
    assert not (tmp_path / "workspace" / "datasets").exists()


def test_yes_approves_and_the_goal_can_come_from_stdin(workspace, photos, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([prepare(photos), reply("Done.")]) as llm:
        result = chat(workspace, llm.base_url, "--yes", "--transcript", str(path),
                      input="prepare my photos\n")
    assert result.exit_code == 0, result.output
    assert llm.requests[0]["messages"][-1] == {"role": "user", "content": "prepare my photos"}
    assert "approved automatically" in said(result)
    assert (tmp_path / "workspace" / "datasets" / "rex").is_dir()


def test_no_goal_and_nothing_on_stdin_is_a_clear_error(workspace):
    result = runner.invoke(app, ["--workspace", workspace, "chat"], input="")
    assert result.exit_code == 2
    assert "no goal" in said(result)


def test_endpoint_down_exits_non_zero_with_one_message_and_a_valid_transcript(workspace,
                                                                              tmp_path):
    with FakeLLM([]) as llm:
        url = llm.base_url
    path = tmp_path / "t.jsonl"
    result = chat(workspace, url, "hello", "--transcript", str(path))
    assert result.exit_code == 1
    errors = " ".join(result.stderr.split())
    assert f"Could not reach the model endpoint at {url}" in errors  # on stderr, not stdout
    assert "Could not reach" not in result.stdout
    assert "Traceback" not in said(result)
    assert [e["type"] for e in transcript_events(path)] == ["user", "endpoint_error"]


def test_a_session_that_ends_before_anything_is_said_leaves_no_transcript(tty, workspace,
                                                                        tmp_path):
    with FakeLLM([]) as llm:
        result = chat(workspace, llm.base_url, input="")  # Ctrl-D at the first prompt
    assert result.exit_code == 0, result.output
    assert "no transcript kept" in said(result)
    assert not list((tmp_path / "workspace" / "transcripts").glob("*.jsonl"))


def test_unknown_provider_is_a_clear_error(workspace):
    result = runner.invoke(app, ["--workspace", workspace, "chat", "hi", "--provider", "gpt"])
    assert result.exit_code == 2 and "Unknown provider 'gpt'" in said(result)


def test_the_api_key_never_reaches_the_transcript(workspace, tmp_path):
    key = "sk-live-0123456789abcdef"
    path = tmp_path / "t.jsonl"
    with FakeLLM([reply("Hi.")]) as llm:
        result = chat(workspace, llm.base_url, "hi", "--transcript", str(path),
                      env={"BOOTH_API_KEY": key})
    assert result.exit_code == 0, result.output
    header, _ = read_transcript(path)
    assert "key set" in header["endpoint"]
    assert key not in path.read_text()


def test_resume_continues_the_saved_conversation(workspace, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([reply("Rex is a fine dog.")]) as llm:
        assert chat(workspace, llm.base_url, "my dog is Rex", "--transcript",
                    str(path)).exit_code == 0
    with FakeLLM([reply("You told me: Rex.")]) as llm:
        result = chat(workspace, llm.base_url, "what is my dog's name?", "--resume", str(path))
        sent = llm.requests[0]["messages"]
    assert result.exit_code == 0, result.output
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "my dog is Rex" and sent[2]["content"] == "Rex is a fine dog."
    kinds = [e["type"] for e in transcript_events(path)]
    assert kinds == ["user", "assistant", "resumed", "user", "assistant"]
    # Into a new file: it holds the whole conversation and says where it came from.
    new = tmp_path / "new.jsonl"
    with FakeLLM([reply("Still Rex.")]) as llm:
        result = chat(workspace, llm.base_url, "again?", "--resume", str(path),
                      "--transcript", str(new))
        assert len(llm.requests[0]["messages"]) == 1 + 5
    header, events = read_transcript(new)
    assert header["resumed_from"] == str(path) and len(events) == 5 + 2


def test_resume_of_a_malformed_transcript_names_the_line(workspace, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "header", "format": "booth-transcript", "version": 1}\n{oops\n')
    result = runner.invoke(app, ["--workspace", workspace, "chat", "hi", "--resume", str(path)])
    assert result.exit_code == 2 and "bad.jsonl:2: not valid JSON" in said(result)


@pytest.mark.slow
def test_a_piped_session_without_yes_never_waits_for_input(workspace, photos, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([prepare(photos), reply("Not run.")]) as llm:
        # stdin stays open and silent: anything that read it would hang until the timeout.
        process = subprocess.Popen(
            [sys.executable, "-m", "booth.cli", "--workspace", workspace, "chat",
             "prepare my photos", "--base-url", llm.base_url, "--transcript", str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = _wait(process)
    assert process.returncode == 1, output
    assert "rerun with --yes" in output
    approvals = [e for e in transcript_events(path) if e["type"] == "approval"]
    assert approvals[0]["decision"] == "refused"
    assert json.dumps(NO_TERMINAL)[1:-1] in path.read_text()


def _wait(process: subprocess.Popen) -> str:
    """Wait without closing stdin (communicate() would close it and hide a hang)."""
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("booth chat waited for input on a non-terminal stdin")
    return process.stdout.read()


def test_retry_withdraws_the_answer_and_resume_does_not_bring_it_back(tty, workspace, tmp_path):
    path = tmp_path / "t.jsonl"
    with FakeLLM([reply("A dull answer."), reply("A better answer.")]) as llm:
        result = chat(workspace, llm.base_url, "name my dog", "--transcript", str(path),
                      input="/retry\n/exit\n")
        retried = llm.requests[1]["messages"]
    assert result.exit_code == 0, result.output
    assert "did not send the request" not in said(result)
    assert "A better answer." in said(result)
    assert [m["role"] for m in retried] == ["system", "user"]  # asked anew, without the old
    kinds = [e["type"] for e in transcript_events(path)]
    assert kinds == ["user", "assistant", "retracted", "assistant"]
    with FakeLLM([reply("Rex.")]) as llm:
        result = chat(workspace, llm.base_url, "and now?", "--resume", str(path))
        sent = llm.requests[0]["messages"]
    assert result.exit_code == 0, result.output
    assert [(m["role"], m["content"]) for m in sent[1:]] == [
        ("user", "name my dog"), ("assistant", "A better answer."), ("user", "and now?")]


def test_retry_with_nothing_to_retry_says_so(tty, workspace, tmp_path):
    with FakeLLM([]) as llm:
        result = chat(workspace, llm.base_url, "--transcript", str(tmp_path / "t.jsonl"),
                      input="/retry\n/exit\n")
        assert llm.requests == []
    assert result.exit_code == 0, result.output
    assert "nothing to retry yet" in said(result)


def test_the_word_empty_is_not_masked_without_a_key(workspace, tmp_path):
    """Local servers get the placeholder key "EMPTY"; it is no secret to mask."""
    path = tmp_path / "t.jsonl"
    with FakeLLM([reply("It is EMPTY: no photos yet.")]) as llm:
        result = chat(workspace, llm.base_url, "is my dataset EMPTY?", "--transcript", str(path),
                      env={"BOOTH_API_KEY": "", "MISTRAL_API_KEY": ""})
    assert result.exit_code == 0, result.output
    _, events = read_transcript(path)
    assert events[0]["message"]["content"] == "is my dataset EMPTY?"
    assert events[1]["content"] == "It is EMPTY: no photos yet."
    assert "***" not in path.read_text()


def test_global_options_after_chat_are_used_and_win_over_those_before(workspace, tmp_path):
    path = tmp_path / "t.jsonl"
    other = tmp_path / "other-workspace"
    with FakeLLM([reply("Hi.")]) as llm:
        result = runner.invoke(app, [
            "--workspace", workspace, "--base-model", "first/model", "chat", "hi",
            "--base-url", llm.base_url, "--transcript", str(path),
            "-w", str(other), "--base-model", "some-org/sd-model"])
        prompt = llm.requests[0]["messages"][0]["content"]
    assert result.exit_code == 0, result.output
    header, _ = read_transcript(path)
    assert header["workspace"] == str(other) and header["base_model"] == "some-org/sd-model"
    assert f"workspace: {other}" in prompt and "base model: some-org/sd-model" in prompt


def test_a_signal_at_the_chat_prompt_is_recorded_and_exits_143(tty, workspace, tmp_path,
                                                              monkeypatch):
    from booth.tools import Terminated

    def read(prompt):
        raise Terminated()  # SIGTERM while booth waits for the person

    monkeypatch.setattr(session, "reader", lambda ui: read)
    path = tmp_path / "t.jsonl"
    with FakeLLM([reply("Bonjour.")]) as llm:
        result = chat(workspace, llm.base_url, "salut", "--transcript", str(path))
    assert result.exit_code == 143, result.output
    ends = [e["text"] for e in transcript_events(path) if e["type"] == "interrupted"]
    assert ends == ["terminated (SIGTERM): the session ends"]
    assert f"booth chat --resume {path}" in " ".join(result.stderr.split())
