"""Generate images from a cached base model with a LoRA at ComfyUI-style strengths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .models import BaseModelSpec, ModelCache, pick_device
from .training import kohya

LORA_ADAPTER = "test_lora"


@dataclass
class GenerateRequest:
    """One image's settings. Strengths mean what they mean in ComfyUI's Load LoRA node."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None
    height: int | None = None
    lora: Path | None = None
    strength_model: float = 1.0
    strength_clip: float = 1.0


def generate(cache: ModelCache, base: BaseModelSpec, request: GenerateRequest) -> Image.Image:
    """One image. ``strength_model`` scales the LoRA on the UNet, ``strength_clip`` on the text encoder."""
    import torch

    pipe = cache.pipeline(base)
    device = pick_device()
    pipe.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    pipe.unload_lora_weights()
    if request.lora is not None:
        kohya.load_lora_into(pipe, Path(request.lora), LORA_ADAPTER)
        strengths = {"unet": request.strength_model, "text_encoder": request.strength_clip}
        present = pipe.get_list_adapters()  # a UNet-only LoRA has no text-encoder part to weight
        pipe.set_adapters([LORA_ADAPTER], adapter_weights=[{k: v for k, v in strengths.items() if k in present}])
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(request.seed)
    result = pipe(request.prompt, negative_prompt=request.negative_prompt or None,
                  num_inference_steps=request.steps, guidance_scale=request.cfg, width=request.width or size,
                  height=request.height or size, generator=generator)
    return result.images[0]
