"""`booth tiny-model`: an offline SD-1.x folder that diffusers loads, the same for the same seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner

from booth.cli import app


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + file.read_bytes())
    return digest.hexdigest()


def test_tiny_model_loads_generates_and_is_deterministic(tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    runner = CliRunner()
    first = runner.invoke(app, ["tiny-model", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == str((tmp_path / "a").resolve())
    # Whether the hub is reachable must not change a single byte of the model.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert runner.invoke(app, ["tiny-model", str(tmp_path / "b")]).exit_code == 0
    assert runner.invoke(app, ["tiny-model", str(tmp_path / "c"), "--seed", "1"]).exit_code == 0
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "c")
    size = sum(p.stat().st_size for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert size < 12e6

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a", local_files_only=True)
    assert len(pipe.tokenizer) > 600  # a real BPE vocabulary, not transformers' 2-token fallback
    ids = pipe.tokenizer("a photo of sks dog").input_ids
    assert len(ids) < 12  # words become sub-words, not one token per byte
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
