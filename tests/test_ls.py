"""`booth ls` on a workspace laid out on disk exactly as the tools and the trainer write it
(run.yaml from TrainConfig, one metrics.jsonl line per step, checkpoint-N folders finished by
training_state.json), so every run status can be shown without training anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from booth.cli import app
from booth.dreambooth.config import TrainConfig

runner = CliRunner()


def make_run(root: Path, name: str, *, max_steps: int, steps: int, checkpoints: list[int],
             final: str | None = None, stopped_after_checkpoint: bool = True) -> Path:
    """A run folder as the trainer leaves it after `steps` steps."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    TrainConfig(output_dir=str(run), max_train_steps=max_steps,
                instance_prompt="a photo of sks dog").save_yaml(run / "run.yaml")
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "instance_loss": 1.0 / s, "lr": 5e-6,
                    "epoch": 0, "elapsed": float(s)}) + "\n" for s in range(1, steps + 1)))
    for step in checkpoints:
        folder = run / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "unet.safetensors").write_bytes(b"")
        (folder / "training_state.json").write_text(json.dumps(
            {"step": step, "epoch": 0, "batches_in_epoch": step, "elapsed": float(step),
             "models": ["unet"], "use_lora": False}))
    if checkpoints:
        # The order of the writes, made explicit: Ctrl-C saves a checkpoint after the last
        # metrics line; a kill leaves metric lines written after the last checkpoint.
        state = run / "checkpoints" / f"checkpoint-{checkpoints[-1]}" / "training_state.json"
        later, earlier = (state, metrics) if stopped_after_checkpoint else (metrics, state)
        os.utime(earlier, ns=(1_000_000_000_000, 1_000_000_000_000))
        os.utime(later, ns=(2_000_000_000_000, 2_000_000_000_000))
    if final:
        (run / final).mkdir()
        (run / final / "model_index.json").write_text("{}")
    return run


