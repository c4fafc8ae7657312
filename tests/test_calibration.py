"""Time estimates come from what this machine measured (booth.tools.calibration)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from booth.tools import get_tool
from booth.tools.calibration import FILE, Setup, estimate, record

SETUP = Setup("train", "cpu (2 threads)", "local:abc", 64, 2)


def test_nothing_measured_is_a_rough_guess_then_a_measurement_is_used_and_scaled(tmp_path):
    guess = estimate(tmp_path, SETUP, 100, guess_per_unit=1.0, guess_fixed=10)
    assert (guess.seconds, guess.source) == (110, "rough guess")
    record(tmp_path, SETUP, units=30, unit_seconds=6.0, fixed_seconds=12.0)  # 0.2 s a step
    measured = estimate(tmp_path, SETUP, 120, 1.0, 10)
    assert measured.source == "measured" and measured.seconds == pytest.approx(12 + 120 * 0.2)
    # Twice the examples per step, twice the time a step; 128 px: (4x pixels)^0.8.
    bigger = estimate(tmp_path, Setup("train", "cpu (2 threads)", "local:abc", 128, 4), 10, 1, 0)
    assert bigger.seconds == pytest.approx(12 + 10 * 0.2 * 2 * 4 ** 0.8)
    # Another device, model, precision or kind of work is not comparable.
    for other in (Setup("train", "cuda (T4)", "local:abc", 64, 2),
                  Setup("train", "cpu (2 threads)", "local:xyz", 64, 2),
                  Setup("train", "cpu (2 threads)", "local:abc", 64, 2, "bf16"),
                  Setup("generate", "cpu (2 threads)", "local:abc", 64, 2)):
        assert estimate(tmp_path, other, 10, 1, 0).source == "rough guess"


def test_a_new_measurement_of_the_same_setup_replaces_the_old(tmp_path):
    record(tmp_path, SETUP, 10, 10.0, 0)
    record(tmp_path, SETUP, 10, 1.0, 0)
    entries = json.loads((tmp_path / FILE).read_text())["entries"]
    assert len(entries) == 1 and entries[0]["per_unit"] == pytest.approx(0.1)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"entries": [{"per_unit": "x"}]}',
                                     '{"entries": [{"kind": "train", "per_unit": 1}]}'])
def test_a_damaged_calibration_file_counts_as_nothing_measured(tmp_path, content):
    (tmp_path / FILE).write_text(content)
    assert estimate(tmp_path, SETUP, 10, 1.0, 0).source == "rough guess"
    record(tmp_path, SETUP, 10, 5.0, 0)  # and is replaced by a good one
    assert estimate(tmp_path, SETUP, 10, 1.0, 0).source == "measured"


def test_a_workspace_where_the_file_cannot_be_written_fails_nothing(tmp_path):
    (tmp_path / FILE).mkdir()  # not writable as a file, even for root
    record(tmp_path, SETUP, 10, 5.0, 0)
    assert (tmp_path / FILE).is_dir() and not list(tmp_path.glob(".*.tmp"))
    assert estimate(tmp_path, SETUP, 10, 1.0, 0).source == "rough guess"


@pytest.mark.slow
def test_a_training_run_makes_the_next_estimate_a_measurement(tool_context, monkeypatch):
    from test_train import make_dataset

    make_dataset(tool_context.workspace.root)
    tool = get_tool("train")
    args = tool.validate({"dataset": "rex", "max_train_steps": 6, "learning_rate": 1e-4,
                          "prior_loss_weight": 0, "report_to": "none", "run_name": "a",
                          "checkpointing_steps": 100})
    assert tool.estimate(tool_context, args).endswith("(rough guess)")
    result = tool.call(tool_context, args)
    entry = json.loads((tool_context.workspace.root / FILE).read_text())["entries"][0]
    assert entry["kind"] == "train" and entry["units"] == 6 and entry["resolution"] == 64
    assert 0 < entry["per_unit"] * 6 + entry["fixed"] <= result["seconds"] + 0.5
    line = tool.estimate(tool_context, {**args, "max_train_steps": 120, "run_name": "b"})
    assert line.startswith("120 steps at 64 px") and line.endswith("(measured)")
    # The next run's bar shows a time left from that pace before its own first step.
    screen = io.StringIO()
    tool_context.console = Console(file=screen, force_terminal=True, width=200)
    tool.call(tool_context, {**args, "run_name": "b"})
    first = next(line for line in screen.getvalue().splitlines() if "0/6" in line)
    assert re.search(r"~0:00:0\d", first), first


def test_a_bar_shows_the_measured_pace_until_it_has_its_own():
    from booth.dreambooth.progress import expected_pace, training_progress

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    with expected_pace(training=2.5):
        progress, task = training_progress(console, 40, 4)
    with progress:
        pass
    assert "~0:01:30" in screen.getvalue()  # 36 steps left at 2.5 s
    progress, task = training_progress(Console(file=io.StringIO()), 40, 4)
    assert "~" not in str(progress.columns[-1].render(progress.tasks[task]))  # nothing measured


def test_dry_run_validates_prints_the_cost_and_runs_nothing(workspace, tiny_model):
    from typer.testing import CliRunner

    from booth.cli import app

    runner = CliRunner()
    words = ["--workspace", workspace, "--base-model", tiny_model, "call", "generate_priors",
             "class_prompt=a photo of a dog", "num_images=3", "resolution=64", "--dry-run"]
    result = runner.invoke(app, words)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["arguments"]["num_images"] == 3 and plan["arguments"]["seed"] == 0
    assert plan["cost"].startswith("3 images at 64 px, 25 steps: 3 to generate, ~")
    assert plan["cost"].endswith("(rough guess)")
    assert not (Path(workspace) / "priors").exists()  # nothing ran, nothing was made
    bad = runner.invoke(app, [*words[:-2], "num_images=0", "--dry-run"])
    assert bad.exit_code == 2 and "num_images" in bad.output
