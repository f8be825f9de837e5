"""The font of the labels drawn into grid pictures: one that has the characters they use, and never a missing-glyph
box in their place.

Pillow's built-in font has Latin letters only, so arrows, '×' and any prompt in another script came out as boxes.
A system font with a wide range is picked instead (DejaVu Sans on Linux, which the Docker image installs; Arial on
macOS and Windows), and a character that font lacks is drawn as a plain stand-in.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import ImageFont

CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Debian and Ubuntu: fonts-dejavu-core
    "/usr/share/fonts/TTF/DejaVuSans.ttf",  # Arch
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",  # Fedora
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",  # macOS
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
NOTDEF = "\U0010fffd"  # a private-use character no font draws: what a missing glyph looks like in that font
STAND_INS = {"↓": "v", "→": "->", "×": "x", "…": "...", "·": "-", "≈": "~"}  # when even the font has none


@lru_cache(maxsize=8)
def label_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The first wide-ranging font this machine has, at ``size`` pixels; Pillow's own as the last resort."""
    for path in CANDIDATES:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def has_glyph(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, char: str) -> bool:
    """Whether the font draws ``char`` itself rather than its missing-glyph box."""
    if not char.strip():
        return True
    drawn, missing = font.getmask(char), font.getmask(NOTDEF)
    return drawn.size != missing.size or bytes(drawn) != bytes(missing)


def drawable(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> str:
    """``text`` with every character the font lacks replaced by a plain stand-in (or '?'), so no box is drawn."""
    return "".join(char if has_glyph(font, char) else STAND_INS.get(char, "?") for char in text)
