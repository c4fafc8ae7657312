"""DreamBooth's own numbers for generated images (Ruiz et al., CVPR 2023, section 4.1).

- DINO (subject fidelity): the mean cosine similarity between the DINO ViT-S/16 embedding
  (the CLS token of the last hidden state) of a generated image and of each real subject
  photo. DINO was trained to tell instances apart, so it tells this corgi from another one.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T (prompt fidelity): the cosine similarity between CLIP's embedding of the prompt,
  its identifier replaced by the class noun ("a photo of sks dog" -> "a photo of dog"), and
  the image's.
- Prior preservation, for images of the class prompt made by the fine-tuned model: their
  DINO similarity to the subject (lower is better: the class has not collapsed onto the
  subject) and to the base model's class images, the run's prior set (higher is better).

For scale, the paper's figures on SD: real photos DINO 0.774, CLIP-I 0.885; DreamBooth
0.668 / 0.803 / CLIP-T 0.305.

The models come from a folder holding `clip/` and `dino/` in `save_pretrained` layout
(`--eval-models`, BOOTH_EVAL_MODELS, or `evaluators/` inside a local base model folder, which
`booth tiny-model --with-evaluators` writes), else from the Hugging Face cache when
openai/clip-vit-base-patch32 and facebook/dino-vits16 are in it. Nothing is downloaded: a
sample call never waits on 700 MB it did not ask for. They are loaded once per process and
run on the CPU, which scores a few dozen images in seconds and leaves the GPU to the diffusion
model and the LLM server that share it.

Scoring a run's images anywhere (the sample tool; validation images during training):
`score_subject(load_evaluators(folder, base_model), {prompt: images}, subject_of(config))`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_HUB = "openai/clip-vit-base-patch32"
DINO_HUB = "facebook/dino-vits16"
EVAL_MODELS_ENV = "BOOTH_EVAL_MODELS"
EVALUATORS_DIR = "evaluators"
SCORES_FILE = "scores.json"  # beside the images scored (samples, validation steps)
DIGITS = 4  # the paper reports three; a fourth tells close checkpoints apart
BEST_DINO_MARGIN = 0.02
NO_SUBJECT = "DINO and CLIP-I need the run's subject photos"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MAX_CLASS_IMAGES = 32  # enough for a mean; a prior set of 200 would cost seconds per call
_HOW_TO_GET = (f"give --eval-models DIR (a folder with clip/ and dino/ saved by transformers) "
               f"or {EVAL_MODELS_ENV}, or download {CLIP_HUB} and {DINO_HUB} where there is a "
               "network (`hf download <id>`)")


# The folder the user chose (--eval-models) for work that scores images on its own, such as a
# training run's validation: set around it by the tool that knows (see `models_from`).
_CHOSEN: ContextVar[str | None] = ContextVar("booth_eval_models", default=None)


@contextmanager
def models_from(folder: str | None) -> Iterator[None]:
    """Inside, find_evaluators() without a folder looks in `folder` first."""
    token = _CHOSEN.set(folder)
    try:
        yield
    finally:
        _CHOSEN.reset(token)


class EvaluatorsUnavailable(Exception):
    """The evaluator models cannot be had here; the message says why and what to do."""


@dataclass(frozen=True)
class Sources:
    clip: str  # a folder or a cached hub id
    dino: str


def clip_image_processor_class():
    """transformers 5's CLIPImageProcessor needs torchvision (broken beside a CPU torch): the
    Pillow one does the same resize, crop and normalisation."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def dino_image_processor_class():
    import transformers

    return getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor


def find_evaluators(folder: str | None = None, base_model: str | None = None) -> Sources:
    """Where the evaluator models are: `folder` (or BOOTH_EVAL_MODELS), else `evaluators/` in
    a local `base_model` folder, else the hub cache; EvaluatorsUnavailable otherwise."""
    folder = folder or _CHOSEN.get() or os.environ.get(EVAL_MODELS_ENV)
    if folder:
        return _local_sources(Path(folder).expanduser())
    beside = Path(base_model).expanduser() / EVALUATORS_DIR if base_model else None
    if beside is not None and beside.is_dir():
        return _local_sources(beside)
    if _in_hub_cache(CLIP_HUB) and _in_hub_cache(DINO_HUB):
        return Sources(CLIP_HUB, DINO_HUB)
    raise EvaluatorsUnavailable(f"no evaluator models here: {_HOW_TO_GET}")


def _local_sources(folder: Path) -> Sources:
    missing = [f"{name}/" for name in ("clip", "dino") if not (folder / name / "config.json")
               .is_file()]
    if missing:
        raise EvaluatorsUnavailable(
            f"evaluator folder {folder} lacks {' and '.join(missing)} with a config.json: "
            + _HOW_TO_GET)
    return Sources(str((folder / "clip").resolve()), str((folder / "dino").resolve()))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_evaluators(folder: str | None = None, base_model: str | None = None) -> Evaluators:
    """The evaluator models (see find_evaluators), loaded once per process."""
    sources = find_evaluators(folder, base_model)
    try:
        return _load(sources)
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).split("\n")[0].split(". ")[0]
        raise EvaluatorsUnavailable(f"could not load the evaluator models ({sources.clip}, "
                                    f"{sources.dino}): {reason}") from None


