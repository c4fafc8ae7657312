"""The fixed prefix of every request (system prompt + tool schemas) stays within its token
budget, counted by Mistral's tokenizer, and still carries what the model needs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from booth.tools import TOOLS

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "prompt_tokens.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("prompt_tokens", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("mistral_common")
    return bench.load_tokenizer()  # ~1.4 s: once for the module


def test_system_prompt_tools_and_a_goal_fit_the_budget(tokenizer):
    parts = bench.breakdown(tokenizer)
    assert parts["total"] <= bench.BUDGET, (
        f"the fixed prefix costs {parts['total']} tokens, over the budget of {bench.BUDGET}: "
        f"{parts}. Shorten prompt text or schema descriptions (python {BENCH.name})")


def test_the_breakdown_adds_up_and_names_every_tool(tokenizer):
    parts = bench.breakdown(tokenizer)
    assert {f"tool {name}" for name in TOOLS} <= set(parts)
    tools = sum(parts[f"tool {name}"] for name in TOOLS)
    # Each part is measured alone; together they may differ only by the framing they share.
    assert abs(parts["tool schemas"] - tools) < 10 * len(TOOLS)
    whole = parts["system prompt"] + parts["tool schemas"] + parts["user message and framing"]
    assert abs(parts["total"] - whole) < 10


def test_a_longer_prompt_is_counted_longer(tokenizer):
    system = bench.empty_workspace_prompt()
    assert bench.count(tokenizer, system + " Always answer twice.") > bench.count(tokenizer, system)


def test_every_setting_the_prompt_names_is_one_the_model_is_shown():
    system = bench.empty_workspace_prompt()
    shown = {name for tool in TOOLS.values()
             for name in tool.openai_spec()["function"]["parameters"]["properties"]}
    every = {name for tool in TOOLS.values() for name in tool.parameters["properties"]}
    named = {word for word in re.findall(r"\b[a-z]+(?:_[a-z0-9]+)+\b", system) if word in every}
    assert {"mixed_precision", "gradient_checkpointing", "use_8bit_adam", "train_text_encoder",
            "use_lora"} <= named
    assert named <= shown, f"the prompt names settings the model cannot set: {named - shown}"


def test_the_lean_prompt_keeps_what_the_model_needs():
    system = bench.empty_workspace_prompt()
    for needed in ("prepare_dataset", "generate_priors", "train", "sample",  # the plan
                   "step-400 checkpoint", "resume_checkpoint",              # follow-ups
                   "user's language", "exact names", "Before each tool call",
                   "minors", "without their consent", "~8 GB"):
        assert needed in system, needed


def test_the_model_is_sent_no_validation_only_text_and_a_call_breaking_it_still_fails():
    sample = TOOLS["sample"]
    sent = sample.openai_spec()["function"]["parameters"]["properties"]
    assert "pattern" not in sent["run"] and "maxLength" not in sent["prompts"]["items"]
    assert "maximum" not in sent["seed"] and "minimum" not in sent["num_images_per_prompt"]
    assert sent["height"]["maximum"] == 1024 and sent["height"]["multipleOf"] == 8  # guides
    assert sent["prompts"]["maxItems"] == 16
    from booth.tools import ToolArgumentError

    for bad in ({"run": "../etc"}, {"seed": 2**40}, {"num_images_per_prompt": 0},
                {"prompts": ["x" * 1001]}):
        with pytest.raises(ToolArgumentError):
            sample.validate({"prompts": ["a dog"], **bad})


def test_settings_hidden_from_the_model_stay_settable():
    priors = TOOLS["generate_priors"]
    assert "batch_size" not in priors.openai_spec()["function"]["parameters"]["properties"]
    assert priors.validate({"class_prompt": "a dog", "batch_size": 8})["batch_size"] == 8
    train = TOOLS["train"]
    assert "run_name" not in train.openai_spec()["function"]["parameters"]["properties"]
    train.validate({"dataset": "rex", "max_train_steps": 2, "learning_rate": 1e-4,
                    "run_name": "rex-v2", "seed": 3})
