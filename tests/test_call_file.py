"""`booth call TOOL @FILE [key=value ...]`: arguments from a YAML/JSON file, and the args.yaml
every train run leaves so that it can be repeated."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from test_train import losses, make_dataset
from typer.testing import CliRunner

from booth.cli import app

runner = CliRunner()


def booth(workspace, *args: str, base_model: str | None = None):
    prefix = ["--workspace", str(workspace)]
    if base_model:
        prefix += ["--base-model", base_model]
    return runner.invoke(app, [*prefix, *args])


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("dir", "is a folder, not a file"),
    ("- a\n- b\n", "must hold a mapping of argument names to values (name: value lines), "
                   "not list"),
    ("", "is empty: write one `name: value` line per argument"),
    ("1: a\n", "must hold a mapping of argument names to values"),
    ("prompts: [a dog\nseed: 3\n", "is not valid YAML/JSON"),
    (b"prompts: \xff\xfe\n", "cannot read argument file"),
    ("prompts: [a dog]\nsteps: 4\nbogus: 1\n", "unknown field(s) 'bogus', 'steps'"),
    ('{"prompts": ["a dog"], "seed": -1}', "seed: -1 is less than the minimum of 0"),
])
def test_a_bad_argument_file_is_one_clear_line_with_exit_2(tmp_path, monkeypatch, content,
                                                           message):
    monkeypatch.chdir(tmp_path)
    if content == "dir":
        (tmp_path / "args.yaml").mkdir()
    elif isinstance(content, bytes):
        (tmp_path / "args.yaml").write_bytes(content)
    elif content is not None:
        (tmp_path / "args.yaml").write_text(content)
    error = one_line_error(booth(tmp_path / "ws", "call", "sample", "@args.yaml"))
    assert message in error
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())


def test_a_file_of_a_megabyte_and_a_bare_at_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.yaml").write_text("seed: 1\n" + "#" * 1_000_001)
    assert "over 1,000,000 bytes" in one_line_error(booth(tmp_path, "call", "sample", "@big.yaml"))
    assert "give a file after @" in one_line_error(booth(tmp_path, "call", "sample", "@"))


def test_pairs_after_the_file_override_it_and_1e_4_is_a_number(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "args.yaml").write_text(
        "prompts: [a photo of sks dog]\nguidance_scale: 1e+1\nseed: 3\n")
    result = booth(tmp_path / "ws", "call", "sample", "@sub/args.yaml", "seed=5", "--dry-run")
    assert result.exit_code == 0, result.output
    arguments = json.loads(result.stdout)["arguments"]
    assert arguments["seed"] == 5 and arguments["guidance_scale"] == 10.0
    assert arguments["prompts"] == ["a photo of sks dog"]
    # JSON files are YAML too.
    (tmp_path / "args.json").write_text('{"prompts": ["a dog"], "num_images_per_prompt": 2}')
    result = booth(tmp_path / "ws", "call", "sample", "@args.json", "--dry-run")
    assert json.loads(result.stdout)["arguments"]["num_images_per_prompt"] == 2


@pytest.fixture(scope="module")
def repeated(tmp_path_factory, tiny_model):
    """rex-1 trained from the command line, then repeated from its args.yaml as rex-2."""
    root = tmp_path_factory.mktemp("ws")
    make_dataset(root)
    start = os.getcwd()
    os.chdir(root)
    try:
        first = booth(root, "call", "train", "dataset=rex", "max_train_steps=3",
                      "learning_rate=1e-3", "prior_loss_weight=0", "run_name=rex-1",
                      "report_to=none", "seed=4", "checkpointing_steps=10",
                      base_model=tiny_model)
        again = booth(root, "call", "train", "@runs/rex-1/args.yaml", "run_name=rex-2")
        clash = booth(root, "call", "train", "@runs/rex-1/args.yaml")
    finally:
        os.chdir(start)
    return root, first, again, clash


@pytest.mark.slow
def test_a_run_repeated_from_its_args_yaml_has_the_same_losses(repeated, tiny_model):
    root, first, again, _ = repeated
    assert first.exit_code == 0, first.output
    assert again.exit_code == 0, again.output
    args = yaml.safe_load((root / "runs/rex-1/args.yaml").read_text())
    assert args["run_name"] == "rex-1" and args["seed"] == 4
    assert args["base_model"] == str(tiny_model) and args["learning_rate"] == 1e-3
    assert "instance_prompt" not in args  # not given: the dataset's, not pinned
    one, two = losses(root / "runs/rex-1"), losses(root / "runs/rex-2")
    assert len(one) == 3
    assert [r["loss"] for r in one] == [r["loss"] for r in two]
    assert yaml.safe_load((root / "runs/rex-2/args.yaml").read_text())["run_name"] == "rex-2"
    assert not list((root / "runs/rex-1").glob(".tmp-*"))


@pytest.mark.slow
def test_repeating_without_a_new_name_refuses_and_keeps_the_first_run(repeated):
    root, _, _, clash = repeated
    assert clash.exit_code == 1
    assert "run 'rex-1' already exists" in clash.stderr and "Traceback" not in clash.stderr
    assert len(losses(root / "runs/rex-1")) == 3


@pytest.mark.slow
def test_args_yaml_is_there_while_the_run_trains(tool_context, monkeypatch):
    """A run killed at any point, even before its first step, can be repeated too."""
    from booth.dreambooth import trainer
    from booth.tools import get_tool

    make_dataset(tool_context.workspace.root)
    run_dir = tool_context.workspace.run_dir("early")
    seen = []
    real = trainer.save_checkpoint

    def checkpoint(accelerator, folder, state):
        seen.append((run_dir / "args.yaml").is_file())
        return real(accelerator, folder, state)

    monkeypatch.setattr(trainer, "save_checkpoint", checkpoint)
    get_tool("train").run(tool_context, {
        "dataset": "rex", "max_train_steps": 3, "learning_rate": 1e-3, "prior_loss_weight": 0,
        "run_name": "early", "report_to": "none", "checkpointing_steps": 2})
    assert seen == [True, True]
