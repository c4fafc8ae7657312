"""LoRA weights in the spellings other tools read.

booth's adapters exist under three names for the same matrices: PEFT's inside the model and
in checkpoints (`<module>.lora_A.default.weight`), diffusers' in `lora/` and in each LoRA
checkpoint's `pytorch_lora_weights.safetensors` (`unet.<module>.lora.down.weight`), and
kohya's, which A1111, ComfyUI, Forge and kohya's scripts load for SD 1.x:
`lora_unet_<module>` / `lora_te_<module>` with `_` for `.`, `.lora_down.weight`,
`.lora_up.weight` and `.alpha`. (diffusers' `convert_state_dict_to_kohya` writes `lora_te1_`,
the SDXL spelling, which SD-1.x tools do not read as the text encoder.)

kohya's scripts train SD 1.x on the diffusers UNet, so its module paths are diffusers' own.
"""

from __future__ import annotations

from booth.dreambooth.single_file import ExportError, torch_dtype

LORA_FILE = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_ENDINGS = {".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
            ".lora.down.weight": "down", ".lora.up.weight": "up",
            ".lora_A.weight": "down", ".lora_B.weight": "up",
            # diffusers' spelling of text-encoder adapters (convert_state_dict_to_diffusers)
            ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}


def lora_modules(state: dict, component: str | None = None) -> dict[tuple[str, str], dict]:
    """{(component, module path): {"down": tensor, "up": tensor}} from PEFT- or diffusers-named
    weights. `component` names the model when the keys carry no `unet.`/`text_encoder.`."""
    modules: dict[tuple[str, str], dict] = {}
    for key, value in state.items():
        ending = next((e for e in _ENDINGS if key.endswith(e)), None)
        if ending is None:
            raise ExportError(f"{key!r} is not a LoRA weight booth knows how to convert")
        path, owner = key[: -len(ending)], component
        head, _, rest = path.partition(".")
        if head in COMPONENTS:
            owner, path = head, rest
        if owner is None:
            raise ExportError(f"{key!r} does not say whether it belongs to the UNet or the "
                              "text encoder")
        modules.setdefault((owner, path), {})[_ENDINGS[ending]] = value
    broken = [path for (_, path), pair in modules.items() if set(pair) != {"down", "up"}]
    if broken:
        raise ExportError(f"LoRA module {broken[0]!r} lacks its down or up weight")
    return modules


def to_kohya(modules: dict, dtype: str = "fp16") -> dict:
    """kohya's keys. alpha = rank: booth trains with lora_alpha = rank (scale 1, see
    models.lora_config), which is also what a diffusers file without alphas means."""
    import torch

    cast, out = torch_dtype(dtype), {}
    for (component, path), pair in sorted(modules.items()):
        if component == "text_encoder" and not path.startswith("text_model."):
            path = f"text_model.{path}"  # transformers 5 has no such level; SD-1.x tools want it
        name = _KOHYA_PREFIX[component] + path.replace(".", "_")
        out[f"{name}.lora_down.weight"] = pair["down"].to(cast).contiguous()
        out[f"{name}.lora_up.weight"] = pair["up"].to(cast).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(pair["down"].shape[0]), dtype=cast)
    return out


def to_diffusers(modules: dict) -> dict:
    """The keys `pipe.load_lora_weights` reads, as diffusers' own `save_lora_weights` writes."""
    out = {}
    for (component, path), pair in sorted(modules.items()):
        # The text encoder's adapters keep the older spelling: the only one diffusers' text
        # encoder loader recognises besides PEFT's.
        layer = "lora_linear_layer" if component == "text_encoder" else "lora"
        out[f"{component}.{path}.{layer}.down.weight"] = pair["down"].contiguous()
        out[f"{component}.{path}.{layer}.up.weight"] = pair["up"].contiguous()
    return out


def fuse(state: dict, modules: dict, component: str) -> dict:
    """`component`'s base weights with its LoRA deltas merged in: W + up @ down (scale 1, as
    booth trains; see to_kohya), for a single file that needs no LoRA loader."""
    fused = dict(state)
    for (owner, path), pair in modules.items():
        if owner != component:
            continue
        key = f"{path}.weight"
        if key not in state:
            raise ExportError(f"the LoRA module {path!r} is not in the base model's "
                              f"{component}: was the run made with another base model?")
        delta = pair["up"].float() @ pair["down"].float()
        fused[key] = (state[key].float() + delta).to(state[key].dtype)
    return fused


def is_lora_state(state: dict) -> bool:
    return any(marker in key for key in state
               for marker in (".lora_A.", ".lora.down.", ".lora_linear_layer.down."))
