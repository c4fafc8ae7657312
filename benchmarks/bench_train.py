"""Training speed and peak memory: booth's loop vs a plain reference loop, same model and data.

The reference does what diffusers' examples/dreambooth/train_dreambooth.py does at these
settings: fp32, every step opens the images, encodes them through the VAE and the prompts
through the text encoder, then trains UNet + text encoder with prior preservation. booth caches
VAE latents once (and the text encoder's output when it is frozen) before the loop.

Each loop runs in its own subprocess, so the peak memory is that loop's own.

    python benchmarks/bench_train.py --resolution 64 --steps 30
    python benchmarks/bench_train.py --base-model path/to/sd15 --resolution 512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTANCE_IMAGES, CLASS_IMAGES = 3, 4
LEARNING_RATE = 5e-6
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of a dog"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--base-model", help="SD-1.x diffusers folder (default: a tiny one)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--loop", choices=["booth", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        measure = run_booth if args.loop == "booth" else run_reference
        print(json.dumps(measure(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.base_model is None:
            from booth.dreambooth.tiny import save_tiny_model

            args.base_model = str(save_tiny_model(Path(tmp) / "tiny"))
        args.data = str(make_data(Path(tmp) / "data", args.resolution))
        results = {loop: in_subprocess(loop, args) for loop in ("reference", "booth")}
    report(args, results)


def make_data(folder: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind, count in (("instance", INSTANCE_IMAGES), ("class", CLASS_IMAGES)):
        (folder / kind).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / kind / f"{i:04d}.png")
    return folder


def in_subprocess(loop: str, args) -> dict:
    command = [sys.executable, __file__, "--loop", loop, "--data", args.data,
               "--base-model", args.base_model, "--resolution", str(args.resolution),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate picks cuda whenever it sees one
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.exit(f"{loop} loop failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def device_name(choice: str) -> str:
    import torch

    if choice != "auto":
        return choice
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_mb(device: str) -> dict:
    import resource

    import torch

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def run_booth(args) -> dict:
    from booth.dreambooth.config import TrainConfig
    from booth.dreambooth.trainer import train

    data = Path(args.data)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            base_model=args.base_model, output_dir=f"{tmp}/run",
            instance_images=[str(p) for p in sorted((data / "instance").iterdir())],
            instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
            class_data_dir=str(data / "class"), resolution=args.resolution,
            max_train_steps=total, learning_rate=LEARNING_RATE, checkpointing_steps=10**6,
            report_to="none",
        )
        result = train(config)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    seconds = rows[-1]["elapsed"] - rows[args.warmup - 1]["elapsed"]
    return {"steps_per_s": args.steps / seconds, **peak_memory_mb(device_name(args.device))}


def run_reference(args) -> dict:
    """The straightforward loop: re-encode images and prompts every step, fp32."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from booth.dreambooth.train_data import load_image

    device = device_name(args.device)
    torch.manual_seed(0)
    source = args.base_model
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet").to(device)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae").to(device).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").to(device)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-2)
    data = Path(args.data)
    instance = sorted((data / "instance").iterdir())
    classes = sorted((data / "class").iterdir())
    ids = tokenizer([INSTANCE_PROMPT, CLASS_PROMPT], padding="max_length", truncation=True,
                    max_length=text_encoder.config.max_position_embeddings,
                    return_tensors="pt").input_ids.to(device)
    started = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        i = step % max(len(instance), len(classes))
        pixels = torch.stack([load_image(instance[i % len(instance)], args.resolution),
                              load_image(classes[i % len(classes)], args.resolution)])
        with torch.no_grad():
            latents = vae.encode(pixels.to(device)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(prediction[:1], noise[:1]) + F.mse_loss(prediction[1:], noise[1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"steps_per_s": args.steps / seconds, **peak_memory_mb(device)}


def report(args, results: dict) -> None:
    print(f"resolution {args.resolution} px, {args.steps} timed steps after {args.warmup} "
          f"warm-up, batch 1 instance + 1 class image, UNet + text encoder trained, fp32")
    print(f"base model: {args.base_model}")
    for loop, result in results.items():
        memory = ", ".join(f"{k} {v:.0f}" for k, v in result.items() if k.startswith("peak"))
        print(f"  {loop:9s}  {result['steps_per_s']:6.2f} steps/s  "
              f"({1 / result['steps_per_s']:.3f} s/step)  {memory}")
    ratio = results["booth"]["steps_per_s"] / results["reference"]["steps_per_s"]
    print(f"  booth is {ratio:.2f}x the reference's speed")


if __name__ == "__main__":
    main()
