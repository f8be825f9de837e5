"""Generate images from the cached base model with a LoRA at ComfyUI-style strengths, and comparison grids.

The base model stays loaded: changing the LoRA, the epoch or a strength only loads, weights or removes an adapter.
"""

from __future__ import annotations

import io
import json
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import comfyui
from .atomic import write_bytes_atomic
from .errors import UserError
from .events import JobEvent
from .fonts import drawable, label_font
from .lora_map import attach, set_strengths
from .models import BaseModelSpec, ModelCache, encode_prompts, pipeline_view

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

LORA_ADAPTER = "test_lora"
# name -> (diffusers scheduler class, extra config), the samplers people know from A1111 and ComfyUI
SCHEDULERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
}


@dataclass(frozen=True)
class GenerateRequest:
    """One image's settings. Strengths mean what they mean in ComfyUI's Load LoRA node (-2 to 2)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    width: int | None = None
    height: int | None = None
    scheduler: str = "Euler"
    lora: Path | None = None
    strength_model: float = 1.0
    strength_clip: float = 1.0
    clip_skip: int = 1

    @classmethod
    def checked(cls, prompt: object, negative_prompt: object = "", seed: object = 0, steps: object = 20,
                cfg: object = 7.0, width: object = None, height: object = None, scheduler: object = "Euler",
                lora: Path | None = None, strength_model: object = 1.0, strength_clip: object = 1.0,
                clip_skip: object = 1) -> GenerateRequest:
        """A request from values a visitor sent: a wrong type, NaN or a fraction is named like an out-of-range
        value, never a crash."""
        problems: list[str] = []

        def number(name: str, value: object, whole: bool = False) -> Any:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and whole and value != int(value):
                ok = False
            if not ok:
                problems.append(f"{name} = {short(value)}: use a {'whole ' if whole else ''}number")
                return 0
            return int(value) if whole else float(value)

        def text(name: str, value: object) -> str:
            if value is None or isinstance(value, str):
                return value or ""
            problems.append(f"{name}: use text")
            return ""

        request = cls(text("prompt", prompt), text("negative prompt", negative_prompt), number("seed", seed, True),
                      number("steps", steps, True), number("CFG", cfg),
                      None if width is None else number("width", width, True),
                      None if height is None else number("height", height, True), text("scheduler", scheduler),
                      lora, number("strength_model", strength_model), number("strength_clip", strength_clip),
                      number("clip_skip", clip_skip, True))
        if problems:
            raise UserError("Cannot generate: " + "; ".join(problems) + ".")
        request.validate()
        return request

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the field and the allowed range."""
        checks = [(1 <= self.steps <= 150, f"steps = {self.steps}: use 1 to 150"),
                  (0 <= self.seed < 2**63, f"seed = {short(self.seed)}: use 0 to 2^63 - 1"),
                  (0 <= self.cfg <= 30, f"CFG = {self.cfg}: use 0 to 30"),
                  (-2 <= self.strength_model <= 2, f"strength_model = {self.strength_model}: use -2 to 2"),
                  (-2 <= self.strength_clip <= 2, f"strength_clip = {self.strength_clip}: use -2 to 2"),
                  (self.clip_skip in (1, 2), f"clip_skip = {short(self.clip_skip)}: use 1 or 2"),
                  (self.scheduler in SCHEDULERS, f"scheduler '{self.scheduler}': use one of {', '.join(SCHEDULERS)}"),
                  (len(self.prompt) <= 2000, f"the prompt is {len(self.prompt)} characters: CLIP reads about 75 "
                                             "tokens, so shorten it"),
                  (len(self.negative_prompt) <= 2000, f"the negative prompt is {len(self.negative_prompt)} "
                                                      "characters: CLIP reads about 75 tokens, so shorten it")]
        for size in (self.width, self.height):
            checks.append((size is None or (64 <= size <= 2048 and size % 8 == 0),
                           f"size {size}: use a multiple of 8 from 64 to 2048"))
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise UserError("Cannot generate: " + "; ".join(problems) + ".")

    def parameters_text(self, model_name: str, width: int, height: int) -> str:
        """The A1111-style ``parameters`` text stored in the PNG and shown under the image."""
        lora = f", Lora: {Path(self.lora).name}, strength_model: {self.strength_model}, " \
               f"strength_clip: {self.strength_clip}" if self.lora else ""
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        skip = f", Clip skip: {self.clip_skip}" if self.clip_skip > 1 else ""
        return (f"{self.prompt}{negative}\nSteps: {self.steps}, Sampler: {self.scheduler}, CFG scale: {self.cfg}, "
                f"Seed: {self.seed}, Size: {width}x{height}, Model: {model_name}{skip}{lora}")


