"""Score what the demo base or a LoRA on it draws: render prompts through the app's own generation path and read
every picture back. The quality benchmark and the learning tests share it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .shapes import BASE_SHAPES, CONCEPT, DEMO_TRIGGER, PALETTE
from .vision import read_picture

if TYPE_CHECKING:
    from PIL import Image

    from ..cache import ModelCache

@dataclass(frozen=True)
class Case:
    """One prompt: a shape of one colour on a background of another."""

    colour: str
    shape: str
    background: str

    def prompt(self, trigger: str | None = None) -> str:
        """The caption wording the model learnt; with a trigger word, the demo dataset's wording."""
        if trigger:
            return f"{trigger}, a {self.colour} {trigger} on a {self.background} background"
        return f"a {self.colour} {self.shape} on a {self.background} background"


def other_colour(colour: str, turn: int) -> str:
    """A background for ``colour``: the palette's ``turn``-th other colour, so prompts cover every pairing."""
    others = [name for name in PALETTE if name != colour]
    return others[turn % len(others)]


def base_cases() -> list[Case]:
    """Every colour × shape the base knows, each on a different background."""
    return [Case(colour, shape, other_colour(colour, 3 * i + j))
            for i, colour in enumerate(PALETTE) for j, shape in enumerate(BASE_SHAPES)]


def concept_cases() -> list[Case]:
    """The demo concept in every colour, each on a different background."""
    return [Case(colour, CONCEPT, other_colour(colour, 2 * i + 1)) for i, colour in enumerate(PALETTE)]


@dataclass
class Score:
    """How many pictures showed the prompt's colour, shape and background (and how many showed the concept)."""

    pictures: int = 0
    colour: int = 0
    shape: int = 0
    background: int = 0
    concept: int = 0

    def share(self, what: str) -> float:
        """The fraction of pictures right on ``what``."""
        return getattr(self, what) / max(self.pictures, 1)

    def line(self) -> str:
        """The shares as percentages, for a table row."""
        return " | ".join(f"{100 * self.share(w):.0f}%" for w in ("colour", "shape", "background", "concept"))


def render_cases(cache: ModelCache, cases: list[Case], seeds: list[int], lora: Path | None = None,
                 strength: float = 1.0, trigger: str | None = None) -> list[Image.Image]:
    """Pictures of every case at every seed, from the demo base with ``lora`` at ``strength`` (model and clip)."""
    from ..inference import attach_strengths, render_batches, test_pipeline
    from ..models import DEMO, resolve_base
    from ..request import GenerateRequest

    base = resolve_base(DEMO)
    request = GenerateRequest("", lora=lora, strength_model=strength, strength_clip=strength)  # the Test tab's defaults
    with cache.pipeline(base, "the demo read-out") as pipe:
        view = test_pipeline(cache, pipe)
        attach_strengths(view, request)
        return render_batches(view, [replace(request, prompt=case.prompt(trigger), seed=seed)
                                     for case in cases for seed in seeds], base.display_name)


def score(cases: list[Case], seeds: list[int], pictures: list[Image.Image]) -> Score:
    """Read every picture (in render_cases' order) against its case."""
    result = Score()
    for index, picture in enumerate(pictures):
        case = cases[index // len(seeds)]
        reading = read_picture(picture)
        result.pictures += 1
        for what, right in reading.matches(case.colour, case.shape, case.background).items():
            setattr(result, what, getattr(result, what) + right)
        result.concept += reading.shape == CONCEPT
    return result


def judge(cache: ModelCache, cases: list[Case], seeds: list[int], lora: Path | None = None, strength: float = 1.0,
          trigger: str | None = DEMO_TRIGGER) -> Score:
    """Render and read in one go."""
    return score(cases, seeds, render_cases(cache, cases, seeds, lora, strength, trigger))
