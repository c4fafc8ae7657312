"""What the training loop needs before its first step: accelerator, cached inputs, optimizer.

Kept apart from trainer.py so the loop itself reads top to bottom.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booth.dreambooth.config import ConfigError, TrainConfig

WANDB_MISSING = ("report_to='wandb' needs the wandb package: pip install 'booth[wandb]' "
                 "(or report_to='tensorboard')")


def resolve_for_device(config: TrainConfig, run_dir: Path, console) -> TrainConfig:
    """The config as it will run here: absolute paths, GPU-only options dropped with a warning."""
    import torch
    from accelerate.utils import is_bnb_available, is_wandb_available

    from booth.dreambooth.loading import resolve_base_model
    from booth.dreambooth.train_data import list_images

    # A local model folder as an absolute path: run.yaml must work from any directory.
    base_model = resolve_base_model(config.base_model)
    images = [str(Path(p).expanduser().resolve()) for p in config.instance_images]
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"instance image not found: {missing[0]}")
    image_captions(images)  # a bad caption is refused before the run folder exists
    class_dir = None
    if config.with_prior_preservation:
        class_dir = Path(config.class_data_dir).expanduser().resolve()
        if not class_dir.is_dir() or not list_images(class_dir):
            raise ConfigError(f"no class images in {class_dir}; generate them first")
    accelerated = torch.cuda.is_available() or torch.backends.mps.is_available()
    mixed_precision = config.mixed_precision
    if mixed_precision == "fp16" and not accelerated:
        console.print("[yellow]fp16 needs a GPU; training in full precision (fp32) here[/]")
        mixed_precision = "no"
    use_8bit_adam = config.use_8bit_adam
    if use_8bit_adam and not (torch.cuda.is_available() and is_bnb_available()):
        console.print("[yellow]8-bit Adam needs CUDA and bitsandbytes; using AdamW[/]")
        use_8bit_adam = False
    if config.report_to == "wandb" and not is_wandb_available():
        raise ConfigError(WANDB_MISSING)
    return dataclasses.replace(
        config, base_model=base_model, output_dir=str(run_dir), instance_images=images,
        class_data_dir=str(class_dir) if class_dir else config.class_data_dir,
        mixed_precision=mixed_precision, use_8bit_adam=use_8bit_adam,
    )


# --- several processes (`accelerate launch`, torchrun) ----------------------------------------
# Run directly, booth is one process and none of this imports accelerate. Launched, every
# process runs the same tool call; these let the main one alone touch the run folder.


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def _on_cpu_only() -> bool:
    import torch

    # Without a GPU, accelerate joins the launched processes only when told to use the CPU
    # (gloo); otherwise each of them silently trains alone on the whole data.
    return launched_processes() > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's PartialState of this launch (created once, on the CPU if no GPU)."""
    from accelerate import PartialState

    return PartialState(cpu=_on_cpu_only())


def is_main_process() -> bool:
    return launched_processes() == 1 or process_state().is_main_process


def wait_for_everyone() -> None:
    """A barrier across the launched processes; nothing when run directly."""
    if launched_processes() > 1:
        process_state().wait_for_everyone()


def same_on_every_process(value):
    """The main process's `value` on every process (e.g. a run name made from the clock)."""
    if launched_processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    process_state()
    return broadcast_object_list([value], from_process=0)[0]


def process_console(console):
    """The console to report on; processes other than the main one stay silent."""
    from rich.console import Console

    if not is_main_process():
        return Console(stderr=True, quiet=True)
    return console or Console(stderr=True)


