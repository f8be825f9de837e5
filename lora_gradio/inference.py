"""Generate images from the cached base model with a LoRA at ComfyUI-style strengths, and comparison grids.

The base model stays loaded, and so do the last few LoRA files as adapters of their own: going back to an epoch, or a
new strength, only weights an adapter; a new file loads one.
"""

from __future__ import annotations

import io
import json
import math
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import comfyui
from .atomic import write_bytes_atomic
from .cache import ModelCache
from .errors import Stopped, UserError
from .events import Emit, JobEvent, ignore, progress, status_events
from .fonts import drawable, label_font
from .lora_attach import attach, set_strengths
from .models import BaseModelSpec
from .request import SAMPLERS, GenerateRequest
from .views import encode_prompts, pipeline_view

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from .lora_map import LoraFit

LORA_ADAPTER = "test_lora"
BATCH = 2  # sample images rendered in one call (samples, strength trials)


def generate(cache: ModelCache, base: BaseModelSpec, request: GenerateRequest,
             on_wait: Callable[[str], None] | None = None) -> Image.Image:
    """One image under the cache's lease, carrying its parameters in ``image.info['parameters']`` (PNG text)."""
    request.validate()
    with cache.pipeline(base, "generation", on_wait=on_wait) as pipe:
        return generate_on(test_pipeline(cache, pipe), base, request)


def test_pipeline(cache: ModelCache, pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    """The Test tab's own view of the leased base: LoRAs attach to it and stay attached between requests."""
    return cache.derived("test-view", lambda: pipeline_view(pipe))


def generate_on(pipe: StableDiffusionPipeline, base: BaseModelSpec, request: GenerateRequest,
                stop: threading.Event | None = None) -> Image.Image:
    """Attach the request's LoRA at its strengths to a view the caller owns, then render (``stop`` ends it between
    two sampling steps). The image's ``info['lora']`` says which of the file's modules were applied."""
    fit = attach_strengths(pipe, request)
    image = render(pipe, request, base.display_name, stop)
    if fit is not None:
        image.info["lora"] = fit.line()
    return image


def attach_strengths(pipe: StableDiffusionPipeline, request: GenerateRequest) -> LoraFit | None:
    """Attach the request's LoRA (none: the clean base) to a view the caller owns, at the request's strengths."""
    if request.lora is not None and not Path(request.lora).is_file():
        raise UserError(f"LoRA file '{request.lora}' does not exist.")
    fit = attach(pipe, request.lora, LORA_ADAPTER)
    if fit is not None:
        set_strengths(pipe, fit, {"unet": request.strength_model, "text_encoder": request.strength_clip})
    return fit


def stopped(stop: threading.Event | None) -> bool:
    """Whether a job's Stop was pressed."""
    return stop is not None and stop.is_set()


class RenderStopped(Stopped):
    """A Stop arrived while an image was being sampled: the image was left unfinished and is not returned."""


def render(pipe: StableDiffusionPipeline, request: GenerateRequest, model_name: str,
           stop: threading.Event | None = None) -> Image.Image:
    """Run the pipeline as it is (adapters included) with the request's sampler, seed and size; ``stop`` is
    looked at after every sampling step, so a Stop never waits for a whole image."""
    return render_batch(pipe, [request], model_name, stop)[0]


def render_batches(pipe: StableDiffusionPipeline, requests: list[GenerateRequest], model_name: str,
                   stop: threading.Event | None = None) -> list[Image.Image]:
    """Every request's image, in order, up to ``BATCH`` prompts per call among neighbours that share their sampler,
    steps, CFG, size and CLIP skip: faster than one by one, and no heavier than a two-image generation."""
    batches: list[list[GenerateRequest]] = []
    for request in requests:
        if batches and len(batches[-1]) < BATCH and shared(batches[-1][0]) == shared(request):
            batches[-1].append(request)
        else:
            batches.append([request])
    return [image for batch in batches for image in render_batch(pipe, batch, model_name, stop)]


def shared(request: GenerateRequest) -> tuple:
    """What the prompts of one batch must have in common."""
    return request.scheduler, request.steps, request.cfg, request.width, request.height, request.clip_skip


def render_batch(pipe: StableDiffusionPipeline, requests: list[GenerateRequest], model_name: str,
                 stop: threading.Event | None = None) -> list[Image.Image]:
    """:func:`render` for several prompts and seeds in one batch; they share the first request's sampler, steps,
    CFG and size. Each image starts from its own seed's noise, as it would alone."""
    import diffusers
    import torch

    first = requests[0]
    sampler = SAMPLERS[first.scheduler]
    pipe.scheduler = getattr(diffusers, sampler.diffusers_class).from_config(pipe.scheduler.config,
                                                                             **sampler.diffusers_config)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = first.width or size, first.height or size
    generators = [torch.Generator("cpu").manual_seed(request.seed) for request in requests]

    def check_stop(pipeline: StableDiffusionPipeline, step: int, timestep: object, values: dict) -> dict:
        if stopped(stop):
            pipeline._interrupt = True  # diffusers' own flag: the remaining steps are skipped
        return values

    with torch.inference_mode():
        texts = [r.prompt for r in requests] + [r.negative_prompt for r in requests]
        embeds = encode_prompts(pipe.text_encoder, pipe.tokenizer, texts, first.clip_skip)
        images = pipe(prompt_embeds=embeds[:len(requests)], negative_prompt_embeds=embeds[len(requests):],
                      num_inference_steps=first.steps, guidance_scale=first.cfg, width=width, height=height,
                      generator=generators if len(generators) > 1 else generators[0],
                      callback_on_step_end=check_stop).images
    if stopped(stop):
        raise RenderStopped("Stopped while an image was being rendered; it was left unfinished.")
    for image, request in zip(images, requests, strict=True):
        image.info["parameters"] = request.parameters_text(model_name, width, height)
        nodes = comfyui.build_graph(request, model_name, width, height)
        image.info["prompt"] = json.dumps(comfyui.api_prompt(nodes))  # the text chunks ComfyUI writes and reads back
        image.info["workflow"] = json.dumps(comfyui.ui_workflow(nodes))
    return images


def save_png(image: Image.Image, path: Path) -> Path:
    """Save with the generation parameters as PNG text, as A1111 and ComfyUI read them back."""
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)


