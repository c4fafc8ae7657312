"""DreamBooth's metrics on the tiny evaluators, and sample's scores and checkpoint comparisons:
what a user finds in the result, in scores.json, in the grid and in the terminal."""

from __future__ import annotations

import io
import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from booth.tools import ToolArgumentError, ToolContext, ToolError, get_tool

PROMPT = "a photo of sks dog on the moon"
FAST = {"num_inference_steps": 2, "num_images_per_prompt": 2}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection beyond loopback fails the test: the evaluators are never downloaded."""
    real = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("BOOTH_EVAL_MODELS", raising=False)


@pytest.fixture(scope="module")
def model_with_evaluators(tmp_path_factory, tiny_model) -> Path:
    """The tiny SD with evaluators/{clip,dino} inside, as `tiny-model --with-evaluators`."""
    from booth.dreambooth.tiny import save_tiny_evaluators

    folder = tmp_path_factory.mktemp("scored") / "model"
    shutil.copytree(tiny_model, folder)
    save_tiny_evaluators(folder / "evaluators", seed=0)
    return folder


@pytest.fixture(scope="module")
def evaluators(model_with_evaluators):
    from booth.dreambooth.evaluation import load_evaluators

    return load_evaluators(base_model=str(model_with_evaluators))


def _photo(size: int = 64) -> Image.Image:
    """A subject-like picture: an orange blob on a plain background."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (90, 160, 200))
    ImageDraw.Draw(image).ellipse((10, 20, 50, 50), fill=(214, 130, 52))
    return image


def _noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3),
                                                                dtype=np.uint8))


def _figures(scores: dict) -> list[float]:
    found = [scores[k] for k in ("dino", "clip_i", "clip_t") if k in scores]
    for row in scores.get("per_prompt", []):
        found += [row[k] for k in ("dino", "clip_i", "clip_t") if k in row]
    found += [v for k, v in scores.get("prior", {}).items() if k != "prompt"]
    return found


def test_tiny_evaluators_are_written_by_the_cli_and_identical_for_a_seed(tmp_path):
    from typer.testing import CliRunner

    from booth.cli import app
    from booth.dreambooth.tiny import save_tiny_evaluators

    result = CliRunner().invoke(app, ["tiny-model", str(tmp_path / "m"), "--with-evaluators"])
    assert result.exit_code == 0, result.output
    written = tmp_path / "m" / "evaluators"
    assert (tmp_path / "m" / "model_index.json").is_file()
    for part in ("clip", "dino"):
        assert (written / part / "config.json").is_file()
        assert (written / part / "model.safetensors").is_file()
        assert (written / part / "preprocessor_config.json").is_file()
    again = save_tiny_evaluators(tmp_path / "again", seed=0)
    for file in sorted(p for p in written.rglob("*") if p.is_file()):
        assert file.read_bytes() == (again / file.relative_to(written)).read_bytes(), file
    other = save_tiny_evaluators(tmp_path / "other", seed=1)
    assert (other / "dino/model.safetensors").read_bytes() != \
        (written / "dino/model.safetensors").read_bytes()


def test_where_the_evaluators_come_from(model_with_evaluators, tmp_path, monkeypatch):
    """An explicit folder, then evaluators/ in a local base model, then the hub ids when they
    are in the cache (a cache laid out by hand here: nothing is fetched)."""
    from booth.dreambooth import evaluation
    from booth.dreambooth.evaluation import EvaluatorsUnavailable, Sources, find_evaluators

    beside = model_with_evaluators / "evaluators"
    assert find_evaluators(base_model=str(model_with_evaluators)) == Sources(
        str(beside / "clip"), str(beside / "dino"))
    with pytest.raises(EvaluatorsUnavailable, match="lacks clip/ and dino/"):
        find_evaluators(str(tmp_path), base_model=str(model_with_evaluators))  # given wins
    monkeypatch.setenv("BOOTH_EVAL_MODELS", str(beside))
    assert find_evaluators().clip == str(beside / "clip")
    monkeypatch.delenv("BOOTH_EVAL_MODELS")

    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with pytest.raises(EvaluatorsUnavailable, match="hf download"):
        find_evaluators(base_model="someone/some-model")
    for repo, part in ((evaluation.CLIP_HUB, "clip"), (evaluation.DINO_HUB, "dino")):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        shutil.copytree(beside / part, folder / "snapshots" / ("0" * 40))
    assert find_evaluators() == Sources(evaluation.CLIP_HUB, evaluation.DINO_HUB)
    loaded = evaluation.load_evaluators()
    assert type(loaded.clip).__name__ == "CLIPModel" and type(loaded.dino).__name__ == "ViTModel"
    assert evaluation.load_evaluators() is loaded  # once per process


