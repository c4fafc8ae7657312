"""A tiny, randomly initialised Stable Diffusion 1.x pipeline built offline.

It has the real architecture's shape at a fraction of the size (~9 MB), so tests and the demo
run every diffusers and accelerate code path on a CPU without downloading weights. Its images
are noise-like; what matters is that it loads, trains and samples like the real thing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

# A few sentences in the domain's vocabulary: the BPE merges are learned from them, so prompts
# like "a photo of sks dog" tokenize into real sub-words rather than single bytes.
_CORPUS = """
a photo of sks dog. a photo of a dog. a photo of sks cat on the moon. a photo of a cat.
a portrait of a person, a painting of a corgi as an astronaut in space, high quality.
a dog on the beach, a cat in a garden, a toy on a table, a backpack in the snow.
sks dog wearing a hat, sks dog in the style of van gogh, a red car, a blue house.
"""

_NUM_MERGES = 300


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte-to-character table CLIP's BPE is built on."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    byte_chars = _bytes_to_unicode()
    words = Counter(corpus.lower().replace(",", " ").replace(".", " ").split())
    # Each word as a tuple of symbols, the last one carrying CLIP's end-of-word marker.
    split = {}
    for word, count in words.items():
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        split[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in split.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        split = {_merge(symbols, best): count for symbols, count in split.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_clip_tokenizer(folder: Path) -> None:
    """Write vocab.json + merges.txt in CLIP's layout (bytes, bytes</w>, merges, specials)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    merges = _learn_merges(_CORPUS, _NUM_MERGES)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tiny_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` with tiny random weights, identical for the same seed."""
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    if len(tokenizer) < 600:  # transformers 5 silently falls back to a 2-token vocabulary
        raise RuntimeError(f"tiny tokenizer has only {len(tokenizer)} tokens")

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `folder` in diffusers format and return its path."""
    from booth.dreambooth.loading import quiet_progress

    folder = Path(folder)
    pipeline = build_tiny_pipeline(seed)
    with quiet_progress():  # nothing is fetched: no bars for writing 9 MB
        pipeline.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; keep the vocab/merges pair for older readers.
    write_clip_tokenizer(folder / "tokenizer")
    _drop_loader_state(folder / "tokenizer" / "tokenizer_config.json")
    return folder


def _drop_loader_state(config_file: Path) -> None:
    """transformers records how the tokenizer was loaded (offline or not) in its config; that
    is no property of the model, and would make the same seed give different files."""
    config = json.loads(config_file.read_text())
    for key in ("local_files_only", "is_local"):
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Small enough to score a few 64 px samples in milliseconds; the hub models' own input size
# (224) would make the tiny ones slower than the tiny SD that made the images.
_TINY_IMAGE_SIZE = 32
_TINY_PATCH = 8


def save_tiny_evaluators(folder: str | Path, seed: int = 0) -> Path:
    """Write tiny random evaluator models in transformers' `save_pretrained` layout:
    `folder/clip` (a CLIPModel, its tokenizer and image processor) and `folder/dino` (a
    ViTModel and its image processor), as booth.dreambooth.evaluation loads them. The same
    seed gives the same files. Their scores are numbers from random weights, not judgements."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from booth.dreambooth.evaluation import clip_image_processor_class, dino_image_processor_class
    from booth.dreambooth.loading import quiet_progress

    folder = Path(folder)
    clip_dir, dino_dir = folder / "clip", folder / "dino"
    write_clip_tokenizer(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir, model_max_length=77)
    if len(tokenizer) < 600:  # transformers 5 silently falls back to a 2-token vocabulary
        raise RuntimeError(f"tiny tokenizer has only {len(tokenizer)} tokens")
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4)
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **tower),
        vision_config=dict(image_size=_TINY_IMAGE_SIZE, patch_size=_TINY_PATCH, **tower),
        projection_dim=16))
    dino = ViTModel(ViTConfig(image_size=_TINY_IMAGE_SIZE, patch_size=_TINY_PATCH, **tower),
                    add_pooling_layer=False)
    size = {"shortest_edge": _TINY_IMAGE_SIZE}
    crop = {"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}
    with quiet_progress():
        clip.save_pretrained(clip_dir, safe_serialization=True)
        tokenizer.save_pretrained(clip_dir)
        clip_image_processor_class()(size=size, crop_size=crop).save_pretrained(clip_dir)
        dino.save_pretrained(dino_dir, safe_serialization=True)
        dino_image_processor_class()(size=crop).save_pretrained(dino_dir)
    # tokenizer.save_pretrained keeps only tokenizer.json: the vocab/merges pair is rewritten.
    write_clip_tokenizer(clip_dir)
    _drop_loader_state(clip_dir / "tokenizer_config.json")
    return folder