def stop_everywhere(accelerator, stop: bool) -> bool:
    """Ctrl-C reaches the processes at different steps; they must all stop at the same one."""
    if accelerator.num_processes == 1:
        return stop
    import torch

    flag = torch.tensor([float(stop)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def make_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # accelerate keeps one process-wide state; a long agent session may train again with
    # another precision. Only a single process may start over (a launched job runs one run).
    if AcceleratorState._shared_state and launched_processes() == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return Accelerator(
        cpu=_on_cpu_only(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(run_dir),
                                            logging_dir=str(run_dir / "logs")),
        # The sampler's order then depends only on (seed, epoch): resumable exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  data_seed=config.seed),
    )


class PromptEmbeddings:
    """Text-encoder states of the prompts a batch uses: the instance prompt (row 0), the class
    prompt (row 1, with priors), then each distinct caption (`<image>.txt`, see
    train_data.read_caption) after them; `instance_rows[i]` is the row of subject photo i.

    Cached once when the text encoder is frozen (it can then leave memory); computed every
    step, with gradients, when it is trained (only the rows the batch uses).
    """

    def __init__(self, tokenizer, text_encoder, config: TrainConfig, device, dtype):
        import torch

        prompts = [config.instance_prompt]
        if config.with_prior_preservation:
            prompts.append(config.class_prompt)
        self.class_row = 1
        self.instance_rows = []
        for caption in image_captions(config.instance_images):
            if caption is not None and caption not in prompts:
                prompts.append(caption)
            self.instance_rows.append(0 if caption is None else prompts.index(caption))
        length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        self.ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        self.text_encoder = text_encoder if config.train_text_encoder else None
        self.cached = None
        if self.text_encoder is None:
            text_encoder.to(device, dtype=dtype)
            with torch.no_grad():
                self.cached = text_encoder(self.ids)[0].float()

    def __call__(self, rows):
        """States for each example of a batch, given the prompt row of each."""
        import torch

        rows = torch.as_tensor(rows, device=self.ids.device)
        if self.cached is not None:
            return self.cached.index_select(0, rows)
        used, where = rows.unique(sorted=True, return_inverse=True)
        return self.text_encoder(self.ids.index_select(0, used))[0].index_select(0, where)


def image_captions(images: list[str]) -> list[str | None]:
    """The caption of each subject photo (None: it has none); a bad one is a ConfigError."""
    from booth.dreambooth.train_data import CaptionError, caption_path, read_caption

    captions = []
    for image in images:
        try:
            captions.append(read_caption(image))
        except CaptionError as error:
            raise ConfigError(f"{caption_path(image)}: {error}") from None
    return captions


def make_optimizer(params, config: TrainConfig, device, console):
    """AdamW; bitsandbytes' 8-bit AdamW when asked and possible; fused kernels on CUDA (one
    kernel for all parameters instead of a handful each; the CPU keeps its default loop,
    which an exact resume on the CPU was measured with)."""
    import torch

    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_8bit_adam:  # resolve_for_device kept it only where it works
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


def speed_options(config: TrainConfig, unet, device, console) -> None:
    """The opt-in GPU speed-ups of the config, where this device has them (see config.py)."""
    import torch

    cuda = device.type == "cuda"
    tf32 = cuda and torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and later
    if config.allow_tf32 and not tf32:
        console.print("[yellow]allow_tf32 needs an Ampere or newer GPU; ignored here[/]")
    if cuda:  # process-wide: set for every run, so one run's choice does not leak into the next
        # Matmuls only; torch already runs cuDNN convolutions in TF32 by default.
        torch.backends.cuda.matmul.allow_tf32 = bool(config.allow_tf32 and tf32)
    if config.compile_unet:
        if not cuda:  # measured on a CPU: 164 s to compile, then slower than eager
            console.print("[yellow]compile_unet pays only on a GPU; training eagerly[/]")
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
        # In place (nn.Module.compile): the weights keep their names, so checkpoints,
        # resume and export see the same module.
        unet.compile()


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its kernels between runs: $BOOTH_COMPILE_CACHE, else
    booth-compile/ in the Hugging Face cache."""
    if os.environ.get("BOOTH_COMPILE_CACHE"):
        return Path(os.environ["BOOTH_COMPILE_CACHE"]).expanduser()
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "booth-compile"


def weight_dtype(mixed_precision: str):
    """The dtype frozen weights may be cast to under this mixed precision."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def tracker_config(config: TrainConfig) -> dict:
    # TensorBoard's hparams take scalars and strings only.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in config.to_dict().items() if v is not None}


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> float | None:
    """The most the card held since reset_peak_memory (None without CUDA): memory plans
    learn from it."""
    import torch

    return float(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


@dataclass
class Training:
    """Everything the loop touches, prepared by accelerate."""

    accelerator: Any
    models: list  # the trained ones: [unet] or [unet, text_encoder]
    params: list
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    dataset: Any
    prompts: PromptEmbeddings
    noise_scheduler: Any
    generator: Any
    scaling: tuple[float, float]
    # The frozen parts validation borrows from the base model, loaded at its first use and
    # kept on the CPU between validations (booth.dreambooth.validation).
    validation_parts: Any = None


def prepare(config: TrainConfig, run_dir: Path, console) -> Training:
    """Load the parts, freeze what is not trained, cache the inputs, prepare with accelerate."""
    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader

    from booth.dreambooth.checkpoints import GeneratorState, register_weight_hooks
    from booth.dreambooth.latents import cache_latent_stats
    from booth.dreambooth.models import add_lora, load_parts
    from booth.dreambooth.train_data import PairedExamples, collate_pairs

    accelerator = make_accelerator(config, run_dir)
    set_seed(config.seed)
    device, frozen_dtype = accelerator.device, weight_dtype(accelerator.mixed_precision)
    parts = load_parts(config.base_model)
    unet, text_encoder = parts.unet, parts.text_encoder
    # The VAE is always frozen; the text encoder unless trained. No grads, no grad memory.
    parts.vae.requires_grad_(False)
    text_encoder.requires_grad_(config.train_text_encoder)
    trained = [unet] + ([text_encoder] if config.train_text_encoder else [])
    if config.use_lora:
        for model in trained:  # frozen base weights may sit in the low-precision dtype
            model.to(device)
            if frozen_dtype != torch.float32:
                model.to(dtype=frozen_dtype)
        add_lora(unet, text_encoder if config.train_text_encoder else None, config.lora_rank)
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    for param in params:  # trained weights stay fp32: fp16 ones cannot be unscaled
        param.data = param.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:  # transformers 5 renamed it; 4.x has the old name
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            (enable or text_encoder.gradient_checkpointing_enable)()
    for model in trained:  # from_pretrained gives eval mode; transformers checkpoints
        model.train()      # only in training mode (SD's dropout is 0: losses are the same)

    # Every image through the frozen VAE once; then the VAE (and a frozen text encoder,
    # whose two outputs are cached too) leave memory.
    instance, classes, crops = cache_latent_stats(parts.vae, config, device, frozen_dtype,
                                                  console)
    scaling = (parts.vae.config.scaling_factor, parts.vae.config.get("shift_factor") or 0.0)
    prompts = PromptEmbeddings(parts.tokenizer, text_encoder, config, device, frozen_dtype)
    dataset = PairedExamples(instance, classes, seed=config.seed,
                             prompt_rows=(prompts.instance_rows, prompts.class_row))
    dataset.on_epoch = crops
    loader = DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True,
                        collate_fn=collate_pairs)

    optimizer = make_optimizer(params, config, device, console)
    # accelerate steps the scheduler once per process for every optimizer step.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles, power=config.lr_power,  # read by their schedules only
    )
    *models, optimizer, loader, lr_scheduler = accelerator.prepare(
        *trained, optimizer, loader, lr_scheduler)
    speed_options(config, unet, device, console)
    if config.train_text_encoder:
        prompts.text_encoder = models[1]
    register_weight_hooks(accelerator, {id(unet): "unet", id(text_encoder): "text_encoder"})
    # All noise of the loop comes from this generator (offset per process), saved with
    # each checkpoint: the global RNG is also drawn by DataLoader iterators.
    generator = torch.Generator(device).manual_seed(config.seed + accelerator.process_index)
    accelerator.register_for_checkpointing(GeneratorState(generator, accelerator))
    return Training(accelerator, models, params, optimizer, lr_scheduler, loader, dataset,
                     prompts, parts.noise_scheduler, generator, scaling)