def test_scores_are_finite_bounded_repeatable_and_an_image_matches_itself_best(evaluators):
    from booth.dreambooth.evaluation import score_images

    subject, noise = _photo(), _noise(2)
    images = {PROMPT: [subject, noise], "a photo of a dog": [noise]}
    kwargs = dict(identifier="sks", class_noun="dog", class_prompt="a photo of a dog",
                  class_images=[_noise(3)])
    first = score_images(evaluators, images, [subject], **kwargs)
    assert first == score_images(evaluators, images, [subject], **kwargs)
    assert set(first) == {"dino", "clip_i", "clip_t", "per_prompt", "prior"}
    assert first["per_prompt"][0]["clip_t_prompt"] == "a photo of dog on the moon"
    assert set(first["prior"]) == {"prompt", "dino_to_subject", "dino_to_class_images"}
    figures = _figures(first)
    assert len(figures) == 3 + 3 + 2
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in figures)

    itself = score_images(evaluators, {PROMPT: [subject]}, [subject])
    against_noise = score_images(evaluators, {PROMPT: [noise]}, [subject])
    assert itself["dino"] == pytest.approx(1.0, abs=1e-4)
    assert itself["clip_i"] == pytest.approx(1.0, abs=1e-4)
    assert against_noise["dino"] < itself["dino"]
    assert against_noise["clip_i"] < itself["clip_i"]


def test_without_subject_photos_only_clip_t():
    from booth.dreambooth.evaluation import prompt_for_clip_t

    assert prompt_for_clip_t("a photo of sks dog", "sks", "dog") == "a photo of dog"
    assert prompt_for_clip_t("sks on the beach, sks dog", "sks", "dog") == \
        "dog on the beach, dog"
    assert prompt_for_clip_t("a photo of sks", "sks", None) == "a photo of"
    assert prompt_for_clip_t("a sksx dog", "sks", "dog") == "a sksx dog"  # whole words only
    assert prompt_for_clip_t("a photo of sks dog", None, None) == "a photo of sks dog"


def test_the_best_checkpoint_rule_on_constructed_scores():
    from booth.dreambooth.evaluation import best_checkpoint

    rows = [{"checkpoint": "checkpoint-200", "dino": 0.60, "clip_t": 0.33},   # drifted
            {"checkpoint": "checkpoint-400", "dino": 0.685, "clip_t": 0.31},  # balanced
            {"checkpoint": "checkpoint-600", "dino": 0.70, "clip_t": 0.26}]   # overfitted
    best, rule = best_checkpoint(rows)
    assert best == "checkpoint-400" and "within 0.02 of the best DINO" in rule
    assert best_checkpoint(rows, margin=0.001)[0] == "checkpoint-600"
    assert best_checkpoint(rows, margin=0.2)[0] == "checkpoint-200"
    no_dino = [{"checkpoint": r["checkpoint"], "clip_t": r["clip_t"]} for r in rows]
    best, rule = best_checkpoint(no_dino)
    assert best == "checkpoint-200" and "no subject photos" in rule
    tied = [{"checkpoint": "a", "dino": 0.5, "clip_t": 0.3},
            {"checkpoint": "b", "dino": 0.5, "clip_t": 0.3}]
    assert best_checkpoint(tied)[0] == "a"
    assert best_checkpoint([{"checkpoint": "a"}]) == (None, "no scores to choose by")


# --- the sample tool -----------------------------------------------------------------------


def _context(workspace: Path, base_model: Path) -> ToolContext:
    ctx = ToolContext.from_options(workspace=str(workspace), base_model=str(base_model))
    ctx.console = Console(file=io.StringIO(), width=120)
    return ctx


