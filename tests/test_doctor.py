"""`booth doctor` as a person runs it: against the fake chat-completions server on loopback
serving calls structured, as text, or not at all, and with base models good and bad."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from fakellm import FakeLLM, call, reply
from typer.testing import CliRunner

from booth.cli import app

runner = CliRunner()
SAMPLE = call("sample", {"prompts": ["a photo of a dog"]})
TEXT_CALL = reply('[TOOL_CALLS]sample[ARGS]{"prompts": ["a dog"]}')
PARSER_FLAGS = "--tool-call-parser mistral --enable-auto-tool-choice"
CLEAN_ENV = {name: None for name in ("BOOTH_BASE_URL", "BOOTH_MODEL", "BOOTH_PROVIDER",
                                     "BOOTH_API_KEY", "BOOTH_WORKSPACE", "BOOTH_BASE_MODEL")}


def doctor(workspace, base_model, url, *args):
    return runner.invoke(app, ["--workspace", workspace, "--base-model", base_model, "doctor",
                               "--base-url", url, *args], env=CLEAN_ENV)


def lines(result) -> dict[str, str]:
    """{check name: its line} of the text output."""
    found = {}
    for line in result.output.splitlines():
        if line[:2] in ("✓ ", "✗ ", "! "):
            found[line[2:].split(":", 1)[0]] = line
    return found


def test_a_server_that_parses_calls_and_a_real_model_pass(workspace, tiny_model):
    with FakeLLM([SAMPLE, SAMPLE]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url)
        assert llm.remaining == 0  # one plain probe, one streamed: no more
    assert result.exit_code == 0, result.output
    checks = lines(result)
    assert checks["tool calls"].startswith("✓") and "sample(" in checks["tool calls"]
    assert checks["tool calls (streamed)"].startswith("✓")
    assert checks["endpoint"].startswith("✓") and checks["base model"].startswith("✓")
    assert checks["disk"].startswith("✓") and "a default run writes about" in checks["disk"]
    plain, streamed = llm.requests
    # Sent the way chat sends it: booth's real tools, no forced choice, streamed second.
    assert [t["function"]["name"] for t in plain["tools"]] == [
        "prepare_dataset", "generate_priors", "train", "sample", "resume_checkpoint"]
    assert "tool_choice" not in plain and "tool_choice" not in streamed
    assert not plain.get("stream") and streamed["stream"] is True
    assert plain["temperature"] == 0.15
    assert not list(Path(workspace).rglob("*.png"))  # no tool ran: nothing was sampled


def test_a_call_written_as_text_fails_and_names_the_server_flags(workspace, tiny_model):
    with FakeLLM([TEXT_CALL, TEXT_CALL]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url)
    assert result.exit_code == 1, result.output
    checks = lines(result)
    assert checks["tool calls"].startswith("✗") and "came back as text" in checks["tool calls"]
    assert PARSER_FLAGS in checks["tool calls"]
    assert checks["tool calls (streamed)"].startswith("✗")


def test_an_answer_without_any_call_fails(workspace, tiny_model):
    with FakeLLM([reply("Sure, here is a dog!")]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url, "--no-stream")
        assert len(llm.requests) == 1  # --no-stream: the plain probe only
    assert result.exit_code == 1
    checks = lines(result)
    assert "no tool call came back" in checks["tool calls"] and PARSER_FLAGS in result.output
    assert "tool calls (streamed)" not in checks


def test_llama_server_gets_its_own_flag(workspace, tiny_model):
    with FakeLLM([TEXT_CALL]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url, "--provider", "llamacpp",
                        "--no-stream")
    assert result.exit_code == 1 and "--jinja" in lines(result)["tool calls"]


def test_nothing_listening_fails_naming_the_url(workspace, tiny_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    result = doctor(workspace, tiny_model, url)
    assert result.exit_code == 1
    endpoint = lines(result)["endpoint"]
    assert endpoint.startswith("✗") and url in endpoint and "start the server" in endpoint
    assert "tool calls" not in lines(result)  # nothing to probe
    assert lines(result)["base model"].startswith("✓")  # the other checks still ran


def test_a_model_the_server_does_not_serve_fails_naming_it(workspace, tiny_model):
    with FakeLLM([], models=["other-model"]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url)
    assert result.exit_code == 1
    assert "other-model" in lines(result)["endpoint"] and "--model" in result.output


def test_json_has_the_same_checks(workspace, tiny_model):
    with FakeLLM([SAMPLE, SAMPLE, SAMPLE, SAMPLE]) as llm:
        text = doctor(workspace, tiny_model, llm.base_url)
        as_json = doctor(workspace, tiny_model, llm.base_url, "--json")
    assert as_json.exit_code == text.exit_code == 0
    report = json.loads(as_json.output)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == list(lines(text))
    marks = {"ok": "✓", "warn": "!", "fail": "✗"}
    assert [marks[c["status"]] for c in report["checks"]] == [
        line[0] for line in lines(text).values()]
    assert all(c["detail"] for c in report["checks"])


def test_json_of_a_failure_says_so_and_exits_1(workspace, tiny_model, tmp_path):
    result = doctor(workspace, str(tmp_path), "http://127.0.0.1:9/v1", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["ok"] is False
    failed = {c["name"] for c in report["checks"] if c["status"] == "fail"}
    assert {"endpoint", "base model"} <= failed


@pytest.mark.parametrize("make", ["empty", "index only", "no unet weights"])
def test_a_base_model_folder_that_is_not_a_model_fails(workspace, tiny_model, tmp_path, make):
    import shutil

    folder = tmp_path / "not-a-model"
    if make == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    elif make == "index only":
        folder.mkdir()
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    else:
        shutil.copytree(tiny_model, folder)
        for weights in (folder / "unet").glob("*.safetensors"):
            weights.unlink()
    with FakeLLM([SAMPLE, SAMPLE]) as llm:
        result = doctor(workspace, str(folder), llm.base_url)
    assert result.exit_code == 1, result.output
    base = lines(result)["base model"]
    assert base.startswith("✗") and str(folder) in base.replace("\n", "")
    assert lines(result)["tool calls"].startswith("✓")  # only the model failed


def test_a_gpu_short_of_free_memory_and_without_bitsandbytes_warns_but_passes(
        workspace, tiny_model, monkeypatch):
    """The CUDA branch, on a machine without one: torch's answers about the GPU replaced."""
    import importlib.util

    import torch

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (3 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "bitsandbytes" else real_find_spec(name, *a))
    with FakeLLM([SAMPLE]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url, "--no-stream")
    assert result.exit_code == 0, result.output
    checks = lines(result)
    assert checks["gpu"].startswith("!") and "NVIDIA T4, 16.0 GB, 3.0 GB free" in checks["gpu"]
    assert "use_lora" in checks["gpu"]
    assert checks["bf16"].startswith("!") and "fp16" in checks["bf16"]
    assert checks["8-bit adam"].startswith("!") and "pip install bitsandbytes" in result.output