def grid_cells(cache: ModelCache, base: BaseModelSpec, request: GenerateRequest, loras: list[tuple[str, Path]],
               strengths: list[float], stop: threading.Event | None, emit: Emit) -> list[list[Image.Image]]:
    """Every cell of the grid, rendered under one lease, counted as it lands."""
    total = len(loras) * len(strengths)
    cells: list[list[Image.Image]] = []
    with cache.pipeline(base, "a comparison grid", on_wait=status_events(emit), stop=stop) as pipe:
        view = test_pipeline(cache, pipe)
        for _, path in loras:
            cells.append([])
            for strength in strengths:
                if stopped(stop):
                    raise Stopped(f"{total - sum(len(row) for row in cells)} of {total} images were not rendered")
                cells[-1].append(generate_on(view, base, replace(request, lora=path, strength_model=strength,
                                                                 strength_clip=strength), stop))
                progress(emit, "Rendered {} of {} images", sum(len(row) for row in cells), total)
    return cells


def compare_grid(cache: ModelCache, base: BaseModelSpec, request: GenerateRequest,
                 loras: list[tuple[str, Path]], strengths: list[float], stop: threading.Event | None = None,
                 emit: Emit | None = None) -> Image.Image | None:
    """Rows of LoRA files (epochs) by columns of strengths, one seed, labelled axes; one lease for every cell.

    The PNG text describes the grid itself: its rows, its columns and the settings every cell shares. A Stop
    leaves no grid (None).
    """
    if not loras or not strengths:
        raise UserError("Pick at least one LoRA file and one strength for the grid.")
    if len(loras) * len(strengths) > 64:
        raise UserError(f"A {len(loras)}×{len(strengths)} grid is {len(loras) * len(strengths)} images; "
                        "keep it to 64 or fewer.")
    for strength in strengths:
        replace(request, strength_model=strength, strength_clip=strength).validate()
    emit = emit or ignore
    try:
        cells = grid_cells(cache, base, request, loras, strengths, stop, emit)
    except Stopped as exc:
        emit(JobEvent("stopped", f"Grid stopped: {exc}"))
        return None
    rows = row_labels(loras)
    columns = [f"{s:g}" for s in strengths]
    grid = label_grid(cells, rows, columns)
    width, height = cells[0][0].size
    grid.info["parameters"] = replace(request, lora=None).parameters_text(base.display_name, width, height)
    grid.info["grid"] = "\n".join([
        f"Comparison grid, {len(rows)} rows × {len(columns)} columns, one seed for every image.",
        "Rows (LoRA file): " + "; ".join(f"{label.replace(chr(10), ', ')} = {name}"
                                         for label, (name, _) in zip(rows, loras, strict=True)),
        f"Columns (strength_model = strength_clip): {', '.join(columns)}"])
    return grid