def _said(ctx) -> str:
    return " ".join(ctx.console.file.getvalue().split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_with_evaluators):
    """A run of 3 steps with a checkpoint at each (the final model is checkpoint-3's)."""
    from tests.test_train import make_dataset, make_priors, train_with_priors

    root = tmp_path_factory.mktemp("ws")
    make_dataset(root)
    make_priors(root)
    ctx = _context(root, model_with_evaluators)
    result = train_with_priors(ctx, root, max_train_steps=3, checkpointing_steps=1,
                               run_name="rex", report_to="none", validation_steps=0)
    assert result["checkpoints"] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return root


def _sample(ctx, **args) -> dict:
    result = get_tool("sample").run(ctx, {"prompts": [PROMPT], **FAST, **args})
    json.dumps(result)
    return result


@pytest.mark.slow
def test_all_checkpoints_compared_one_row_each_with_a_grid_and_the_best(trained,
                                                                        model_with_evaluators):
    ctx = _context(trained, model_with_evaluators)
    result = _sample(ctx, run="rex", checkpoints=["all"],
                     prompts=[PROMPT, "a photo of a dog"])
    names = [row["checkpoint"] for row in result["compared"]]
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # final = checkpoint-3
    assert result["best_checkpoint"] in names and "within 0.02" in result["rule"]
    for row in result["compared"]:
        assert all(-1 <= row[k] <= 1 for k in ("dino", "clip_i", "clip_t"))
        assert -1 <= row["prior_dino_to_subject"] <= 1
        saved = json.loads((Path(row["folder"]) / "scores.json").read_text())
        assert saved["dino"] == row["dino"] and saved["prior"]["prompt"] == "a photo of a dog"
        assert len(list(Path(row["folder"]).glob("0*.png"))) == 4
    table = json.loads((Path(result["folder"]) / "scores.json").read_text())
    assert table["best_checkpoint"] == result["best_checkpoint"]
    with Image.open(result["grid"]) as grid:
        pixels = np.asarray(grid.convert("RGB"), dtype=np.int16)
    # One row per checkpoint, in order, under the title: each row starts with the first image
    # of its checkpoint; 2 prompts x 2 images side by side after the labels.
    label, title = pixels.shape[1] - 4 * 64, pixels.shape[0] - 3 * 64
    assert label > 0 and 0 < title < 64 * 2
    for index, row in enumerate(result["compared"]):
        first = sorted(Path(row["folder"]).glob("01-01-*.png"))[0]
        cell = pixels[title + index * 64: title + (index + 1) * 64, label: label + 64]
        assert np.array_equal(cell, np.asarray(Image.open(first).convert("RGB"), np.int16))
    said = _said(ctx)
    assert "checkpoints compared" in said and "★" in said and "checkpoint-2" in said
    from booth.tools.workspace import describe_workspace

    listed = {s["name"]: s for s in describe_workspace(ctx.workspace)["sample_sets"]}
    shown = listed[Path(result["folder"]).name]  # what `booth ls` says of it
    assert shown["images"] == 3 * 2 * 2 and shown["prompts"] == [PROMPT, "a photo of a dog"]


@pytest.mark.slow
def test_named_checkpoints_and_final_in_the_order_given(trained, model_with_evaluators):
    ctx = _context(trained, model_with_evaluators)
    result = _sample(ctx, run="rex", checkpoints=["2", "final", "checkpoint-2", "latest"],
                     num_images_per_prompt=1)
    assert [(r["checkpoint"], r["step"]) for r in result["compared"]] == \
        [("checkpoint-2", 2), ("final", 3), ("checkpoint-3", 3)]


