"""A training setting is defined once, in TrainConfig: the tool's schema, its validation and the
engine's check all come from it, and the engine's user errors leave through one door."""

from __future__ import annotations

import json

import pytest

from booth.dreambooth.config import TrainConfig, load_config
from booth.dreambooth.errors import ConfigError, UserError
from booth.schema import settings_of, settings_schema
from booth.tools import ToolArgumentError, ToolError, get_tool

TRAIN = get_tool("train")
VALID = {"dataset": "rex", "max_train_steps": 2, "learning_rate": 1e-4}


def test_every_setting_of_the_config_is_a_parameter_of_train_with_the_same_bounds():
    properties = TRAIN.parameters["properties"]
    for name, schema in settings_schema(TrainConfig)["properties"].items():
        assert name in properties, f"{name} is not reachable through booth call"
        tool_side = {k: v for k, v in properties[name].items() if k not in ("description",
                                                                            "default")}
        config_side = {k: v for k, v in schema.items() if k != "description"}
        assert tool_side == config_side, name


def test_defaults_are_the_configs_own():
    for name, (_, default) in settings_of(TrainConfig).items():
        if name in TRAIN.parameters["required"] or default is None:
            continue
        if name in ("base_model", "resolution", "instance_prompt"):  # session / dataset
            assert name not in TRAIN.defaults
            continue
        assert TRAIN.defaults[name] == default, name


@pytest.mark.parametrize("name, value", [
    ("lr_scheduler", "cosine_with_restarts"),   # the tool used to know 4 of the 6 schedules
    ("lr_scheduler", "polynomial"),
    ("learning_rate", 0.5),                     # the config allows (0, 1); the tool said <= 0.01
    ("resolution", 1536),                       # no cap at 1024 in the config
    ("max_grad_norm", 0.5),                     # never reachable before
    ("adam_weight_decay", 0.0),
    ("instance_prompt", "a photo of sks dog on grass"),
])
def test_what_the_config_accepts_the_tool_accepts(name, value):
    TRAIN.validate({**VALID, name: value})
    load_config(None, **{name: value, "instance_images": ["x.png"], "prior_loss_weight": 0}
                ).check()


@pytest.mark.parametrize("name, value", [
    ("learning_rate", 1.5), ("learning_rate", 0), ("lr_scheduler", "step"),
    ("resolution", 100), ("lora_rank", 0), ("adam_beta1", 1.0), ("seed", -1),
    ("learning_rate", float("nan")),
])
def test_what_the_schema_refuses_the_engine_refuses(name, value):
    with pytest.raises(ToolArgumentError, match=name if value == value else "not a number"):
        TRAIN.validate({**VALID, name: value})
    config = TrainConfig(instance_images=["x.png"], prior_loss_weight=0, **{name: value})
    with pytest.raises(ConfigError, match=name if value == value else "not a number"):
        config.check()


def test_a_run_yaml_edited_out_of_bounds_is_refused_with_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    TrainConfig(instance_images=["x.png"], prior_loss_weight=0).save_yaml(path)
    path.write_text(path.read_text().replace("learning_rate: 5.0e-06", "learning_rate: 2.0"))
    with pytest.raises(ConfigError, match="learning_rate: 2.0 is greater than"):
        load_config(path).check()
    path.write_text("{not yaml: [")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


def test_the_model_sees_a_chosen_list_and_the_rest_stays_valid_and_validated():
    shown = TRAIN.openai_spec()["function"]["parameters"]
    assert set(shown["properties"]) < set(TRAIN.parameters["properties"])
    assert "max_grad_norm" not in shown["properties"]
    assert shown["required"] == ["dataset", "max_train_steps", "learning_rate"]
    with pytest.raises(ToolArgumentError, match="max_grad_norm"):
        TRAIN.validate({**VALID, "max_grad_norm": -1})
    json.dumps(shown)


