"""The command line as a user or a script meets it: exit codes, stdout/stderr, no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from booth.cli import app

runner = CliRunner()


def booth(*args: str, workspace: str | None = None):
    prefix = ["--workspace", workspace] if workspace else []
    return runner.invoke(app, [*prefix, *args])


def test_help_does_not_import_torch_diffusers_or_openai():
    code = (
        "import sys\n"
        "from booth.cli import app\n"
        "try:\n"
        "    app(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'openai', 'accelerate')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_tools_json_prints_the_schemas_sent_to_the_model():
    result = booth("tools", "--json")
    assert result.exit_code == 0
    specs = json.loads(result.stdout)
    assert [s["function"]["name"] for s in specs] == [
        "prepare_dataset", "generate_priors", "train", "sample", "resume_checkpoint",
    ]
    assert all(s["type"] == "function" for s in specs)


def test_tools_table_lists_every_tool():
    result = booth("tools")
    assert result.exit_code == 0
    for name in ("prepare_dataset", "generate_priors", "train", "sample", "resume_checkpoint"):
        assert name in result.stdout


def test_unknown_tool_exits_2_and_names_the_real_ones(workspace):
    result = booth("call", "fine_tune", "{}", workspace=workspace)
    assert result.exit_code == 2
    assert "unknown tool 'fine_tune'" in result.stderr
    assert "prepare_dataset" in result.stderr


def test_invalid_arguments_exit_2_and_run_nothing(workspace, tmp_path):
    result = booth("call", "sample", '{"prompts": "a dog", "seed": -1}', workspace=workspace)
    assert result.exit_code == 2
    assert "prompts: 'a dog' is not of type 'array'" in result.stderr
    assert "seed: -1 is less than the minimum of 0" in result.stderr
    assert result.stdout == ""
    assert list((tmp_path / "workspace").iterdir()) == []


def test_broken_json_and_bad_key_value_words_are_explained(workspace):
    result = booth("call", "sample", '{"prompts": [', workspace=workspace)
    assert result.exit_code == 2
    assert "not valid JSON" in result.stderr
    result = booth("call", "sample", "prompts", workspace=workspace)
    assert result.exit_code == 2
    assert "give one JSON object or key=value pairs" in result.stderr


def test_key_value_arguments_are_read_as_json_when_they_parse(workspace):
    # An unknown run makes the tool fail after validation: proof the words were accepted.
    result = booth(
        "call", "sample", 'prompts=["a photo of sks dog"]', "run=nope", "seed=3",
        workspace=workspace,
    )
    assert result.exit_code == 1, result.output
    assert "nope" in result.stderr


def test_tiny_model_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = booth("tiny-model", str(tmp_path))
    assert result.exit_code == 2
    assert "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_workspace_folder_may_be_a_link_to_another_disk(tmp_path):
    from booth.tools.workspace import Workspace

    (tmp_path / "big-disk" / "runs").mkdir(parents=True)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "runs").symlink_to(tmp_path / "big-disk" / "runs")
    run = Workspace.from_option(str(tmp_path / "ws")).run_dir("rex")
    assert run == (tmp_path / "ws" / "runs" / "rex")