def test_invalid_comparisons_are_refused_before_anything_renders(trained,
                                                                  model_with_evaluators):
    ctx = _context(trained, model_with_evaluators)
    samples = trained / "samples"
    before = sorted(samples.iterdir()) if samples.is_dir() else []
    with pytest.raises(ToolArgumentError, match="not both"):
        _sample(ctx, run="rex", checkpoint="2", checkpoints=["all"])
    with pytest.raises(ToolArgumentError,
                       match=r"no '7', '9'; it has: checkpoint-1, checkpoint-2, "
                             r"checkpoint-3, final"):
        _sample(ctx, run="rex", checkpoints=["1", "7", "9"])
    with pytest.raises(ToolArgumentError, match="1 to 50 names"):
        _sample(ctx, run="rex", checkpoints=[])
    with pytest.raises(ToolArgumentError, match="not allowed"):
        _sample(ctx, run="rex", checkpoints=["best"])
    with pytest.raises(ToolError, match="checkpoints needs a run"):
        _sample(ctx, checkpoints=["all"])
    assert (sorted(samples.iterdir()) if samples.is_dir() else []) == before


@pytest.mark.slow
def test_all_on_a_run_without_checkpoints_compares_the_final_model_alone(
        trained, model_with_evaluators):
    ctx = _context(trained, model_with_evaluators)
    run = trained / "runs" / "bare"
    run.mkdir()
    shutil.copy(trained / "runs" / "rex" / "run.yaml", run / "run.yaml")
    shutil.copytree(trained / "runs" / "rex" / "final", run / "final")
    result = _sample(ctx, run="bare", checkpoints=["all"], num_images_per_prompt=1)
    assert [r["checkpoint"] for r in result["compared"]] == ["final"]
    assert "no checkpoints: the final model is compared alone" in result["note"]
    assert result["best_checkpoint"] == "final"


@pytest.mark.slow
def test_one_sample_carries_scores_per_prompt_and_saves_them(trained, model_with_evaluators):
    ctx = _context(trained, model_with_evaluators)
    result = _sample(ctx, run="rex", prompts=[PROMPT, "a photo of sks dog in the snow"])
    scores = result["scores"]
    assert [r["prompt"] for r in scores["per_prompt"]] == [PROMPT,
                                                           "a photo of sks dog in the snow"]
    assert scores["per_prompt"][1]["clip_t_prompt"] == "a photo of dog in the snow"
    assert scores["dino"] == pytest.approx(
        sum(r["dino"] for r in scores["per_prompt"]) / 2, abs=1e-4)
    assert json.loads((Path(result["folder"]) / "scores.json").read_text()) == scores
    assert "CLIP-T" in _said(ctx) and "mean" in _said(ctx)
    off = _sample(ctx, run="rex", score=False)
    assert "scores" not in off and not (Path(off["folder"]) / "scores.json").exists()
    assert "score" not in get_tool("sample").openai_spec()["function"]["parameters"][
        "properties"], "hidden from the model: on by default, every shown word costs tokens"


@pytest.mark.slow
def test_the_base_model_gets_clip_t_only_and_says_why_once(workspace, model_with_evaluators):
    ctx = _context(Path(workspace), model_with_evaluators)
    scores = _sample(ctx, prompts=["a [red]dog[/red] on the moon"])["scores"]
    assert "a [red]dog[/red] on the moon" in _said(ctx)  # the prompt as typed, not as markup
    assert set(scores) == {"clip_t", "per_prompt", "note"}
    assert "need the run's subject photos" in scores["note"]
    assert "dino" not in scores["per_prompt"][0]


@pytest.mark.slow
def test_without_evaluator_models_sample_still_works_and_says_why(tool_context, tmp_path,
                                                                 monkeypatch):
    tool_context.console = Console(file=io.StringIO(), width=120)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # no hub models cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    result = _sample(tool_context)
    assert result["status"] == "complete" and len(result["images"]) == 2
    assert result["scores"] == {"skipped": result["scores"]["skipped"]}
    why = result["scores"]["skipped"]
    assert why.startswith("not scored: no evaluator models here") and "--eval-models" in why
    assert not (Path(result["folder"]) / "scores.json").exists()

    monkeypatch.setenv("BOOTH_EVAL_MODELS", str(tmp_path / "nowhere"))
    tool_context.eval_models = str(tmp_path / "nowhere")
    why = _sample(tool_context, num_images_per_prompt=1)["scores"]["skipped"]
    assert "lacks clip/ and dino/" in why


