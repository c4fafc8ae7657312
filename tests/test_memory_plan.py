"""Memory plans before approving a training call, against the field's ladder (SD-1.5, 512 px).
No GPU here: the card's free memory is injected through ToolContext.free_gpu_memory, the one
place a stand-in for CUDA is right."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_train import make_dataset

from booth.agent.approval import AskUser, AutoApprove
from booth.agent.ui import ChatUI
from booth.tools import get_tool
from booth.tools.calibration import record
from booth.tools.memory import GB, SD15, Knobs, needed_bytes, parameter_counts, plan

FULL = Knobs()  # SD-1.5 at 512 px, subject + class image, text encoder trained, fp32
RUNG_16 = Knobs(mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True)
RUNG_12 = Knobs(mixed_precision="fp16", gradient_checkpointing=True, use_8bit_adam=True,
                train_text_encoder=False)
LORA = Knobs(mixed_precision="fp16", use_lora=True, train_text_encoder=False)


def test_the_plans_follow_the_ladder_of_the_field():
    gigabytes = {name: needed_bytes(SD15, knobs) / GB for name, knobs in
                 [("full", FULL), ("16", RUNG_16), ("12", RUNG_12), ("lora", LORA)]}
    assert 22 <= gigabytes["full"] <= 26          # "at least 24 GB"
    assert gigabytes["16"] <= 16                  # fits a 16 GB card
    assert 8.5 <= gigabytes["12"] <= 12           # a T4 ran it in 9.9 GB
    assert gigabytes["lora"] <= 8                 # LoRA "~8 GB"
    assert gigabytes["full"] > gigabytes["16"] > gigabytes["12"] > gigabytes["lora"]
    # Twice the pixels' side, four times the activations.
    assert needed_bytes(SD15, Knobs(resolution=1024)) > needed_bytes(SD15, FULL) + 25 * GB


@pytest.mark.parametrize("free_gb, rung", [
    (40, None), (17, "mixed_precision='fp16', gradient_checkpointing=true, use_8bit_adam=true"),
    (11, "the same and train_text_encoder=false"), (8, "use_lora=true with mixed_precision"),
])
def test_a_plan_that_does_not_fit_names_the_first_rung_that_does(free_gb, rung):
    result = plan(SD15, FULL, free_gb * GB)
    assert result.fits == (rung is None)
    if rung:
        assert result.rung.startswith(rung) and "will not fit; fits with" in result.words()


def test_the_tiny_models_own_counts_are_read_from_its_headers(tiny_model):
    counts = parameter_counts(tiny_model)
    assert 1e6 < counts["unet"] < 3e6 and counts["text_encoder"] < 1e6  # not SD-1.5's


@pytest.fixture
def on_an_11_gb_card(tool_context):
    """SD-1.5 from the hub (not on disk, so its known counts apply) on a card with 11 GB free."""
    make_dataset(tool_context.workspace.root, size=512)
    tool_context.base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    tool_context.free_gpu_memory = lambda: 11 * GB
    return tool_context


CALL = {"dataset": "rex", "max_train_steps": 800, "learning_rate": 5e-6}


def test_under_yes_a_call_that_cannot_fit_is_refused_with_the_rung_that_fits(on_an_11_gb_card):
    tool = get_tool("train")
    out = io.StringIO()
    decision = AutoApprove(ui=ChatUI(Console(file=out, width=200))).decide(
        tool, "x", tool.validate(CALL), on_an_11_gb_card)
    assert decision.action == "refuse"  # the model reads why and can propose the rung
    assert "will not fit; fits with the same and train_text_encoder=false" in decision.reason
    assert "11.0 GB free" in out.getvalue()
    fitting = tool.validate({**CALL, "mixed_precision": "fp16", "gradient_checkpointing": True,
                             "use_8bit_adam": True, "train_text_encoder": False})
    assert AutoApprove(ui=ChatUI(Console(file=io.StringIO()))).decide(
        tool, "y", fitting, on_an_11_gb_card).action == "run"


def test_a_person_is_warned_and_decides(on_an_11_gb_card):
    tool = get_tool("train")
    out = io.StringIO()
    policy = AskUser(ui=ChatUI(Console(file=out, width=200)), input=lambda prompt: "y")
    assert policy.decide(tool, "x", tool.validate(CALL), on_an_11_gb_card).action == "run"
    shown = " ".join(out.getvalue().split())
    assert "will not fit" in shown and "probably run out of GPU memory" in shown


def test_a_measured_peak_corrects_the_plan(on_an_11_gb_card):
    from booth.dreambooth.config import TrainConfig
    from booth.tools.train import _planned_config, _setup

    tool = get_tool("train")
    config = _planned_config(on_an_11_gb_card, tool.validate(CALL))
    assert isinstance(config, TrainConfig)
    record(on_an_11_gb_card.workspace.root, _setup(config), 10, 5.0, 1.0, peak_memory=9 * GB)
    plan_now = tool.memory_plan(on_an_11_gb_card, tool.validate(CALL))
    assert plan_now.fits and plan_now.source == "measured"
    assert "needs ~9.0 GB of GPU memory (measured)" in plan_now.words()


def test_without_a_gpu_there_is_no_plan(tool_context):
    make_dataset(tool_context.workspace.root)
    tool_context.free_gpu_memory = lambda: None
    tool = get_tool("train")
    assert tool.memory_plan(tool_context, tool.validate(CALL)) is None


def test_the_system_prompt_knows_the_free_memory_the_server_and_the_measured_speed(
        tool_context):
    from booth.agent.prompt import build_system_prompt
    from booth.tools.calibration import Setup

    record(tool_context.workspace.root, Setup("train", "cuda (H200)", "m", 512, 2), 100, 42.0,
           10.0)
    tool_context.free_gpu_memory = lambda: 21.5 * 2**30
    prompt = build_system_prompt(tool_context, gpu_note="the LLM server frees its GPU memory "
                                 "while train/sample run")
    assert "22 GB free now" in prompt
    assert "the LLM server frees its GPU memory while train/sample run" in prompt
    assert "training measured here: 0.42 s/step at 512 px" in prompt
    tool_context.free_gpu_memory = lambda: None  # on the CPU: no memory facts, no server note
    prompt = build_system_prompt(tool_context, gpu_note="the LLM server frees ...")
    assert "GB free" not in prompt and "the LLM server frees" not in prompt


def test_the_last_rung_is_a_batch_of_one_image_without_priors_and_two_with():
    from booth.tools.memory import LADDER, _rung

    last = LADDER[-1][1]
    assert _rung(Knobs(examples=4, priors=False), last).examples == 1
    assert _rung(Knobs(examples=4, priors=True), last).examples == 2


def _share(llm, provider: str, ctx):
    """GpuShare as `booth chat --share-gpu always` wires it into the memory plan."""
    from booth.agent.gpu_share import GpuShare
    from booth.agent.settings import EndpointSettings

    settings = EndpointSettings(base_url=llm.base_url, model=llm.model, provider=provider,
                                max_retries=0, stream=False)
    share = GpuShare(settings, "always", lambda text: None, lambda: True)
    ctx.server_gives_back = lambda: share.gives_back(ctx.used_gpu_memory)
    return share


def _decide(ctx) -> tuple[str, str]:
    tool, out = get_tool("train"), io.StringIO()
    decision = AutoApprove(ui=ChatUI(Console(file=out, width=200))).decide(
        tool, "x", tool.validate(CALL), ctx)
    return decision.action, " ".join(out.getvalue().split())


@pytest.mark.parametrize("loaded, action, shown", [
    ([{"name": "MODEL", "size_vram": 20 * GB}], "run", "+ 20.0 GB the LLM server frees"),
    ([{"name": "other-model", "size_vram": 20 * GB}], "refuse", "11.0 GB free:"),
    ([{"name": "MODEL", "size_vram": "lots"}], "refuse", "11.0 GB free:"),
    ("not a list", "refuse", "11.0 GB free:"),
])
def test_what_ollama_frees_counts_in_the_plan(on_an_11_gb_card, loaded, action, shown):
    from fakellm import FakeLLM

    with FakeLLM([]) as llm:
        if isinstance(loaded, list):
            loaded = [{**m, "name": llm.model if m["name"] == "MODEL" else m["name"]}
                      for m in loaded]
        llm.info["/api/ps"] = {"models": loaded}
        _share(llm, "ollama", on_an_11_gb_card)
        decided, said = _decide(on_an_11_gb_card)
    assert decided == action and shown in said


@pytest.mark.parametrize("info, action", [
    ({"/is_sleeping": {"is_sleeping": False}}, "run"),  # 30 GB in use on the card: vLLM's
    ({}, "refuse"),  # no sleep mode (404): nothing is freed, nothing counted
])
def test_what_a_sleeping_vllm_frees_counts_in_the_plan(on_an_11_gb_card, info, action):
    from fakellm import FakeLLM

    on_an_11_gb_card.used_gpu_memory = lambda: 30 * GB
    with FakeLLM([], info=info) as llm:
        _share(llm, "vllm", on_an_11_gb_card)
        decided, said = _decide(on_an_11_gb_card)
    assert decided == action
    assert ("+ 30.0 GB the LLM server frees" in said) == (action == "run")


def test_a_server_that_does_not_answer_leaves_the_plan_as_it_was(on_an_11_gb_card):
    from fakellm import FakeLLM

    with FakeLLM([]) as llm:
        _share(llm, "ollama", on_an_11_gb_card)
    # The server is gone: the question fails at once and counts nothing.
    assert _decide(on_an_11_gb_card)[0] == "refuse"