def test_an_unknown_provider_is_a_usage_error(workspace, tiny_model):
    result = doctor(workspace, tiny_model, "http://127.0.0.1:9/v1", "--provider", "nope")
    assert result.exit_code == 2 and "Unknown provider 'nope'" in result.output
    assert not lines(result)  # no check ran on settings that mean nothing


def test_only_the_streamed_probe_failing_suggests_no_stream(workspace, tiny_model):
    with FakeLLM([SAMPLE, TEXT_CALL]) as llm:
        result = doctor(workspace, tiny_model, llm.base_url)
    assert result.exit_code == 1
    checks = lines(result)
    assert checks["tool calls"].startswith("✓") and "--no-stream" not in checks["tool calls"]
    assert checks["tool calls (streamed)"].startswith("✗")
    assert "chat with --no-stream" in checks["tool calls (streamed)"]


def test_a_server_that_echoes_the_key_never_shows_it(workspace, tiny_model):
    from fakellm import error

    key = "sk-doctor-0123456789"
    with FakeLLM([error(401, f"bad key {key}"), error(401, f"bad key {key}")]) as llm:
        result = runner.invoke(app, ["-w", workspace, "--base-model", tiny_model, "doctor",
                                     "--base-url", llm.base_url, "--api-key", key, "--json"])
    assert key not in result.output and "***" in result.output
