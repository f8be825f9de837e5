"""Training speed and peak memory of lora-gradio's loop, side by side with two reference loops in the same run, each in
its own process (so each peak RSS is its own):

- ``diffusers``: the step of diffusers' ``train_text_to_image_lora.py``: the VAE encodes the batch and the text
  encoder reads the captions every step, then the UNet step; what people compare a trainer with;
- ``bare``: the smallest correct LoRA step (UNet forward, MSE on noise, backward, optimizer step) with latents and
  text embeddings already on the device: the ceiling.

Prints one JSON object per loop run, then the comparison (seconds per step relative to each reference, from the best
run of each loop with ``--rounds``).

    python bench/train_speed.py --base sd15-random --resolution 512 --batch-size 4 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.cache import ModelCache
from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.estimate import peak_memory_gb
from lora_gradio.models import resolve_base
from lora_gradio.training.config import TrainConfig, apply_overrides, load_preset
from lora_gradio.training.loop import train
from lora_gradio.training.network import add_lora_adapters, make_optimizer
from lora_gradio.training.setup import DTYPES
from lora_gradio.views import encode_prompts, pick_device, pipeline_view

LOOPS = ("lora-gradio", "diffusers", "bare")


def reference_loop(pipe, config: TrainConfig, steps: int, device: torch.device, full: bool) -> float:
    """A reference LoRA step timed over ``steps`` after two warm-up steps; ``full`` also runs the VAE and the text
    encoder every step, as diffusers' example script does. Returns steps per second."""
    dtype = DTYPES[config.mixed_precision]
    view = pipeline_view(pipe, device, dtype)  # adapters go on a view; the cached base stays as it is
    unet = view.unet
    groups = add_lora_adapters(unet, None, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(config, groups)
    side = config.resolution // 8
    pixels = torch.rand(config.batch_size, 3, config.resolution, config.resolution, device=device) * 2 - 1
    latents = torch.randn(config.batch_size, 4, side, side, device=device, dtype=dtype)
    hidden = torch.randn(config.batch_size, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    captions = ["lgdemo, a red circle on a plain background"] * config.batch_size
    scaler = torch.amp.GradScaler(enabled=config.mixed_precision == "fp16" and device.type == "cuda")
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if full:
                with torch.no_grad():
                    latents = view.vae.encode(pixels.to(dtype)).latent_dist.sample() * view.vae.config.scaling_factor
                    hidden = encode_prompts(view.text_encoder, view.tokenizer, captions)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (config.batch_size,), device=device)
            pred = unet(latents + noise, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the example script logs every step's loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return len(times) / sum(times)


def run_loop(loop: str, config: TrainConfig, base_name: str, steps: int) -> dict:
    """One loop in this process: its speed, peak GPU memory and peak RSS."""
    device = pick_device()
    base = resolve_base(base_name)
    cache = ModelCache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if loop == "lora-gradio":
        stamps: list[float] = []  # when each step's event came: past two warm-up steps, as the references time
        with tempfile.TemporaryDirectory() as tmp:
            repeats = -(-(steps + 2) * config.batch_size // 8)  # the demo dataset has 8 images
            make_demo_dataset(Path(tmp) / "data" / f"{repeats}_demo", count=8, size=config.resolution)
            train(apply_overrides(config, {"max_train_steps": steps + 2}), base, Path(tmp) / "data",
                  Path(tmp) / "out", cache=cache,
                  on_event=lambda event: stamps.append(time.perf_counter()) if event.kind == "step" else None)
        it_per_s = (len(stamps) - 2) / (stamps[-1] - stamps[1])
    else:
        with cache.pipeline(base, "the reference loop") as pipe:
            it_per_s = reference_loop(pipe, config, steps, device, loop == "diffusers")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"loop": loop, "it_per_s": round(it_per_s, 3), "samples_per_s": round(it_per_s * config.batch_size, 2),
            "peak_gpu_memory_gb": round(peak, 2) if peak else None,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    """Each loop in a fresh process on one configuration, then the comparison."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="demo")
    parser.add_argument("--preset", default="", help="start from a preset (else the default settings)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--network-type", default="lora", choices=("lora", "locon", "dora"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixed-precision", help="no, fp16 or bf16 (else the preset's)")
    parser.add_argument("--optimizer", help="else the preset's")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--loops", default=",".join(LOOPS), help="which loops to run, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="run the loops this many times in turn; the best counts "
                                                              "(a shared machine only ever slows a run down)")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # a child process runs one loop
    args = parser.parse_args()

    chosen = {"mixed_precision": args.mixed_precision, "optimizer": args.optimizer,
              "gradient_checkpointing": args.gradient_checkpointing}
    settings = {"resolution": args.resolution, "batch_size": args.batch_size, "epochs": 1, "rank": args.rank,
                "alpha": args.rank / 2, "network_type": args.network_type, "save_every_n_epochs": 0,
                "sample_prompts": [], "enable_buckets": False, "train_text_encoder": False,
                "gradient_accumulation_steps": 1, **{k: v for k, v in chosen.items() if v is not None}}
    config = apply_overrides(load_preset(args.preset)[0] if args.preset else TrainConfig(), settings)
    loops = [args.only] if args.only else args.loops.split(",")
    if len(loops) == 1:  # one loop: its own process already
        result = run_loop(loops[0], config, args.base, args.steps)
        print(json.dumps(result), flush=True)
        if args.only:
            return
        results = {loops[0]: result}
    else:
        results = {}
        for _ in range(args.rounds):
            for loop in loops:
                done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", loop], check=True,
                                      capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(result), flush=True)
                if loop not in results or result["it_per_s"] > results[loop]["it_per_s"]:
                    results[loop] = result
    device = pick_device()
    ours = results.get("lora-gradio")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "base": args.base,
        "preset": args.preset or "defaults", "resolution": args.resolution, "batch_size": args.batch_size,
        "rank": args.rank, "network_type": args.network_type, "mixed_precision": config.mixed_precision,
        "optimizer": config.optimizer, "gradient_checkpointing": config.gradient_checkpointing, "steps": args.steps,
        "estimated_peak_gpu_memory_gb": round(peak_memory_gb(config), 2) if device.type == "cuda" else None,
        **({f"seconds_per_step_vs_{name}": round(results[name]["it_per_s"] / ours["it_per_s"], 2)
            for name in results if name != "lora-gradio"} if ours else {}),
    }))


if __name__ == "__main__":
    main()
