"""Read a demo picture back: the background's colour, the shape's colour and which shape, so that tests and the
quality benchmark judge what a model draws rather than that it wrote a file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import PALETTE, SIDE

BORDER = 3  # pixels at the edge that are taken as background: drawn shapes keep 2 px away from it
MIN_SHAPE = 0.01  # a shape covers at least this share of the picture, else none is drawn
SQUARE_FILL = 0.855  # area ÷ bounding box: square 0.88–1.0, circle 0.73–0.83, triangle 0.49–0.56
CIRCLE_FILL = 0.64
RING_HOLE = 0.1  # enclosed background ÷ the shape's area: a drawn ring's hole is a third or more
ONE_PIECE = 0.75  # the largest connected part holds at least this share of the shape's colour, else it is scattered


@dataclass(frozen=True)
class Reading:
    """What a picture shows; ``shape`` is None when nothing stands out from the background, or only scattered
    blots of a colour do."""

    background: str
    colour: str | None
    shape: str | None
    coverage: float  # the share of the picture the shape covers

    def matches(self, colour: str, shape: str, background: str) -> dict[str, bool]:
        """Which of colour, shape and background agree with a prompt."""
        return {"colour": self.colour == colour, "shape": self.shape == shape,
                "background": self.background == background}


def colour_names(pixels: np.ndarray) -> np.ndarray:
    """The index in PALETTE of the nearest colour, for every pixel of an (…, 3) array."""
    palette = np.array(list(PALETTE.values()), dtype=np.float32)
    distances = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return distances.argmin(-1)


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (a flood fill from every unvisited pixel)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        region, stack = [], [start]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    part = np.zeros_like(mask)
    if best:
        part[tuple(np.array(best).T)] = True
    return part


def hole_share(mask: np.ndarray) -> float:
    """How much of the shape's area is background enclosed by it (a ring's hole), from its bounding box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    outside = np.pad(~box, 1, constant_values=True)  # a frame of background around the box joins the outside
    enclosed = outside & ~largest_part(outside)
    return float(enclosed[1:-1, 1:-1].sum()) / len(xs)


def classify_shape(mask: np.ndarray) -> str:
    """Ring, square, circle or triangle: from the background it encloses, then from how it fills its bounding box."""
    if hole_share(mask) >= RING_HOLE:
        return "ring"
    ys, xs = np.nonzero(mask)
    fill = len(xs) / float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    if fill >= SQUARE_FILL:
        return "square"
    return "circle" if fill >= CIRCLE_FILL else "triangle"


def read_picture(image: Image.Image) -> Reading:
    """Name the background (the edge's commonest colour), the shape's colour (the commonest other colour) and the
    shape drawn in it."""
    pixels = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR))
    names = colour_names(pixels)
    edge = np.concatenate([names[:BORDER].ravel(), names[-BORDER:].ravel(),
                           names[:, :BORDER].ravel(), names[:, -BORDER:].ravel()])
    background = int(np.bincount(edge, minlength=len(PALETTE)).argmax())
    inside = names[BORDER:-BORDER, BORDER:-BORDER]
    counts = np.bincount(inside.ravel(), minlength=len(PALETTE))
    counts[background] = 0
    colour = int(counts.argmax())
    palette = list(PALETTE)
    coverage = counts[colour] / names.size
    if coverage < MIN_SHAPE:
        return Reading(palette[background], None, None, float(coverage))
    mask = names == colour
    part = largest_part(mask)
    shape = classify_shape(part) if part.sum() >= ONE_PIECE * mask.sum() else None  # blots are no shape
    return Reading(palette[background], palette[colour], shape, float(coverage))