@functools.cache
def _load(sources: Sources) -> Evaluators:
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    from booth.dreambooth.loading import quiet_progress

    offline = {"local_files_only": True}  # a cached hub id is read, never fetched
    with quiet_progress():
        clip = CLIPModel.from_pretrained(sources.clip, **offline).eval()
        tokenizer = CLIPTokenizer.from_pretrained(sources.clip, **offline)
        clip_images = clip_image_processor_class().from_pretrained(sources.clip, **offline)
        dino = ViTModel.from_pretrained(sources.dino, add_pooling_layer=False, **offline).eval()
        dino_images = dino_image_processor_class().from_pretrained(sources.dino, **offline)
    if len(tokenizer) < 600:  # transformers 5 silently falls back to a 2-token vocabulary
        raise ValueError(f"the CLIP tokenizer in {sources.clip} has only {len(tokenizer)} tokens")
    return Evaluators(clip, tokenizer, clip_images, dino, dino_images)


@dataclass(eq=False)
class Evaluators:
    """CLIP and DINO with their processors; every embedding comes back unit-length."""

    clip: Any
    clip_tokenizer: Any
    clip_images: Any
    dino: Any
    dino_images: Any

    def dino_embeddings(self, images: Iterable) -> Any:
        pixels = self.dino_images(images=_rgb(images), return_tensors="pt")["pixel_values"]
        with _no_grad():
            return _unit(self.dino(pixel_values=pixels).last_hidden_state[:, 0])

    def clip_image_embeddings(self, images: Iterable) -> Any:
        pixels = self.clip_images(images=_rgb(images), return_tensors="pt")["pixel_values"]
        with _no_grad():
            return _unit(_pooled(self.clip.get_image_features(pixel_values=pixels)))

    def clip_text_embeddings(self, texts: list[str]) -> Any:
        tokens = self.clip_tokenizer(texts, padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
        with _no_grad():
            return _unit(_pooled(self.clip.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])))


def _no_grad():
    import torch

    return torch.inference_mode()


def _pooled(output):
    """transformers 5 returns the projected embedding as `pooler_output`; 4 returned it bare."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output


def _unit(vectors):
    import torch

    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def _rgb(images: Iterable) -> list:
    from PIL import Image

    out = []
    for image in images:
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        out.append(image.convert("RGB"))
    return out


def _mean_similarity(a, b) -> list[float]:
    """For each row of `a`, its mean cosine similarity to the rows of `b` (within [-1, 1]:
    unit vectors can round a hair past it)."""
    return (a @ b.T).clamp(-1, 1).mean(dim=1).tolist()


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), DIGITS) if values else None


def prompt_for_clip_t(prompt: str, identifier: str | None, class_noun: str | None) -> str:
    """The prompt CLIP-T is measured with: "sks dog" becomes "dog", a lone "sks" the class
    noun (or nothing without one), as the paper does; CLIP has never seen the identifier."""
    if not identifier:
        return prompt
    word = rf"\b{re.escape(identifier)}\b"
    if class_noun:
        text = re.sub(rf"{word}(\s+{re.escape(class_noun)}\b)?", class_noun, prompt, flags=re.I)
    else:
        text = re.sub(word, "", prompt, flags=re.I)
    return " ".join(text.split())


def score_images(evaluators: Evaluators, images: dict[str, list], subject: list = (), *,
                 identifier: str | None = None, class_noun: str | None = None,
                 class_prompt: str | None = None, class_images: list = ()) -> dict:
    """The paper's scores of generated `images` ({prompt: [paths or PIL images]}).

    Returns {"dino", "clip_i", "clip_t"} (means over the prompts), "per_prompt" (the same for
    each prompt, with the text CLIP-T used) and, when `class_prompt` is among the prompts,
    "prior" (its images' DINO similarity to `subject` and to `class_images`, the base model's
    class images). The class prompt's images are not of the subject: they count only there.
    Without `subject` photos there is no DINO or CLIP-I."""
    subject = list(subject)
    real_dino = evaluators.dino_embeddings(subject) if subject else None
    real_clip = evaluators.clip_image_embeddings(subject) if subject else None
    per_prompt, prior = [], None
    for prompt, paths in images.items():
        pictures = _rgb(paths)
        if not pictures:
            continue
        if class_prompt and " ".join(prompt.split()) == " ".join(class_prompt.split()):
            prior = _prior(evaluators, prompt, pictures, real_dino, list(class_images))
            continue
        text = prompt_for_clip_t(prompt, identifier, class_noun)
        clip_images = evaluators.clip_image_embeddings(pictures)
        row = {"prompt": prompt, "clip_t_prompt": text,
               "clip_t": _mean(_mean_similarity(clip_images,
                                                evaluators.clip_text_embeddings([text])))}
        if real_dino is not None:
            row["dino"] = _mean(_mean_similarity(evaluators.dino_embeddings(pictures), real_dino))
            row["clip_i"] = _mean(_mean_similarity(clip_images, real_clip))
        per_prompt.append(row)
    scores = {key: _mean([r[key] for r in per_prompt if key in r])
              for key in ("dino", "clip_i", "clip_t")}
    scores = {k: v for k, v in scores.items() if v is not None}
    scores["per_prompt"] = per_prompt
    if prior is not None:
        scores["prior"] = prior
    return scores


def _prior(evaluators: Evaluators, prompt: str, pictures: list, real_dino, class_images: list):
    embedded = evaluators.dino_embeddings(pictures)
    prior = {"prompt": prompt}
    if real_dino is not None:
        prior["dino_to_subject"] = _mean(_mean_similarity(embedded, real_dino))
    if class_images:
        prior["dino_to_class_images"] = _mean(_mean_similarity(
            embedded, evaluators.dino_embeddings(class_images)))
    return prior


def best_rule(margin: float = BEST_DINO_MARGIN, with_dino: bool = True) -> str:
    if not with_dino:
        return "the highest CLIP-T (no subject photos, so no DINO to weigh it against)"
    return (f"the highest CLIP-T among those within {margin} of the best DINO: the subject "
            "kept, then the prompt followed best")


def best_checkpoint(rows: list[dict], margin: float = BEST_DINO_MARGIN) -> tuple[str | None, str]:
    """(name, rule) of the row ({"checkpoint", "dino", "clip_t"}) that balances subject and
    prompt fidelity best; the earliest of equals. (None, why) when no row has scores."""
    scored = [r for r in rows if r.get("clip_t") is not None]
    if not scored:
        return None, "no scores to choose by"
    with_dino = [r for r in scored if r.get("dino") is not None]
    if not with_dino:
        return max(scored, key=lambda r: r["clip_t"])["checkpoint"], best_rule(with_dino=False)
    top = max(r["dino"] for r in with_dino)
    close = [r for r in with_dino if r["dino"] >= top - margin - 1e-9]
    return max(close, key=lambda r: r["clip_t"])["checkpoint"], best_rule(margin)


# --- what a run's images are measured against -------------------------------------------------


@dataclass
class Subject:
    """The real photos and words a run's images are scored against."""

    photos: list[Path] = field(default_factory=list)
    identifier: str | None = None
    class_noun: str | None = None
    class_prompt: str | None = None
    class_images: list[Path] = field(default_factory=list)
    note: str | None = None  # why DINO and CLIP-I are missing, said once


