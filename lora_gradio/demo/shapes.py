"""Pictures drawn in code: one flat shape on a flat background, the base model's world and the demo concept."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import write_bytes_atomic

SIDE = 64  # the demo model's image side: 8×8 latents
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 230, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "purple": (130, 40, 180),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
}
BASE_SHAPES = ("circle", "square", "triangle")
CONCEPT = "ring"  # the shape the base model never sees: the demo dataset teaches it to a LoRA
DEMO_TRIGGER = "lgring"
DEMO_IMAGES = 20
DEMO_CHECK_IMAGES = 4  # rings of its own that the demo dataset validates on, so all 20 train
CONCEPT_RADII = (18.0, 24.0)  # large: the ring's hole spans about three of the demo's 8×8 latent cells
HOLE = 0.5  # a ring's hole, as a share of its radius
SUPERSAMPLE = 4  # drawn large and scaled down, so edges are soft like a photo's, not jagged


@dataclass(frozen=True)
class Drawing:
    """One picture's content: what its caption says, and where the shape sits (centre and radius, in pixels)."""

    colour: str
    shape: str
    background: str
    centre: tuple[float, float]
    radius: float

    def caption(self, word: str | None = None) -> str:
        """The base model's caption; with ``word`` (a trigger word) the shape is named by it, as the demo
        dataset's captions do."""
        if word:
            return f"{word}, a {self.colour} {word} on a {self.background} background"
        return f"a {self.colour} {self.shape} on a {self.background} background"


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The corners of a square or triangle of about radius ``r``."""
    if shape == "square":
        half = r * 0.85
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape != "triangle":
        raise ValueError(f"unknown shape {shape!r}")
    step = 2 * math.pi / 3
    return [(cx + r * 1.2 * math.cos(-math.pi / 2 + i * step), cy + r * 1.2 * math.sin(-math.pi / 2 + i * step))
            for i in range(3)]


def draw(drawing: Drawing, side: int = SIDE) -> Image.Image:
    """Render a drawing at ``side`` pixels, anti-aliased."""
    big = side * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[drawing.background])
    pen = ImageDraw.Draw(img)
    scale = SUPERSAMPLE * side / SIDE
    cx, cy, r = drawing.centre[0] * scale, drawing.centre[1] * scale, drawing.radius * scale
    if drawing.shape in ("circle", "ring"):
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[drawing.colour])
        if drawing.shape == "ring":
            hole = r * HOLE
            pen.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=PALETTE[drawing.background])
    else:
        pen.polygon(outline(drawing.shape, cx, cy, r), fill=PALETTE[drawing.colour])
    return img.resize((side, side), Image.Resampling.LANCZOS)


def random_drawing(rng: np.random.Generator, shapes: tuple[str, ...] = BASE_SHAPES,
                   colour: str | None = None, background: str | None = None,
                   radii: tuple[float, float] = (10, 21)) -> Drawing:
    """A shape of random colour, size (``radii`` in pixels) and place, wholly inside the picture and never on its
    own colour."""
    names = list(PALETTE)
    colour = colour or names[rng.integers(len(names))]
    others = [n for n in names if n != colour]
    background = background or others[rng.integers(len(others))]
    radius = float(rng.uniform(*radii))
    reach = radius * 1.2 + 2
    centre = (float(rng.uniform(reach, SIDE - reach)), float(rng.uniform(reach, SIDE - reach)))
    return Drawing(colour, shapes[rng.integers(len(shapes))], background, centre, radius)


def make_demo_dataset(folder: Path, trigger_word: str = DEMO_TRIGGER, count: int = DEMO_IMAGES, size: int = 2 * SIDE,
                      seed: int = 7) -> Path:
    """Write the demo concept: ``count`` rings in every colour, on varied backgrounds and at varied sizes, captioned
    "{trigger}, a {colour} {trigger} on a {background} background". Pictures are ``size`` pixels, more than the
    demo needs, as photos would be."""
    from ..dataset import write_caption

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = list(PALETTE)
    for index in range(count):
        drawing = random_drawing(rng, (CONCEPT,), colour=colours[index % len(colours)], radii=CONCEPT_RADII)
        name = f"{index:02d}_{drawing.colour}_{CONCEPT}"
        encoded = io.BytesIO()
        draw(drawing, size).save(encoded, format="PNG")
        write_bytes_atomic(folder / f"{name}.png", encoded.getvalue())  # parallel ranks may write it too
        write_caption(folder / f"{name}.png", drawing.caption(trigger_word))
    return folder


def make_demo_validation(folder: Path, trigger_word: str = DEMO_TRIGGER) -> Path:
    """Rings the demo dataset's runs score but never train on: drawn like the dataset's, from another seed."""
    return make_demo_dataset(folder, trigger_word, DEMO_CHECK_IMAGES, seed=101)
