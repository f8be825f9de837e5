"""Per-epoch sample images with a fixed seed, and the over-training check measured on them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageStat

from .setup import evaluating

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from ..request import GenerateRequest
    from .config import TrainConfig
    from .run_folder import RunFolder

DARKER = 0.75  # mean brightness under 75% of epoch 0's
MORE_SATURATED = 1.35  # mean saturation over 135% of epoch 0's


def sample_request(config: TrainConfig, index: int, lora: Path | None) -> GenerateRequest:
    """The settings of sample ``index``: its prompt, a seed fixed per prompt, and the run's sampling settings."""
    from ..request import GenerateRequest

    prompt = config.prompts()[index] if config.sample_prompts else (config.trigger_word or "a photo")
    return GenerateRequest(prompt, config.sample_negative_prompt, config.seed + index, config.sample_steps,
                           config.sample_cfg, config.sample_width or config.resolution,
                           config.sample_height or config.resolution, config.sample_scheduler, lora,
                           clip_skip=config.clip_skip)


def render_samples(pipe: StableDiffusionPipeline, config: TrainConfig, run: RunFolder, epoch: int, base_name: str,
                   lora: Path | None, step: int | None = None, stop: threading.Event | None = None) -> list[Path]:
    """One image per prompt from the model as it is now, same seed every time so changes are the LoRA's doing.
    Each PNG names the base and the LoRA file saved with it, so its parameters and ComfyUI workflow reproduce it.
    ``stop`` ends the round between two sampling steps (``RenderStopped``), before any unfinished image is saved."""
    from ..inference import render, save_png

    run.samples_dir.mkdir(parents=True, exist_ok=True)
    with evaluating(pipe):
        images = [render(pipe, sample_request(config, index, lora), base_name, stop)
                  for index in range(len(config.sample_prompts))]
    return [save_png(image, run.sample_file(epoch, index, step)) for index, image in enumerate(images)]


def sample_grid(run: RunFolder, prompts: list[str]) -> Path | None:
    """Every epoch's samples in one picture, epochs down and prompts across, saved beside them."""
    from ..inference import label_grid, save_png

    epochs = {epoch: paths for epoch, paths in sorted(run.all_samples().items()) if len(paths) == len(prompts)}
    if not epochs or not prompts:
        return None
    cells = []
    for paths in epochs.values():
        row = []
        for path in paths:
            with Image.open(path) as image:
                row.append(image.convert("RGB"))
        cells.append(row)
    grid = label_grid(cells, [f"epoch {epoch}" for epoch in epochs], prompts, "epoch ↓", "sample prompt →")
    grid.info["grid"] = (f"Sample grid: epochs {', '.join(map(str, epochs))} (rows, 0 = the base model) × prompts "
                         f"(columns): " + " | ".join(prompts))
    return save_png(grid, run.sample_grid_file)


def tone(paths: list[Path]) -> tuple[float, float]:
    """Mean brightness and mean saturation (0-255) over a set of images."""
    brightness, saturation = [], []
    for path in paths:
        with Image.open(path) as img:
            brightness.append(ImageStat.Stat(img.convert("L")).mean[0])
            saturation.append(ImageStat.Stat(img.convert("HSV").getchannel("S")).mean[0])
    return sum(brightness) / len(brightness), sum(saturation) / len(saturation)


def overtraining_warning(first: list[Path], now: list[Path], when: str) -> str | None:
    """Advice when samples got much darker or more saturated than at epoch 0, the usual sign of a too-high rate."""
    if not first or not now:
        return None
    (b0, s0), (b1, s1) = tone(first), tone(now)
    symptoms = []
    if b0 > 0 and b1 < b0 * DARKER:
        symptoms.append(f"{100 - 100 * b1 / b0:.0f}% darker")
    if s0 > 0 and s1 > s0 * MORE_SATURATED:
        symptoms.append(f"{100 * s1 / s0 - 100:.0f}% more saturated")
    if not symptoms:
        return None
    return (f"The {when} samples are {' and '.join(symptoms)} than at epoch 0: the LoRA is probably overcooking. "
            f"Use an earlier epoch's file, or train again with a lower learning rate.")