@pytest.mark.slow
def test_a_subject_photo_that_no_longer_opens_skips_the_scores_not_the_images(
        trained, model_with_evaluators, tmp_path):
    import yaml

    ctx = _context(trained, model_with_evaluators)
    run = trained / "runs" / "broken"
    shutil.copytree(trained / "runs" / "rex" / "final", run / "final")
    config = yaml.safe_load((trained / "runs" / "rex" / "run.yaml").read_text())
    (tmp_path / "0001.png").write_text("not an image any more")
    config["instance_images"] = [str(tmp_path / "0001.png")]
    (run / "run.yaml").write_text(yaml.safe_dump(config))
    result = _sample(ctx, run="broken", num_images_per_prompt=1)
    assert result["status"] == "complete" and len(result["images"]) == 1
    assert result["scores"]["skipped"].startswith("not scored: cannot identify image file")
    assert "Traceback" not in _said(ctx)


def test_the_model_is_told_when_to_compare_and_the_cost_counts_every_checkpoint(
        trained, model_with_evaluators):
    from booth.agent.prompt import build_system_prompt

    ctx = _context(trained, model_with_evaluators)
    prompt = build_system_prompt(ctx, device="CPU only")
    assert 'overfitted": sample checkpoints ["all"], report best_checkpoint' in prompt
    shown = get_tool("sample").openai_spec()["function"]["parameters"]["properties"]
    assert shown["checkpoints"]["type"] == "array"
    tool = get_tool("sample")
    estimate = tool.estimate(ctx, tool.validate({"prompts": [PROMPT], "run": "rex",
                                                 "checkpoints": ["all"],
                                                 "num_images_per_prompt": 2}))
    assert estimate.startswith("6 images at 64 px"), estimate  # 3 checkpoints x 2
    single = tool.estimate(ctx, tool.validate({"prompts": [PROMPT], "run": "rex",
                                               "num_images_per_prompt": 2}))
    assert single.startswith("2 images")


@pytest.mark.slow
def test_a_comparison_stopped_part_way_says_so_and_keeps_what_it_rendered(
        trained, model_with_evaluators):
    from tests.test_priors_sample import _StopAfter

    ctx = _context(trained, model_with_evaluators)
    ctx.stop_requested = _StopAfter(2)  # before checkpoint-1, its one batch; then stop
    result = _sample(ctx, run="rex", checkpoints=["all"], num_images_per_prompt=1)
    assert result["status"] == "interrupted"
    assert [r["checkpoint"] for r in result["compared"]] == ["checkpoint-1"]
    assert result["hint"].startswith("stopped after 1 of 3 checkpoints")
    assert json.loads((Path(result["folder"]) / "scores.json").read_text())["checkpoints"]

    ctx.stop_requested = _StopAfter(0)
    nothing = _sample(ctx, run="rex", checkpoints=["all"], num_images_per_prompt=1)
    assert nothing["compared"] == [] and nothing["grid"] is None
    assert nothing["best_checkpoint"] is None


def test_a_runs_subject_from_its_config_with_or_without_a_dataset_manifest(tmp_path):
    from booth.dreambooth.config import TrainConfig
    from booth.dreambooth.evaluation import subject_of
    from tests.test_train import make_dataset, make_priors

    dataset = make_dataset(tmp_path)
    priors = make_priors(tmp_path, count=3)
    photos = sorted(str(p) for p in (dataset / "images").glob("*.png"))
    subject = subject_of(TrainConfig(instance_images=photos, instance_prompt="a photo of sks dog",
                                     class_prompt="a photo of a dog", class_data_dir=str(priors)))
    assert (subject.identifier, subject.class_noun) == ("sks", "dog")  # from manifest.json
    assert len(subject.photos) == 3 and len(subject.class_images) == 3 and subject.note is None

    loose = tmp_path / "loose.png"
    _photo().save(loose)
    subject = subject_of(TrainConfig(instance_images=[str(loose)],
                                     instance_prompt="a photo of zwx cat",
                                     class_prompt="a photo of a cat"))
    assert (subject.identifier, subject.class_noun) == ("zwx", "cat")  # the word it adds
    gone = subject_of(TrainConfig(instance_images=[str(tmp_path / "gone.png")]))
    assert gone.photos == [] and "are gone: only CLIP-T" in gone.note