def row_labels(loras: list[tuple[str, Path]]) -> list[str]:
    """Two lines per LoRA file: "epoch 4 · step 120" from its metadata, then its run; always distinct."""
    from .lora_map import read_metadata
    from .training.run_folder import is_stop_file

    labels = []
    for name, path in loras:
        meta = read_metadata(path)
        run, _, file = name.rpartition("/")
        if meta.get("ss_epoch") and meta.get("ss_steps"):
            first = f"epoch {meta['ss_epoch']} · step {meta['ss_steps']}"
            if is_stop_file(file):
                first += " (stopped)"
        else:
            first = Path(file).stem
        labels.append(f"{first}\n{run or file}")
    for index, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[index] = f"{label} ({loras[index][0].rpartition('/')[2]})"
    return labels


GRID_MIN_CELL = 160  # smaller images (the demo's 64 px) are enlarged so that labels fit above them


def fitted(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """``text`` in characters the font has, shortened in the middle with '…' until it fits ``width`` pixels, keeping
    both ends readable."""
    text, cut = drawable(text, font), drawable("…", font)
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 2 and draw.textlength(f"{text[:keep // 2]}{cut}{text[len(text) - keep // 2:]}", font=font) > width:
        keep -= 1
    return f"{text[:keep // 2]}{cut}{text[len(text) - keep // 2:]}"


def label_grid(cells: list[list[Image.Image]], row_labels: list[str], column_labels: list[str],
               row_title: str = "LoRA file ↓", column_title: str = "strength_model = strength_clip →") -> Image.Image:
    """Paste equally sized images into a grid under axis titles and a header row, beside a label column; every
    label is shortened to its own space, so none overlaps another."""
    width, height = cells[0][0].size
    scale = max(1, math.ceil(GRID_MIN_CELL / min(width, height)))
    width, height = width * scale, height * scale
    size = max(13, min(width, height) // 14)
    font, bold = label_font(size), label_font(size + 2)
    line = size + 6
    margin_left, margin_top = max(160, width), 3 * line
    grid = Image.new("RGB", (margin_left + width * len(column_labels), margin_top + height * len(row_labels)),
                     "white")
    draw = ImageDraw.Draw(grid)
    draw.text((margin_left, 4), drawable(column_title, bold), fill="black", font=bold)
    draw.text((4, line + 4), drawable(row_title, bold), fill="black", font=bold)
    for column, label in enumerate(column_labels):
        text = fitted(draw, label, font, width - 8)
        left = margin_left + column * width + (width - draw.textlength(text, font=font)) / 2
        draw.text((left, 2 * line + 2), text, fill="black", font=font)
    for row, label in enumerate(row_labels):
        for index, part in enumerate(label.split("\n")):
            draw.text((4, margin_top + row * height + 4 + index * line), fitted(draw, part, font, margin_left - 8),
                      fill="black" if index == 0 else "#555", font=font)
        for column, cell in enumerate(cells[row]):
            if scale > 1:
                cell = cell.resize((width, height), Image.Resampling.NEAREST)
            grid.paste(cell, (margin_left + column * width, margin_top + row * height))
    return grid
