"""Per-epoch sample images with a fixed seed, and the grid of every epoch's samples."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .setup import evaluating

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from ..request import GenerateRequest
    from .config import TrainConfig
    from .run_folder import RunFolder


def sample_request(config: TrainConfig, index: int, lora: Path | None) -> GenerateRequest:
    """The settings of sample ``index``: its prompt, a seed fixed per prompt, and the run's sampling settings where
    the line's own flags (sd-scripts' ``--w``, ``--s`` …) set none."""
    from ..request import GenerateRequest
    from .sample_prompts import SampleLine

    line = config.sample_line(index) if config.sample_prompts else SampleLine(config.trigger_word or "a photo")
    return GenerateRequest(
        line.prompt, config.sample_negative_prompt if line.negative is None else line.negative,
        config.seed + index if line.seed is None else line.seed, line.steps or config.sample_steps,
        config.sample_cfg if line.cfg is None else line.cfg, line.width or config.sample_width or config.resolution,
        line.height or config.sample_height or config.resolution, line.sampler or config.sample_scheduler, lora,
        clip_skip=line.clip_skip or config.clip_skip)


def render_samples(pipe: StableDiffusionPipeline, config: TrainConfig, run: RunFolder, epoch: int, base_name: str,
                   lora: Path | None, step: int | None = None, stop: threading.Event | None = None) -> list[Path]:
    """One image per prompt from the model as it is now, same seed every time so changes are the LoRA's doing.
    Each PNG names the base and the LoRA file saved with it, so its parameters and ComfyUI workflow reproduce it.
    ``stop`` ends the round between two sampling steps (``RenderStopped``), before any unfinished image is saved."""
    from ..inference import render_batches, save_png

    run.samples_dir.mkdir(parents=True, exist_ok=True)
    with evaluating(pipe):
        images = render_batches(pipe, [sample_request(config, index, lora) for index in
                                       range(len(config.sample_prompts))], base_name, stop)
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