def subject_of(config) -> Subject:
    """The Subject of a run from its TrainConfig: its photos (those still on disk), its
    identifier and class noun, its class prompt and (some of) its class images."""
    photos = [Path(p) for p in config.instance_images if Path(p).is_file()]
    identifier, class_noun = _identifier(photos, config.instance_prompt, config.class_prompt)
    class_images = []
    if config.class_data_dir and Path(config.class_data_dir).is_dir():
        class_images = sorted(p for p in Path(config.class_data_dir).iterdir()
                              if p.suffix.lower() in _IMAGE_SUFFIXES)[:_MAX_CLASS_IMAGES]
    note = None if photos else f"{NO_SUBJECT}, and those in its run.yaml are gone: only CLIP-T"
    return Subject(photos, identifier, class_noun, config.class_prompt, class_images, note)


def _identifier(photos: list[Path], instance_prompt: str, class_prompt: str | None):
    """(identifier, class noun): the identifier from the dataset's manifest.json when the
    photos are a prepared dataset's, else the one word the instance prompt adds to the class
    prompt; the noun from the manifest, else the word after the identifier ("sks dog")."""
    words = instance_prompt.split()
    identifier, noun = None, None
    for photo in photos[:1]:
        try:
            data = json.loads((photo.parent.parent / "manifest.json").read_text("utf-8"))
            identifier, noun = data.get("instance_token"), data.get("class_noun")
        except (OSError, ValueError, AttributeError):
            pass
    if not identifier and class_prompt:
        known = set(class_prompt.lower().split())
        extra = [w for w in words if w.lower() not in known]
        identifier = extra[0] if len(extra) == 1 else None
    if identifier and not noun and identifier in words[:-1]:
        noun = words[words.index(identifier) + 1]
    return identifier, noun


def score_subject(evaluators: Evaluators, images: dict[str, list], subject: Subject) -> dict:
    """score_images against `subject`, with its note; {"skipped": why} when one of its photos
    or class images no longer opens."""
    try:
        scores = score_images(evaluators, images, subject.photos, identifier=subject.identifier,
                              class_noun=subject.class_noun, class_prompt=subject.class_prompt,
                              class_images=subject.class_images)
    except OSError as error:
        return {"skipped": f"not scored: {error}"}
    if subject.note:
        scores["note"] = subject.note
    return scores
