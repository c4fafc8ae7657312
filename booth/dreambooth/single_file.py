"""One `.safetensors` in the original Stable Diffusion 1.x layout, as A1111, ComfyUI, Forge and
kohya load it: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (CLIP text encoder).

diffusers' package ships only the maps from that layout to its own; these are the maps back.
They are derived from the models' configs rather than written for the 4-block SD-1.5 UNet, so
any SD-1.x-shaped model (the tiny test model too) converts. A key no rule knows stops the
export: a file with silently missing weights would load as noise in every UI.
"""

from __future__ import annotations

import os
from pathlib import Path

from booth.dreambooth.checkpoints import TMP_PREFIX
from booth.dreambooth.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
DTYPES = ("fp16", "fp32", "bf16")

# Inside a ResNet block the original layout numbers the layers of two nn.Sequential.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention was 1x1 convolutions in the original code.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


class ExportError(UserError):
    """The weights cannot be written in the asked format; the message says why."""


def torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _unet_rules(config: dict) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, original prefix, renames of the next name) for every UNet block."""
    layers = config["layers_per_block"]
    downs, ups = config["down_block_types"], config["up_block_types"]
    rules = [("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}),
             ("conv_out.", "out.2.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    index = 1  # input_blocks.0 is conv_in
    for i in range(len(downs)):
        for j in range(layers):
            rules += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", {})]
            index += 1
        if i < len(downs) - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.",
                          {}))
            index += 1
    index = 0
    for i, kind in enumerate(ups):
        for j in range(layers + 1):
            rules += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", {})]
            index += 1
        if i < len(ups) - 1:  # the upsampler follows the attention, when the block has one
            slot = 2 if "CrossAttn" in kind else 1
            rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{index - 1}.{slot}.",
                          {}))
    return rules


def _vae_rules(config: dict) -> list[tuple[str, str, dict]]:
    blocks = len(config["block_out_channels"])
    rules = []
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", {}),
                  (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(blocks):
        # The original decoder counts its levels from the lowest resolution up.
        up = blocks - 1 - i
        rules += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.",
                   {}),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{up}.upsample.", {})]
        for j in range(config["layers_per_block"] + 1):
            rules += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.",
                       _VAE_RESNET),
                      (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.",
                       _VAE_RESNET)]
    return rules + [("quant_conv.", "quant_conv.", {}),
                    ("post_quant_conv.", "post_quant_conv.", {})]


def _rename(key: str, rules: list[tuple[str, str, dict]], what: str) -> str:
    for source, target, inner in rules:
        if key.startswith(source):
            rest = key[len(source):]
            for name, original in inner.items():
                if rest.startswith(name + "."):
                    rest = original + rest[len(name):]
                    break
            return target + rest
    raise ExportError(f"the {what} has a weight {key!r} that the SD-1.x layout has no place "
                      "for: is this a Stable Diffusion 1.x model?")


def unet_to_original(state: dict, config: dict) -> dict:
    rules = _unet_rules(config)
    return {UNET_PREFIX + _rename(key, rules, "UNet"): value for key, value in state.items()}


def vae_to_original(state: dict, config: dict) -> dict:
    rules, out = _vae_rules(config), {}
    for key, value in state.items():
        name = _rename(key, rules, "VAE")
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight",
                                                    "proj_out.weight")) and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> the original 1x1 convolution
        out[VAE_PREFIX + name] = value
    return out


def text_encoder_to_original(state: dict) -> dict:
    """transformers 5 saves CLIPTextModel without its `text_model.` level, older versions
    with it; the original layout (and from_single_file) wants it."""
    return {TEXT_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}"): value
            for key, value in state.items() if not key.endswith("position_ids")}


def to_original(unet: dict, vae: dict, text_encoder: dict, unet_config: dict,
                vae_config: dict, dtype: str = "fp16") -> dict:
    """The state dict of one original-layout checkpoint, every tensor cast to `dtype`."""
    cast = torch_dtype(dtype)
    merged = {**unet_to_original(unet, unet_config), **vae_to_original(vae, vae_config),
              **text_encoder_to_original(text_encoder)}
    return {key: value.detach().to(cast).contiguous() for key, value in merged.items()}


def read_component(folder: Path) -> dict:
    """All weights of one pipeline component folder (unet/, vae/...), shards included."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} holds no .safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(str(file), device="cpu"))
    return state


def read_config(folder: Path) -> dict:
    import json

    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def pipeline_to_original(folder: Path, dtype: str, overrides: dict | None = None) -> dict:
    """The original-layout state of a diffusers pipeline folder; `overrides` maps a component
    ("unet", "text_encoder") to trained weights that replace those of the folder."""
    folder, overrides = Path(folder), overrides or {}
    parts = {name: {**read_component(folder / name), **overrides.get(name, {})}
             for name in ("unet", "vae", "text_encoder")}
    return to_original(parts["unet"], parts["vae"], parts["text_encoder"],
                       read_config(folder / "unet"), read_config(folder / "vae"), dtype)


def write_safetensors(state: dict, dest: Path, metadata: dict | None = None) -> Path:
    """Write `state` to `dest` through a temporary file and one rename: a kill or an error
    midway leaves the previous file (or none), never half of one."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest
