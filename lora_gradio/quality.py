"""The dataset quality report: the well-known advice as checks, thumbnails, and removing what it flags."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import imagehash

from .atomic import write_bytes_atomic
from .buckets import make_buckets, pick_bucket
from .dataset import (
    REPEAT_FOLDER,
    caption_path,
    image_advice,
    image_problem,
    list_images,
    open_image,
    read_caption,
    to_rgb,
)
from .masks import mask_file, mask_source, open_mask, shade_ignored

SWEET_SPOT = (40, 50)
TOO_FEW, TOO_MANY = 15, 200
GOOD_SIDE = 512
DUPLICATE_DISTANCE = 6  # of 64 perceptual-hash bits
THUMB_SIZE = 256
OK, WARN, ERROR = "ok", "warning", "error"


@dataclass
class Check:
    """One line of the report."""

    level: str
    title: str
    detail: str = ""


@dataclass
class QualityReport:
    """All checks, and the problems of each image by file name."""

    checks: list[Check]
    per_image: dict[str, list[str]] = field(default_factory=dict)
    masked: set[str] = field(default_factory=set)  # the images with a loss mask

    def markdown(self) -> str:
        """The report as a short Markdown list with a symbol per level."""
        symbol = {OK: "✅", WARN: "⚠️", ERROR: "❌"}
        return "\n".join(f"- {symbol[c.level]} **{c.title}**" + (f": {c.detail}" if c.detail else "")
                         for c in self.checks)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _names(paths: list[str], limit: int = 6) -> str:
    return ", ".join(paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _hash(path: Path) -> imagehash.ImageHash:
    """Perceptual hash: near-identical photos (re-saves, small crops) land a few bits apart."""
    return _hash_of(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4096)
def _hash_of(path: str, _mtime_ns: int) -> imagehash.ImageHash:
    """Cached by file and modification time, so refreshing the report does not decode every photo again."""
    import imagehash

    with open_image(Path(path)) as img:
        img.draft("RGB", (256, 256))  # JPEGs decode at a fraction of full size
        return imagehash.phash(img.convert("RGB"))


def _advice(path: Path) -> list[str]:
    return _advice_of(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=4096)
def _advice_of(path: str, _mtime_ns: int) -> list[str]:
    """Blank and panorama checks, cached like the hashes: they decode a small version of each image."""
    with open_image(Path(path)) as img:
        return image_advice(img)


def check_dataset(images_dir: Path) -> QualityReport:
    """Count, size, aspect-ratio spread, near-duplicates, corrupt files and captions, each as a check."""
    images = list_images(images_dir)
    per_image: dict[str, list[str]] = {}
    checks = []
    count = len(images)
    if count < TOO_FEW:
        checks.append(Check(WARN, _count(count, "image"), f"under {TOO_FEW} gives weak, overfit LoRAs; "
                                                     f"{SWEET_SPOT[0]}–{SWEET_SPOT[1]} is the sweet spot"))
    elif count > TOO_MANY:
        checks.append(Check(WARN, _count(count, "image"), f"over {TOO_MANY} mostly adds training time; "
                                                     f"{SWEET_SPOT[0]}–{SWEET_SPOT[1]} well-chosen images do better"))
    else:
        sweet = SWEET_SPOT[0] <= count <= SWEET_SPOT[1]
        checks.append(Check(OK, _count(count, "image"), "in the 40–50 sweet spot" if sweet else
                            f"fine ({SWEET_SPOT[0]}–{SWEET_SPOT[1]} is the sweet spot)"))

    sizes, corrupt, small = {}, [], []
    for path in images:
        name = str(path.relative_to(images_dir))
        problem = image_problem(path)
        if problem:
            corrupt.append(name)
            per_image[name] = [problem]
            continue
        with open_image(path) as img:
            sizes[path] = img.size
        if min(sizes[path]) < GOOD_SIDE:
            small.append(name)
            per_image.setdefault(name, []).append(f"small: {sizes[path][0]}×{sizes[path][1]}")
    checks.append(Check(ERROR, _count(len(corrupt), "corrupt file"), _names(corrupt)) if corrupt
                  else Check(OK, "All files decode"))
    checks.append(Check(WARN, _count(len(small), "image") + f" under {GOOD_SIDE} px on the short side",
                        _names(small) + ". They will look soft; replace them with larger ones.") if small
                  else Check(OK, f"All images at least {GOOD_SIDE} px on the short side"))

    if sizes:
        shapes = Counter("portrait" if h > w * 1.1 else "landscape" if w > h * 1.1 else "square"
                         for w, h in sizes.values())
        candidates = make_buckets(GOOD_SIDE)
        buckets = Counter(pick_bucket(s, candidates) for s in sizes.values())
        spread = ", ".join(f"{n} {kind}" for kind, n in shapes.most_common())
        lonely = sum(1 for n in buckets.values() if n == 1)
        detail = f"{spread}; {len(buckets)} aspect-ratio buckets"
        if lonely > 2:
            checks.append(Check(WARN, "Aspect ratios", f"{detail}, {lonely} holding a single image (batches of 1)"))
        else:
            checks.append(Check(OK, "Aspect ratios", detail))

        hashes = {p: _hash(p) for p in sizes}
        paths = list(hashes)
        pairs = [(a, b) for i, a in enumerate(paths) for b in paths[i + 1:]
                 if hashes[a] - hashes[b] <= DUPLICATE_DISTANCE]
        for a, b in pairs:
            for one, other in ((a, b), (b, a)):
                per_image.setdefault(str(one.relative_to(images_dir)), []).append(f"near-duplicate of {other.name}")
        checks.append(Check(WARN, _count(len(pairs), "near-duplicate pair"), _names(
            [f"{a.name} ≈ {b.name}" for a, b in pairs]) + ". Keep the better one of each.") if pairs
                      else Check(OK, "No near-duplicates"))

        useless = []
        for path in sizes:
            advice = _advice(path)
            if advice:
                useless.append(path.name)
                per_image.setdefault(str(path.relative_to(images_dir)), []).extend(advice)
        checks.append(Check(WARN, _count(len(useless), "image") + " with little to learn (blank or extreme shape)",
                            _names(useless) + ". Remove or crop them.") if useless
                      else Check(OK, "No blank or panorama images"))

    folders = repeat_folders(images_dir, images)
    if folders:
        per_epoch = sum(max(folders.get(p.parent.name, (1, ""))[0], 1) for p in images)
        checks.append(Check(OK, "Repeats", "; ".join(
            f"{name}: ×{repeats} ({_count(sum(1 for p in images if p.parent.name == name), 'image')})"
            for name, (repeats, _) in folders.items()) + f"; {per_epoch} images per epoch"))
    uncaptioned = [p for p in images if not read_caption(p)]
    by_folder = [p for p in uncaptioned if p.parent.name in folders]
    if by_folder:
        checks.append(Check(OK, _count(len(by_folder), "image") + " captioned by their folder's name", ", ".join(
            sorted({f"'{folders[p.parent.name][1]}' ({p.parent.name})" for p in by_folder}))))
    rest = [str(p.relative_to(images_dir)) for p in uncaptioned if p.parent.name not in folders]
    checks.append(Check(WARN, _count(len(rest), "image") + " without a caption",
                        "caption them in the Caption tab") if rest else Check(OK, "Every image has a caption"))
    masked = {str(p.relative_to(images_dir)) for p in sizes if mask_source(p) is not None}
    if masked:
        checks.append(Check(OK, f"Loss masks on {len(masked)} of {_count(len(sizes), 'image')}", (
            "transparency or a name.mask.png; with Masked loss on (Train tab, Images and captions) training learns "
            "only what they keep. The thumbnails darken what they leave out.")))
    return QualityReport(checks, per_image, masked)


def repeat_folders(images_dir: Path, images: list[Path]) -> dict[str, tuple[int, str]]:
    """Kohya ``N_words`` subfolders holding images: their repeats and the words that caption their images."""
    found = {}
    for path in images:
        match = REPEAT_FOLDER.match(path.parent.name) if path.parent != images_dir else None
        if match:
            found[path.parent.name] = (int(match.group(1)), match.group(2))
    return dict(sorted(found.items()))


def thumbnail(path: Path, images_dir: Path) -> Path:
    """A small JPEG beside the dataset (``.thumbs/``), so the gallery never ships full-size photos to the browser;
    with a loss mask, the part it leaves out darkened."""
    relative = path.relative_to(images_dir)
    thumb = images_dir / ".thumbs" / relative.with_suffix(".jpg")
    made = [source.stat().st_mtime for source in (path, mask_file(path)) if source.is_file()]
    if thumb.is_file() and thumb.stat().st_mtime >= max(made):
        return thumb
    thumb.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_image(path) as img:
            img.draft("RGB", (THUMB_SIZE * 2, THUMB_SIZE * 2))
            small = to_rgb(img)
        if (source := mask_source(path)) is not None and image_problem(source) is None:
            small = shade_ignored(small, open_mask(source))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        small = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (90, 20, 20))  # a visible placeholder for a bad file
    small.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    write_bytes_atomic(thumb, buffer.getvalue())
    return thumb


def remove_images(images_dir: Path, names: list[str]) -> list[str]:
    """Delete images (and their captions and thumbnails) from a dataset; names must be inside it."""
    removed = []
    for name in names:
        path = (images_dir / name).resolve()
        if images_dir.resolve() not in path.parents or not path.is_file():
            continue
        for extra in (caption_path(path), mask_file(path), images_dir / ".thumbs" / Path(name).with_suffix(".jpg")):
            extra.unlink(missing_ok=True)
        path.unlink()
        removed.append(name)
    return removed