def test_booth_call_reaches_a_setting_the_model_is_not_shown(tool_context, monkeypatch):
    from test_train import make_dataset

    from booth.dreambooth import trainer

    seen = {}

    def capture(config, **kwargs):
        seen["config"] = config
        raise UserError("stopped by the test")

    make_dataset(tool_context.workspace.root)
    monkeypatch.setattr(trainer, "train", capture)
    with pytest.raises(ToolError, match="stopped by the test"):
        TRAIN.run(tool_context, {**VALID, "prior_loss_weight": 0, "max_grad_norm": 0.25,
                                 "adam_weight_decay": 0.0, "lora_rank": 8})
    config = seen["config"]
    assert (config.max_grad_norm, config.adam_weight_decay, config.lora_rank) == (0.25, 0.0, 8)
    assert config.adam_beta2 == TrainConfig.adam_beta2  # left at the config's default


def test_an_instance_prompt_without_the_identifier_is_refused(tool_context):
    from test_train import make_dataset

    make_dataset(tool_context.workspace.root)
    with pytest.raises(ToolError, match="does not contain the identifier 'sks'"):
        TRAIN.run(tool_context, {**VALID, "prior_loss_weight": 0,
                                 "instance_prompt": "a photo of my dog"})


def test_a_bug_in_the_engine_keeps_its_traceback_instead_of_posing_as_a_user_error(
        tool_context, monkeypatch):
    from test_train import make_dataset

    from booth.dreambooth import trainer

    def bug(config, **kwargs):
        raise FileNotFoundError("a bug, not the user's doing")

    make_dataset(tool_context.workspace.root)
    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(FileNotFoundError):  # not turned into a ToolError for the model
        TRAIN.run(tool_context, {**VALID, "prior_loss_weight": 0})


@pytest.mark.parametrize("tool, arguments", [
    ("train", {**VALID, "run_name": "a..b"}),
    ("train", {**VALID, "dataset": "a..b"}),
    ("train", {**VALID, "base_model": "models/\x00sd"}),
    ("sample", {"prompts": ["a dog"], "run": "a..b"}),
    ("sample", {"prompts": ["   "]}),
    ("prepare_dataset", {"images_dir": "photos/\x00rex", "class_noun": "dog"}),
    ("prepare_dataset", {"images_dir": "photos", "class_noun": "  "}),
    ("prepare_dataset", {"images_dir": "photos", "class_noun": "dog", "name": "a..b"}),
    ("generate_priors", {"class_prompt": " \t "}),
    ("generate_priors", {"class_prompt": "a dog", "base_model": "\x00"}),
    ("resume_checkpoint", {"run": "..", "checkpoint": "latest"}),
])
def test_the_schema_refuses_what_the_tool_would(tool, arguments):
    # Refused by the schema, such a call counts as invalid (the model is told at once, and
    # it does not reset the cap on invalid calls) and is never put to the user under -y.
    with pytest.raises(ToolArgumentError):
        get_tool(tool).validate(arguments)


@pytest.mark.parametrize("tool, arguments, words", [
    ("train", {**VALID, "run_name": "my run!"}, "run_name: 'my run!' is not allowed: use 1-64 "
     "letters, digits, '.', '_' or '-', starting with a letter or digit, with no '..'"),
    ("resume_checkpoint", {"run": "rex", "checkpoint": "step 5"},
     "checkpoint: 'step 5' is not allowed: use 'latest', 'checkpoint-<step>' or '<step>'"),
    ("sample", {"prompts": [" "]}, "prompts.0: ' ' is not allowed: use some text (not blank)"),
])
def test_a_name_that_breaks_a_rule_is_told_the_rule_in_words(tool, arguments, words):
    with pytest.raises(ToolArgumentError) as error:
        get_tool(tool).validate(arguments)
    assert words in str(error.value) and "^" not in str(error.value)


def test_one_prompt_typed_on_the_command_line_is_a_list_of_one():
    from booth.tools.registry import parse_words

    sample = get_tool("sample")
    assert parse_words(["prompts=a photo of sks dog"], sample.parameters) == {
        "prompts": ["a photo of sks dog"]}
    assert parse_words(['prompts=["a", "b"]'], sample.parameters) == {"prompts": ["a", "b"]}
    assert parse_words(["prompts=42"], sample.parameters) == {"prompts": ["42"]}
    sample.validate(parse_words(["prompts=a photo of sks dog"], sample.parameters))


def test_a_huge_invalid_list_gives_a_short_message():
    with pytest.raises(ToolArgumentError) as error:
        get_tool("sample").validate({"prompts": [1] * 200_000})
    assert len(str(error.value)) < 2000 and str(error.value).endswith("and more")
