"""Aspect-ratio buckets: every image trains near its own shape instead of being cropped square."""

from __future__ import annotations

import math

from PIL import Image

BUCKET_STEP = 64  # SD1.x latents must be a multiple of 8, i.e. 64 px for a UNet with three downsamples.


def make_buckets(resolution: int, enabled: bool = True) -> list[tuple[int, int]]:
    """(width, height) buckets of at most resolution² pixels, sides from resolution/2 to 2x resolution."""
    if not enabled or resolution < 4 * BUCKET_STEP:
        return [(resolution, resolution)]
    lo, hi, area = resolution // 2, resolution * 2, resolution * resolution
    buckets = set()
    for width in range(lo, hi + 1, BUCKET_STEP):
        height = min(hi, area // width // BUCKET_STEP * BUCKET_STEP)
        if height >= lo:
            buckets.add((width, height))
    return sorted(buckets)


def pick_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared in log space, so 2:1 and 1:2 weigh alike)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize to cover the bucket, then centre-crop the small overhang."""
    width, height = bucket
    scale = max(width / img.width, height / img.height)
    resized = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