def short(value: object) -> str:
    """A value as a message shows it: a huge number or long text cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}…"


def random_seed() -> int:
    """A fresh seed for the 'random' button."""
    return random.randint(0, 2**32 - 1)


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
    if request.lora is not None and not Path(request.lora).is_file():
        raise UserError(f"LoRA file '{request.lora}' does not exist.")
    fit = attach(pipe, request.lora, LORA_ADAPTER)
    if fit is not None:
        set_strengths(pipe, fit, LORA_ADAPTER, {"unet": request.strength_model, "text_encoder": request.strength_clip})
    image = render(pipe, request, base.display_name, stop)
    if fit is not None:
        image.info["lora"] = fit.line()
    return image


def stopped(stop: threading.Event | None) -> bool:
    """Whether a job's Stop was pressed."""
    return stop is not None and stop.is_set()


class RenderStopped(UserError):
    """A Stop arrived while an image was being sampled: the image was left unfinished and is not returned."""


def render(pipe: StableDiffusionPipeline, request: GenerateRequest, model_name: str,
           stop: threading.Event | None = None) -> Image.Image:
    """Run the pipeline as it is (adapters included) with the request's sampler, seed and size; ``stop`` is
    looked at after every sampling step, so a Stop never waits for a whole image."""
    import diffusers
    import torch

    class_name, extra = SCHEDULERS[request.scheduler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = request.width or size, request.height or size
    generator = torch.Generator("cpu").manual_seed(request.seed)

    def check_stop(pipeline: StableDiffusionPipeline, step: int, timestep: object, values: dict) -> dict:
        if stopped(stop):
            pipeline._interrupt = True  # diffusers' own flag: the remaining steps are skipped
        return values

    with torch.inference_mode():
        embeds = encode_prompts(pipe.text_encoder, pipe.tokenizer, [request.prompt, request.negative_prompt],
                                request.clip_skip)
        image = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=request.steps,
                     guidance_scale=request.cfg, width=width, height=height, generator=generator,
                     callback_on_step_end=check_stop).images[0]
    if stopped(stop):
        raise RenderStopped("Stopped while an image was being rendered; it was left unfinished.")
    image.info["parameters"] = request.parameters_text(model_name, width, height)
    nodes = comfyui.build_graph(request, model_name, width, height)
    image.info["prompt"] = json.dumps(comfyui.api_prompt(nodes))  # the text chunks ComfyUI writes and reads back
    image.info["workflow"] = json.dumps(comfyui.ui_workflow(nodes))
    return image


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


def compare_grid(cache: ModelCache, base: BaseModelSpec, request: GenerateRequest,
                 loras: list[tuple[str, Path]], strengths: list[float], stop: threading.Event | None = None,
                 emit: Callable[[JobEvent], None] | None = None) -> Image.Image:
    """Rows of LoRA files (epochs) by columns of strengths, one seed, labelled axes; one lease for every cell.

    The PNG text describes the grid itself: its rows, its columns and the settings every cell shares.
    """
    if not loras or not strengths:
        raise UserError("Pick at least one LoRA file and one strength for the grid.")
    if len(loras) * len(strengths) > 64:
        raise UserError(f"A {len(loras)}×{len(strengths)} grid is {len(loras) * len(strengths)} images; "
                        "keep it to 64 or fewer.")
    for strength in strengths:
        replace(request, strength_model=strength, strength_clip=strength).validate()
    emit = emit or (lambda event: None)
    total = len(loras) * len(strengths)
    cells: list[list[Image.Image]] = []
    with cache.pipeline(base, "a comparison grid", on_wait=lambda text: emit(JobEvent("status", text)),
                        stop=stop) as pipe:
        view = test_pipeline(cache, pipe)
        for _, path in loras:
            cells.append([])
            for strength in strengths:
                if stopped(stop):
                    raise UserError("Grid stopped before it was complete.")
                cells[-1].append(generate_on(view, base, replace(request, lora=path, strength_model=strength,
                                                                 strength_clip=strength), stop))
                done = sum(len(row) for row in cells)
                emit(JobEvent("progress", f"Rendered {done} of {total} images", step=done, total_steps=total))
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
