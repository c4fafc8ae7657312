"""The whole chain by hand, as a script would run it: prepare_dataset -> generate_priors ->
train (prior preservation, text encoder) -> sample, each through `booth call`, on an SD-1.x
folder built here independently of `booth tiny-model`."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_train import build_other_sd
from typer.testing import CliRunner

from booth.cli import app
from booth.demo import draw_subject_photos


def call(workspace, model, tool, *words):
    result = CliRunner().invoke(
        app, ["--workspace", str(workspace), "--base-model", str(model), "call", tool, *words])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout carries the JSON result and nothing else


@pytest.mark.slow
def test_the_chain_through_booth_call_ends_in_a_loadable_pipeline_and_images(tmp_path):
    from diffusers import StableDiffusionPipeline

    model = build_other_sd(tmp_path / "other")
    draw_subject_photos(tmp_path / "photos", count=3, size=80)
    workspace = tmp_path / "ws"

    dataset = call(workspace, model, "prepare_dataset", f"images_dir={tmp_path / 'photos'}",
                   "class_noun=dog", "resolution=64", "name=rex")
    assert dataset["kept"] == 3 and dataset["instance_prompt"] == "a photo of sks dog"
    assert {r["code"] for r in dataset["rejected"]} == {"not_image", "duplicate"}

    priors = call(workspace, model, "generate_priors", "class_prompt=a photo of a dog",
                  "num_images=2", "resolution=64", "num_inference_steps=2")
    assert priors["total"] == 2

    run = call(workspace, model, "train", '{"dataset": "rex", "max_train_steps": 3, '
               '"learning_rate": 1e-4, "checkpointing_steps": 2, "run_name": "rex-1", '
               '"train_text_encoder": true}')
    assert run["status"] == "completed" and run["steps"] == 3
    metrics = [json.loads(line) for line in open(run["metrics"])]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["prior_loss"] > 0 for m in metrics)  # the class images were in the batches

    pipeline = StableDiffusionPipeline.from_pretrained(run["final_model"])
    assert pipeline.text_encoder.config.hidden_size == 24  # this model's, not the tiny one's

    samples = call(workspace, model, "sample", 'prompts=["a photo of sks dog on the moon"]',
                   "run=rex-1", "num_images_per_prompt=2", "num_inference_steps=2")
    assert len(samples["images"]) == 2
    for path in [*samples["images"], samples["grid"]]:
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB"
