"""Links inside the workspace: a per-entry link (runs/<name>, datasets/<name>, priors/<key>,
samples/<name>, or checkpoints/, final/... inside one) that leads out of its folder, or
nowhere outside, is refused by every tool before anything is written or deleted there.
Linking a whole folder (runs/ on another disk) stays allowed (see tests/test_cli.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from booth.tools import ToolContext, ToolError, get_tool

HUB_MODEL = "example-org/never-downloaded"  # a hub id: resolving it reads nothing


@pytest.fixture
def ctx(workspace):
    return ToolContext.from_options(workspace=workspace, base_model=HUB_MODEL,
                                    console=Console(file=io.StringIO()))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the workspace with a canary file booth must never touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "canary.txt").write_text("still here")
    (folder / ".tmp-canary").write_text("looks like booth's leftovers, but is not")
    return folder


def _listing(folder: Path) -> dict[str, str]:
    """Every path under `folder` with its contents (or link target): what 'untouched' means."""
    found = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent, name)
            rel = path.relative_to(folder).as_posix()
            found[rel] = (f"-> {os.readlink(path)}" if path.is_symlink()
                          else path.read_text() if path.is_file() else "<dir>")
    return found


def _link(ctx, kind: str, name: str, target: Path) -> Path:
    (ctx.workspace.root / kind).mkdir(parents=True, exist_ok=True)
    link = ctx.workspace.root / kind / name
    link.symlink_to(target, target_is_directory=True)
    return link


def _refused(ctx, outside: Path, tool: str, arguments: dict, link: str) -> str:
    before = _listing(outside)
    with pytest.raises(ToolError, match="symbolic link") as error:
        get_tool(tool).run(ctx, arguments)
    assert link in str(error.value), f"the message must name the link: {error.value}"
    assert _listing(outside) == before, "something outside the workspace changed"
    assert (outside / "canary.txt").read_text() == "still here"
    return str(error.value)


def _photos(tmp_path: Path) -> Path:
    folder = tmp_path / "rex"
    folder.mkdir()
    for seed in range(3):
        Image.new("RGB", (96, 96), (40 * seed, 90, 200 - 50 * seed)).save(folder / f"{seed}.png")
    return folder


def _dataset(ctx, tmp_path: Path) -> str:
    get_tool("prepare_dataset").run(ctx, {"images_dir": str(_photos(tmp_path)),
                                          "class_noun": "dog", "resolution": 64, "name": "rex"})
    return "rex"


def _fake_run(folder: Path) -> None:
    """What resume_checkpoint reads before training: run.yaml and a complete checkpoint."""
    from booth.dreambooth.config import TrainConfig

    checkpoint = folder / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 2, "epoch": 0}))
    (folder / "checkpoints" / ".tmp-checkpoint-3").mkdir()  # swept on a real resume
    TrainConfig(base_model=HUB_MODEL, output_dir=str(folder), instance_images=["x.png"],
                max_train_steps=4, prior_loss_weight=0).save_yaml(folder / "run.yaml")


@pytest.mark.parametrize("dangling", [False, True], ids=["outward", "dangling"])
def test_prepare_dataset_refuses_a_linked_dataset(ctx, tmp_path, outside, dangling):
    target = outside / ("missing" if dangling else "")
    _link(ctx, "datasets", "rex", target)
    message = _refused(ctx, outside, "prepare_dataset",
                       {"images_dir": str(_photos(tmp_path)), "class_noun": "dog",
                        "resolution": 64, "name": "rex"}, "datasets/rex")
    assert str(target) in message
    assert ("does not exist" in message) == dangling


@pytest.mark.parametrize("dangling", [False, True], ids=["outward", "dangling"])
def test_train_refuses_a_linked_run_name(ctx, tmp_path, outside, dangling):
    dataset = _dataset(ctx, tmp_path)
    _link(ctx, "runs", "new-run", outside / "missing" if dangling else outside)
    _refused(ctx, outside, "train", {"dataset": dataset, "max_train_steps": 1,
                                     "learning_rate": 1e-5, "prior_loss_weight": 0,
                                     "run_name": "new-run"}, "runs/new-run")
    assert ctx.workspace.names("runs") == ([] if dangling else ["new-run"])


def test_train_refuses_a_dataset_linked_outside(ctx, outside):
    (outside / "manifest.json").write_text(json.dumps(
        {"images": [{"file": "canary.txt"}], "instance_prompt": "a photo of sks dog"}))
    _link(ctx, "datasets", "rex", outside)
    _refused(ctx, outside, "train", {"dataset": "rex", "max_train_steps": 1,
                                     "learning_rate": 1e-5, "prior_loss_weight": 0},
             "datasets/rex")


@pytest.mark.parametrize("dangling", [False, True], ids=["outward", "dangling"])
def test_resume_refuses_a_run_folder_linked_outside(ctx, outside, dangling):
    if dangling:
        _link(ctx, "runs", "rex", outside / "gone")
    else:
        _fake_run(outside)
        _link(ctx, "runs", "rex", outside)
    before = _listing(outside)
    with pytest.raises(ToolError) as error:
        get_tool("resume_checkpoint").run(ctx, {"run": "rex"})
    assert "runs/rex" in str(error.value) and "symbolic link" in str(error.value)
    assert _listing(outside) == before


@pytest.mark.parametrize("entry", ["checkpoints", "final", "metrics.jsonl", "logs",
                                   "checkpoints/checkpoint-4"])
def test_resume_refuses_a_link_inside_the_run(ctx, outside, entry):
    run = ctx.workspace.root / "runs" / "rex"
    if entry == "checkpoints":  # the whole checkpoint folder lives outside
        _fake_run(outside / "elsewhere")
        _fake_run(run)
        for path in sorted((run / "checkpoints").iterdir()):
            os.rename(path, outside / path.name)  # checkpoint-2 and the .tmp- one
        (run / "checkpoints").rmdir()
        (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    else:
        _fake_run(run)
        (run / entry).symlink_to(outside / "canary.txt" if "." in entry else outside)
    message = _refused(ctx, outside, "resume_checkpoint", {"run": "rex"}, f"runs/rex/{entry}")
    assert str(outside) in message


PRIORS = {"class_prompt": "a photo of a dog", "num_images": 2, "resolution": 64}


@pytest.fixture
def priors_ctx(workspace, tiny_model):
    """A real local model whose pipeline never loads: a first call claims the prior folder and
    fails, so the tests learn its name without generating anything."""
    from booth.dreambooth.errors import ModelLoadError

    def refuse(base_model):
        raise ModelLoadError("no pipeline in this test")

    ctx = ToolContext.from_options(workspace=workspace, base_model=tiny_model,
                                   console=Console(file=io.StringIO()))
    ctx.load_pipeline = refuse
    return ctx


def _prior_folder(ctx) -> Path:
    """The folder generate_priors uses for PRIORS (see priors_ctx)."""
    with pytest.raises(ToolError, match="no pipeline in this test"):
        get_tool("generate_priors").run(ctx, PRIORS)
    [name] = ctx.workspace.names("priors")
    return ctx.workspace.root / "priors" / name


@pytest.mark.parametrize("dangling", [False, True], ids=["outward", "dangling"])
def test_generate_priors_refuses_a_linked_prior_set(priors_ctx, outside, dangling):
    import shutil

    folder = _prior_folder(priors_ctx)
    shutil.rmtree(folder)
    folder.symlink_to(outside / "gone" if dangling else outside, target_is_directory=True)
    _refused(priors_ctx, outside, "generate_priors", PRIORS, f"priors/{folder.name}")


def test_generate_priors_refuses_an_image_linked_outside(priors_ctx, outside):
    folder = _prior_folder(priors_ctx)
    (folder / "0002.png").symlink_to(outside / "canary.txt")
    _refused(priors_ctx, outside, "generate_priors", PRIORS, f"priors/{folder.name}/0002.png")


@pytest.mark.parametrize("dangling", [False, True], ids=["outward", "dangling"])
def test_sample_refuses_a_linked_samples_folder(ctx, outside, monkeypatch, dangling):
    import time

    from booth.dreambooth import loading

    # The folder is named by the clock: fix the clock, and skip loading a model the guard
    # must stop us from ever using (were it reached, sampling a string would fail loudly).
    monkeypatch.setattr(loading, "load_inference_pipeline", lambda base, precision=None: "no pipeline")
    monkeypatch.setattr(time, "strftime", lambda fmt, *t: "20260101-000000")
    _link(ctx, "samples", "base-20260101-000000", outside / "gone" if dangling else outside)
    _refused(ctx, outside, "sample", {"prompts": ["a dog"]}, "samples/base-20260101-000000")


def test_links_that_stay_inside_are_allowed(ctx, tmp_path):
    from booth.tools.workspace import Workspace

    runs = ctx.workspace.root / "runs"
    (runs / "real" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (runs / "real" / "checkpoints" / "latest").symlink_to("checkpoint-1")
    (runs / "alias").symlink_to("real")
    assert ctx.workspace.run_dir("alias") == runs / "alias"
    assert ctx.workspace.run_dir("real") == runs / "real"
    # runs/ itself on another disk, with links inside it that stay there.
    disk = tmp_path / "big-disk"
    (disk / "runs" / "rex").mkdir(parents=True)
    (tmp_path / "ws2").mkdir()
    (tmp_path / "ws2" / "runs").symlink_to(disk / "runs")
    (disk / "runs" / "rex" / "final").symlink_to(disk / "runs" / "rex")
    assert Workspace.from_option(str(tmp_path / "ws2")).run_dir("rex").name == "rex"


def test_a_link_loop_is_refused(ctx):
    runs = ctx.workspace.root / "runs"
    runs.mkdir()
    (runs / "a").symlink_to("b")
    (runs / "b").symlink_to("a")
    with pytest.raises(ToolError, match="runs/a is a symbolic link loop"):
        ctx.workspace.run_dir("a")


def test_remove_inside_never_deletes_through_a_link(ctx, outside):
    from booth.tools.workspace import remove_inside

    datasets = ctx.workspace.root / "datasets"
    datasets.mkdir()
    (datasets / ".old-rex").symlink_to(outside, target_is_directory=True)
    before = _listing(outside)
    with pytest.raises(ToolError, match="refusing to delete"):
        remove_inside(datasets / ".old-rex", datasets)
    with pytest.raises(ToolError, match="refusing to delete"):
        remove_inside(outside, datasets)
    assert _listing(outside) == before
    (datasets / ".tmp-rex").mkdir()
    remove_inside(datasets / ".tmp-rex", datasets)
    assert not (datasets / ".tmp-rex").exists()
