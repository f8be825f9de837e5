"""Training speed and peak memory of lora-gradio's loop, side by side with a bare reference loop in the same run.

The reference is the smallest correct LoRA step (UNet forward, MSE on noise, backward, optimizer step) on the same
model, precision, batch and optimizer, with latents and text embeddings already on the device: the ceiling our loop
is measured against. Prints one JSON object.

    python bench/train_speed.py --base sd15-random --resolution 512 --batch-size 4 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.dataset import make_demo_dataset
from lora_gradio.models import ModelCache, pick_device, pipeline_view, resolve_base
from lora_gradio.training.config import make_config
from lora_gradio.training.loop import DTYPES, train
from lora_gradio.training.network import add_lora_adapters, make_optimizer


def reference_loop(pipe, config, steps: int, device: torch.device) -> dict:
    """The bare LoRA step, timed over ``steps`` after two warm-up steps."""
    dtype = DTYPES[config.mixed_precision]
    unet = pipeline_view(pipe, device, dtype).unet  # adapters go on a view; the cached base stays as it is
    groups = add_lora_adapters(unet, None, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(config, groups)
    side = config.resolution // 8
    latents = torch.randn(config.batch_size, 4, side, side, device=device, dtype=dtype)
    hidden = torch.randn(config.batch_size, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    scaler = torch.amp.GradScaler(enabled=config.mixed_precision == "fp16" and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (config.batch_size,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(latents + noise, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"it_per_s": len(times) / sum(times), "peak_memory_gb": peak}


def main() -> None:
    """Run both loops on one configuration and print the comparison."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="demo")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    device = pick_device()
    config = make_config({
        "resolution": args.resolution, "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
        "optimizer": args.optimizer, "gradient_checkpointing": args.gradient_checkpointing, "epochs": 1,
        "save_every_n_epochs": 0, "min_snr_gamma": 5.0, "enable_buckets": False})
    base = resolve_base(args.base)
    cache = ModelCache()
    with tempfile.TemporaryDirectory() as tmp:
        repeats = -(-args.steps * args.batch_size // 8)  # the demo dataset has 8 images
        make_demo_dataset(Path(tmp) / "data" / f"{repeats}_demo", size=args.resolution)
        ours = train(config, base, Path(tmp) / "data", Path(tmp) / "out", cache=cache)
    with cache.pipeline(base, "the reference loop") as pipe:
        reference = reference_loop(pipe, config, args.steps, device)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "base": args.base, "resolution": args.resolution, "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision, "optimizer": args.optimizer,
        "gradient_checkpointing": args.gradient_checkpointing, "steps": ours.steps,
        "lora_gradio": {"it_per_s": round(ours.it_per_s, 3), "peak_memory_gb": ours.peak_memory_gb},
        "reference": {k: round(v, 3) if v else v for k, v in reference.items()},
    }))


if __name__ == "__main__":
    main()
