"""Test-tab time per image: the first image (base model load), then images that change LoRA file or strength,
side by side with the bare diffusers pipeline call on the same loaded model as the reference. Prints JSON.

    python bench/generate_speed.py --base demo --steps 20
    python bench/generate_speed.py --base sd15-random --steps 20      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.cache import ModelCache
from lora_gradio.inference import generate
from lora_gradio.models import BaseModelSpec, resolve_base
from lora_gradio.request import GenerateRequest
from lora_gradio.training import kohya
from lora_gradio.training.config import TrainConfig
from lora_gradio.training.network import add_lora_adapters
from lora_gradio.views import pick_device, pipeline_view


def write_lora(cache: ModelCache, base: BaseModelSpec, folder: Path, seed: int) -> Path:
    """A random rank-16 LoRA on the base model's attention layers, saved in kohya format."""
    with cache.pipeline(base, "writing a benchmark LoRA") as base_pipe:
        pipe = pipeline_view(base_pipe)
        add_lora_adapters(pipe.unet, pipe.text_encoder, TrainConfig(rank=16, alpha=16, train_text_encoder=True))
        torch.manual_seed(seed)
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
        tensors = kohya.lora_state_dict({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, torch.float16)
    return kohya.save_lora(folder / f"lora{seed}.safetensors", tensors, {"ss_network_dim": "16"})


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, waiting for the GPU to finish."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    """Time the first and the following images, and the reference."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    base = resolve_base(args.base)
    cache = ModelCache()
    request = GenerateRequest("a portrait photo", seed=1, steps=args.steps)
    first = timed(lambda: generate(cache, base, request))
    with tempfile.TemporaryDirectory() as tmp:
        loras = [write_lora(cache, base, Path(tmp), seed) for seed in (1, 2)]
        changes = [(loras[0], 1.0), (loras[0], 0.5), (loras[1], 1.0), (loras[1], -0.5)]
        later = [timed(lambda lora=lora, s=s: generate(cache, base, GenerateRequest(
            "a portrait photo", seed=1, steps=args.steps, lora=lora, strength_model=s, strength_clip=s)))
            for lora, s in changes]
    with cache.pipeline(base, "the reference call") as base_pipe:
        pipe = pipeline_view(base_pipe)
        reference = [timed(lambda: pipe("a portrait photo", num_inference_steps=args.steps,
                                        generator=torch.Generator().manual_seed(1))) for _ in range(3)]
    print(json.dumps({
        "device": torch.cuda.get_device_name() if pick_device().type == "cuda" else "cpu", "base": args.base,
        "steps": args.steps, "first_image_s": round(first, 3),
        "later_images_s": [round(t, 3) for t in later], "base_model_loads": cache.loads,
        "reference_pipeline_call_s": round(min(reference), 3)}))


if __name__ == "__main__":
    main()
