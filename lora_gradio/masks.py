"""Loss masks: which parts of a training image the LoRA learns from when ``masked_loss`` is on. A mask is a grey
picture ``name.mask.png`` beside the image, or else the image's own alpha channel; white is learnt, black ignored,
grey counts partly."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps

MASK_SUFFIX = ".mask.png"
SHADE = (20, 20, 20)  # what a thumbnail shows over the ignored part, at MASK_SHADE opacity
MASK_SHADE = 0.75


def mask_file(image: Path) -> Path:
    """Where an image's own mask picture lives: ``photo.jpg`` -> ``photo.mask.png``."""
    return image.with_name(image.stem + MASK_SUFFIX)


def is_mask_file(path: Path) -> bool:
    """Whether a file is a mask picture (never trained on as an image)."""
    return path.name.lower().endswith(MASK_SUFFIX)


def transparent(img: Image.Image) -> bool:
    """Whether an image has an alpha channel with any pixel less than opaque."""
    if img.mode not in ("RGBA", "LA", "PA") and not (img.mode == "P" and "transparency" in img.info):
        return False
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def mask_source(image: Path) -> Path | None:
    """The file an image's mask comes from: its mask picture, else the image itself where it is transparent; None
    where it has neither (all of it is learnt)."""
    if mask_file(image).is_file():
        return mask_file(image)
    try:
        return image if transparent_file(str(image), image.stat().st_mtime_ns) else None
    except OSError:
        return None


@lru_cache(maxsize=4096)
def transparent_file(path: str, _mtime_ns: int) -> bool:
    """Whether an image file is transparent, cached by path and modification time: the report, the thumbnails and
    every run ask, and the answer decodes the whole alpha channel."""
    try:
        with Image.open(path) as img:  # Pillow's pixel limit (set with the dataset's) guards it
            return transparent(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def open_mask(source: Path) -> Image.Image:
    """A mask as a greyscale picture, turned by its EXIF like the image."""
    with Image.open(source) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        mask = img.convert("L") if is_mask_file(source) else img.convert("RGBA").getchannel("A")
    return mask


def shade_ignored(picture: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture with the part the mask ignores darkened, as the Dataset tab shows a masked image."""
    mask = mask.resize(picture.size, Image.Resampling.BILINEAR) if mask.size != picture.size else mask
    shade = Image.new("RGB", picture.size, SHADE)
    ignored = ImageOps.invert(mask).point(lambda value: round(value * MASK_SHADE))
    return Image.composite(shade, picture.convert("RGB"), ignored)
