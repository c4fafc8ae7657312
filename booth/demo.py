"""`booth demo`: the whole pipeline offline, on a CPU, in about a minute.

It builds the tiny random Stable Diffusion, draws a few synthetic "photos" of a subject (and
two bad files, to show that preparation rejects them with a reason), then replays the shipped
transcript with `--execute` through the real agent loop, approvals shown and accepted.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

DEMO_TRANSCRIPT = "demo.jsonl"
PHOTOS = Path("photos") / "rex"  # the transcript's prepare_dataset call names this folder


def shipped_transcript() -> Path:
    """The demo transcript: in the package when installed, in transcripts/ in a checkout."""
    packaged = resources.files("booth") / "transcripts" / DEMO_TRANSCRIPT
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "transcripts" / DEMO_TRANSCRIPT


def draw_subject_photos(folder: Path, count: int = 5, size: int = 96) -> list[Path]:
    """A small, recognisable "subject" (an orange dog-like shape) on varied backgrounds.

    Each photo differs in background, position and scale, as real photos of a pet would.
    """
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    paths = []
    for index in range(count):
        background = tuple(rng.randrange(60, 230) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        scale = rng.uniform(0.55, 0.8) * size
        left = rng.uniform(0, size - scale)
        top = rng.uniform(size * 0.1, size - scale * 0.8)
        body = (left, top + scale * 0.35, left + scale, top + scale * 0.8)
        head = (left + scale * 0.55, top, left + scale * 0.95, top + scale * 0.45)
        draw.ellipse(body, fill=(214, 130, 52))
        draw.ellipse(head, fill=(226, 148, 70))
        ear = [(head[0] + 4, head[1] + 6), (head[0] + 10, head[1] - 8), (head[0] + 16, head[1] + 4)]
        draw.polygon(ear, fill=(150, 80, 30))
        draw.ellipse((head[2] - 14, head[1] + 10, head[2] - 9, head[1] + 15), fill=(20, 20, 20))
        path = folder / f"rex_{index + 1:02d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    # Two files a real folder often holds: a note and a copy. Both must be rejected, with reasons.
    (folder / "notes.jpg").write_text("remember to buy dog food\n")
    shutil.copyfile(paths[0], folder / "rex_01_copy.jpg")
    return paths


def prepare_demo_folder(folder: Path) -> tuple[Path, Path]:
    """Create the demo's tiny model (with its evaluators) and photos under `folder`; return
    (model, workspace)."""
    from booth.dreambooth.evaluation import EVALUATORS_DIR
    from booth.dreambooth.tiny import save_tiny_evaluators, save_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "tiny-model"
    if not (model / "model_index.json").is_file():
        shutil.rmtree(model, ignore_errors=True)
        save_tiny_model(model, seed=0)
    # Tiny CLIP and DINO beside it (<1 MB): the demo's samples are scored as real ones are.
    if not (model / EVALUATORS_DIR / "dino" / "config.json").is_file():
        shutil.rmtree(model / EVALUATORS_DIR, ignore_errors=True)
        save_tiny_evaluators(model / EVALUATORS_DIR, seed=0)
    photos = folder / PHOTOS
    shutil.rmtree(photos, ignore_errors=True)
    draw_subject_photos(photos)
    workspace = folder / "workspace"
    # A previous demo's outputs would make the replayed calls refuse (existing run name).
    shutil.rmtree(workspace, ignore_errors=True)
    return model, workspace


def enter(folder: Path) -> None:
    """The transcript names `photos/rex` relative to where it was recorded: the demo folder."""
    os.chdir(folder)