@pytest.fixture
def filled(tmp_path) -> Path:
    root = tmp_path / "ws"
    dataset = root / "datasets" / "rex"
    (dataset / "images").mkdir(parents=True)
    (dataset / "manifest.json").write_text(json.dumps({
        "name": "rex", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog",
        "resolution": 64, "images": [{"file": f"images/000{i}.png"} for i in range(1, 4)],
        "rejected": [{"file": "notes.jpg", "code": "not_image", "reason": "not an image"}]}))
    (root / "datasets" / "broken").mkdir()
    (root / "datasets" / "broken" / "manifest.json").write_text("{oops")
    priors = root / "priors" / "a-photo-of-a-dog-1234abcd"
    priors.mkdir(parents=True)
    for n in (1, 2):
        (priors / f"{n:04d}.png").write_bytes(b"png")
    (priors / "priors.json").write_text(json.dumps(
        {"key": {"prompt": "a photo of a dog", "resolution": 64}, "count": 2,
         "images": ["0001.png", "0002.png"]}))
    make_run(root, "done", max_steps=4, steps=4, checkpoints=[2, 4], final="final")
    make_run(root, "stopped", max_steps=10, steps=3, checkpoints=[2, 3])
    make_run(root, "killed", max_steps=10, steps=5, checkpoints=[4],
             stopped_after_checkpoint=False)
    make_run(root, "exporting", max_steps=4, steps=4, checkpoints=[4])
    make_run(root, "starting", max_steps=10, steps=0, checkpoints=[])
    half = root / "runs" / "stopped" / "checkpoints" / "checkpoint-6"
    half.mkdir()  # no training_state.json: a checkpoint still being written
    broken = root / "runs" / "garbled"
    broken.mkdir()
    (broken / "run.yaml").write_bytes(b"max_train_steps: [\xe9")
    (broken / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n\xe2\x82')
    samples = root / "samples" / "done-20260101-120000"
    samples.mkdir(parents=True)
    for name in ("01-01-a-photo-of-sks-dog.png", "01-02-a-photo-of-sks-dog.png", "grid.png"):
        (samples / name).write_bytes(b"png")
    (samples / "samples.json").write_text(json.dumps(
        {"prompts": ["a photo of sks dog"], "status": "complete", "images": []}))
    (root / "transcripts").mkdir()
    (root / "transcripts" / "20260101-120000-teach-rex.jsonl").write_text('{"type": "header"}\n')
    return root


def ls_json(root: Path) -> dict:
    result = runner.invoke(app, ["ls", "--json", "--workspace", str(root)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_ls_json_reports_every_kind_of_thing(filled):
    state = ls_json(filled)
    assert state["workspace"] == str(filled)
    datasets = {d["name"]: d for d in state["datasets"]}
    assert datasets["rex"]["images"] == 3 and datasets["rex"]["rejected"] == 1
    assert datasets["broken"]["error"] == "manifest.json missing or unreadable"
    (priors,) = state["prior_sets"]
    assert (priors["images"], priors["prompt"]) == (2, "a photo of a dog")
    (samples,) = state["sample_sets"]
    assert samples["images"] == 2 and samples["prompts"] == ["a photo of sks dog"]
    assert Path(samples["grid"]).name == "grid.png"
    (session,) = state["sessions"]
    assert session["name"] == "20260101-120000-teach-rex"


def test_ls_json_tells_each_run_status_from_what_is_on_disk(filled):
    runs = {r["name"]: r for r in ls_json(filled)["runs"]}
    status = {name: run["status"] for name, run in runs.items()}
    assert status == {"done": "completed", "stopped": "interrupted",
                      "killed": "training or crashed", "exporting": "no final model",
                      "starting": "training or crashed", "garbled": "training or crashed"}
    assert runs["done"]["final_model"] == str(filled / "runs" / "done" / "final")
    assert runs["done"]["last_loss"] == pytest.approx(1 / 4)
    assert runs["stopped"]["checkpoints"] == [2, 3]  # checkpoint-6 is not complete
    assert (runs["stopped"]["steps"], runs["stopped"]["max_train_steps"]) == (3, 10)
    assert runs["stopped"]["config"]["instance_prompt"] == "a photo of sks dog"
    assert runs["garbled"]["config"] is None and runs["garbled"]["last_loss"] is None


def test_ls_tables_show_the_same_things(filled):
    result = runner.invoke(app, ["--workspace", str(filled), "ls"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: " ".join(line.split())
            for line in result.stdout.splitlines() if line.startswith("│")}
    assert "│ 3 │ 1 │ a photo of sks dog │ 64 │" in rows["rex"]
    assert "manifest.json missing or unreadable" in rows["broken"]
    assert "run.yaml unreadable" in rows["garbled"]
    assert "│ 4 / 4 │ 2, 4 │ 0.25 │ completed │ final/ │" in rows["done"]
    assert "│ 3 / 10 │ 2, 3 │" in rows["stopped"] and "interrupted" in rows["stopped"]
    assert "training or crashed" in rows["killed"]
    assert "no final model" in rows["exporting"]
    assert "│ 2 │ a photo of a dog │ 64 │" in rows["a-photo-of-a-dog-1234abcd"]
    assert "20260101-120000-teach-rex.jsonl" in result.stdout


def test_ls_of_a_workspace_that_does_not_exist_says_none_and_creates_nothing(tmp_path):
    root = tmp_path / "nothing-here"
    result = runner.invoke(app, ["ls", "-w", str(root)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("none yet") == 5
    assert not root.exists()
    assert ls_json(root)["runs"] == []


def test_ls_does_not_import_the_heavy_libraries(filled):
    code = (
        "import sys\n"
        "from booth.cli import app\n"
        f"try:\n    app(['ls', '--json', '-w', {str(filled)!r}])\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'diffusers', 'transformers', 'openai', "
        "'accelerate') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout


def test_the_system_prompt_words_the_same_facts(filled):
    from booth.agent.prompt import workspace_state
    from booth.tools.workspace import Workspace

    text = workspace_state(Workspace(filled))
    assert "- rex: 3 images kept, instance_prompt 'a photo of sks dog'" in text
    assert "- broken: manifest.json missing or unreadable" in text
    assert "- a-photo-of-a-dog-1234abcd: 2 images of 'a photo of a dog' at 64 px" in text
    assert "- done: " in text and "checkpoints at steps 2, 4; last loss 0.25; finished: final/" \
        in text
    assert "checkpoints at steps 2, 3; last loss 0.3333; no final weights yet (interrupted" in text
    assert "(stopped while exporting; resume_checkpoint exports it)" in text
    assert "- garbled: run.yaml missing or unreadable; no checkpoints;" in text
