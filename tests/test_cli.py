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
    assert "not an empty folder" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_a_workspace_folder_may_be_a_link_to_another_disk(tmp_path):
    from booth.tools.workspace import Workspace

    (tmp_path / "big-disk" / "runs").mkdir(parents=True)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "runs").symlink_to(tmp_path / "big-disk" / "runs")
    run = Workspace.from_option(str(tmp_path / "ws")).run_dir("rex")
    assert run == (tmp_path / "ws" / "runs" / "rex")


def wide(*args: str, env: dict | None = None):
    """A run whose help and tables are not wrapped (rich reads COLUMNS when not on a tty)."""
    return runner.invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})


def test_version_prints_the_package_version():
    from booth import __version__

    result = booth("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"booth {__version__}"


def workspace_seen(*args: str, env: dict | None = None) -> str:
    result = runner.invoke(app, [*args], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["workspace"]


def test_the_workspace_option_works_before_or_after_the_command(tmp_path):
    a, b, c = (str(tmp_path / name) for name in "abc")
    assert workspace_seen("--workspace", a, "ls", "--json") == a
    assert workspace_seen("ls", "--json", "--workspace", b) == b
    assert workspace_seen("ls", "-w", b, "--json") == b
    # Both given: the later one (after the command) wins.
    assert workspace_seen("-w", a, "ls", "-w", b, "--json") == b
    # The environment is the fallback; an option in either place overrides it.
    assert workspace_seen("ls", "--json", env={"BOOTH_WORKSPACE": c}) == c
    assert workspace_seen("-w", a, "ls", "--json", env={"BOOTH_WORKSPACE": c}) == a
    assert workspace_seen("ls", "--json", "-w", b, env={"BOOTH_WORKSPACE": c}) == b


def test_a_later_invocation_does_not_inherit_an_earlier_ones_options(tmp_path):
    assert workspace_seen("ls", "--json", "-w", str(tmp_path / "a")) == str(tmp_path / "a")
    assert workspace_seen("ls", "--json", env={"BOOTH_WORKSPACE": str(tmp_path / "d")}) == str(
        tmp_path / "d")


def test_global_options_after_call_reach_the_tool(workspace, tmp_path):
    missing = tmp_path / "no-such-model"
    result = runner.invoke(app, ["call", "generate_priors", "class_prompt=a photo of a dog",
                                 "num_images=1", "--workspace", workspace,
                                 "--base-model", str(missing)])
    assert result.exit_code == 1
    assert str(missing) in " ".join(result.stderr.split())
    assert not (tmp_path / "booth-workspace").exists()


def test_every_command_has_the_global_options_in_its_help():
    from typer.main import get_command

    for name in get_command(app).commands:
        result = wide(name, "--help")
        assert result.exit_code == 0, name
        assert "--workspace" in result.stdout and "--base-model" in result.stdout, name


def test_top_level_help_lists_each_command_with_one_whole_sentence():
    from typer.main import get_command

    result = wide("--help")
    rows = {line.split()[1]: line for line in result.stdout.splitlines()
            if line.startswith("│ ") and len(line.split()) > 2}
    for name in get_command(app).commands:
        text = rows[name].strip("│ ").removeprefix(name).strip()
        assert text.endswith("."), f"{name}: {text!r}"
    assert "Run the whole pipeline offline in about a minute, on a tiny model." in rows["demo"]


def test_flags_show_no_value_type():
    for args in (["--help"], ["replay", "--help"], ["chat", "--help"], ["ls", "--help"]):
        result = wide(*args)
        assert result.exit_code == 0
        assert "<bool>" not in result.stdout, args
    result = wide("chat", "--help")
    assert "<float>" in result.stdout  # options that take a value still say which


def option_row(help_text: str, option: str) -> str:
    """The help text of `option`, its wrapped lines joined."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if f"│ {option} " in line)
    row = [lines[start]]
    for line in lines[start + 1:]:
        if line.lstrip("│ ").startswith("-") or not line.startswith("│"):
            break
        row.append(line)
    return " ".join(" ".join(line.strip("│").split()) for line in row)


def test_chat_help_describes_every_sampling_flag_and_shows_the_timeout_default():
    from dataclasses import fields

    from booth.agent.settings import EndpointSettings

    text = wide("chat", "--help").stdout
    for flag in ("--temperature", "--top-p", "--max-tokens", "--frequency-penalty",
                 "--presence-penalty"):
        row = option_row(text, flag)
        words = row.split("<", 1)[1].split(">", 1)[1].split()  # after the type
        assert len(words) >= 4, f"{flag} has no description: {row!r}"
    timeout = next(f.default for f in fields(EndpointSettings) if f.name == "timeout")
    assert f"default: ({timeout:g})" in option_row(text, "--timeout")


def test_tools_table_shows_defaults_and_bounds_from_the_schemas():
    from booth.tools import TOOLS

    text = wide("tools").stdout
    train = text.split("train:", 1)[1].split("sample:", 1)[0]
    rows = {line.split()[1]: line for line in train.splitlines() if line.startswith("│")}
    schema = TOOLS["train"].parameters["properties"]
    steps = rows["checkpointing_steps"]
    assert str(schema["checkpointing_steps"]["default"]) in steps
    low, high = schema["checkpointing_steps"]["minimum"], schema["checkpointing_steps"]["maximum"]
    assert f"{low} to {high}" in steps
    assert " | ".join(schema["mixed_precision"]["enum"]) in rows["mixed_precision"]
    assert f"> {schema['learning_rate']['exclusiveMinimum']}" in rows["learning_rate*"]


def test_a_hub_id_that_is_not_here_is_said_in_one_line_at_once(workspace):
    # The tests run with HF_HUB_OFFLINE=1 (conftest): as a user without network would.
    result = runner.invoke(app, ["--workspace", workspace, "--base-model", "someone/sd-typo",
                                 "call", "sample", "prompts=a dog"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "'someone/sd-typo' is neither a local folder nor in the local Hugging Face cache" in text
    assert "hf download someone/sd-typo" in text and "--base-model" in text
    assert "stacktrace" not in text and "Traceback" not in text


def test_tiny_model_refuses_a_file_in_the_way(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = runner.invoke(app, ["tiny-model", str(target)])
    assert result.exit_code == 2 and "not an empty folder" in " ".join(result.output.split())


def test_behind_a_proxy_the_hub_is_left_to_the_hub_library(monkeypatch):
    from booth.dreambooth import loading

    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo: False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")

    def no_socket(*args, **kwargs):
        raise AssertionError("a raw socket cannot pass a proxy: it must not be tried")

    monkeypatch.setattr("socket.create_connection", no_socket)
    loading.ensure_downloadable("someone/model")  # no error: the download will say
