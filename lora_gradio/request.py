"""What one image is made with, and the samplers it may name: a leaf that generation, the ComfyUI hand-off, the
training settings and the UI all import, so the sampler names exist once."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .errors import UserError


class Sampler(NamedTuple):
    """One sampler as A1111 and ComfyUI users name it: the diffusers scheduler that runs it, and ComfyUI's names."""

    diffusers_class: str
    diffusers_config: dict[str, Any]
    comfyui_sampler: str
    comfyui_scheduler: str


SAMPLERS = {
    "Euler": Sampler("EulerDiscreteScheduler", {}, "euler", "normal"),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", "normal"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++",
                                                               "use_karras_sigmas": True}, "dpmpp_2m", "karras"),
    "DDIM": Sampler("DDIMScheduler", {}, "ddim", "ddim_uniform"),
}
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]  # for the training settings' validation


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
                  (self.scheduler in SAMPLERS, f"scheduler '{self.scheduler}': use one of {', '.join(SAMPLERS)}"),
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
