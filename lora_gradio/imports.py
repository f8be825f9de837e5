"""Bring images into a dataset from uploads, zips or a folder: normalised copies, one message per file, one summary.

Captions pair with images by their full path inside the upload, zip or folder (Unicode-normalised, any case), so
``A/001.txt`` and ``B/001.txt`` never trade places; they are decoded by :func:`dataset.decode_caption`.
"""

from __future__ import annotations

import io
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import ImageOps

from .atomic import disk_name, write_bytes_atomic
from .dataset import (
    IMAGE_SUFFIXES,
    REPEAT_FOLDER,
    caption_path,
    decode_caption,
    image_advice,
    image_problem,
    list_images,
    open_image,
    read_caption,
    to_rgb,
    write_caption,
)
from .events import Emit, JobEvent, ignore, progress
from .masks import MASK_SUFFIX, is_mask_file, transparent
from .sources import Entry, FileResult, SkipFile, file_entry, folder_entries, zip_entries, zip_members

MIN_SIDE = 64  # below this an image carries nothing to learn
GOOD_SIDE = 512
KEPT_FORMATS = {"JPEG", "PNG", "WEBP"}
SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}  # made by Finder and Explorer
PREFERRED = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".avif"}  # named in messages; every Pillow format works


@dataclass
class ImportReport:
    """Every file's outcome, the notes that concern the whole import, one summary line, and whether a Stop ended
    it (what was imported before stays)."""

    files: list[FileResult]
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def shown(self) -> list[FileResult]:
        """The rows worth a line each (system files are only counted)."""
        return [r for r in self.files if r.status != "ignored"]

    def summary(self) -> str:
        """'12 images and 10 captions imported from photos.zip; …': what was kept and what was not, in one line."""
        counts = Counter(r.status for r in self.files)
        kept = [r for r in self.files if r.status in ("imported", "warning")]
        captions = sum(1 for r in kept if r.name.lower().endswith(".txt"))
        masks = sum(1 for r in kept if is_mask_file(Path(r.name)))
        images = len(kept) - captions - masks
        also = f", {masks} loss {'mask' if masks == 1 else 'masks'}" if masks else ""
        parts = [f"{images} {'image' if images == 1 else 'images'}{also} and {captions} "
                 f"{'caption' if captions == 1 else 'captions'} imported from {_names(self.sources) or 'nothing'}"]
        if not kept and not counts["skipped"] and not self.stopped:
            parts[0] += f": it holds no image files ({', '.join(sorted(PREFERRED))} and more)"
        if counts["skipped"]:
            parts.append(f"{counts['skipped']} skipped (see each file's reason)")
        if counts["ignored"]:
            kinds = sorted({r.name for r in self.files if r.status == "ignored"})
            parts.append(f"{counts['ignored']} system files ignored ({_names(kinds, 3)})")
        for source, number in Counter(r.source for r in self.files if r.unsafe).items():
            parts.append(f"{source} held {number} unsafe {'entry' if number == 1 else 'entries'} (paths leading "
                         "outside, links), skipped; everything else in it was imported")
        return "; ".join(parts + self.notes) + "."


def _names(names: list[str], limit: int = 2) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def is_system_file(path: PurePosixPath) -> bool:
    """Finder, Explorer and hidden files (``.DS_Store``, ``Thumbs.db``, ``__MACOSX/``, ``._photo.jpg``)."""
    return path.name.lower() in SYSTEM_FILES or any(part.startswith(".") or part == "__MACOSX"
                                                    for part in path.parts)


def pair_key(path: PurePosixPath) -> str:
    """What an image and its caption share: the full path without suffix, NFC, any case (macOS and Windows)."""
    return unicodedata.normalize("NFC", str(path.with_suffix(""))).casefold()


def _target_folder(images_dir: Path, path: PurePosixPath) -> Path:
    """Kohya repeat folders (``10_name/``) are kept; any other folder structure is flattened."""
    parent = path.parent.name
    return images_dir / disk_name(parent) if REPEAT_FOLDER.match(parent) else images_dir


def _unique(target: Path, data: bytes) -> tuple[Path, bool]:
    """A free path for ``data`` (appending ' (2)' etc.), and whether identical bytes are already there."""
    candidate, index = target, 1
    while candidate.exists():
        if candidate.read_bytes() == data:
            return candidate, True
        index += 1
        candidate = target.with_name(f"{target.stem} ({index}){target.suffix}")
    return candidate, False


def _normalised(img, data: bytes, suffix: str) -> tuple[bytes, str, list[str]]:  # noqa: ANN001 - a PIL image
    """The bytes to store: the original when it is a plain RGB JPEG/PNG/WebP, otherwise an RGB PNG, or an RGBA one
    where the picture is transparent (its loss mask, with masked loss)."""
    animated = getattr(img, "n_frames", 1) > 1
    rotated = img.getexif().get(0x0112, 1) not in (0, 1)
    if img.format in KEPT_FORMATS and img.mode == "RGB" and not animated and not rotated:
        return data, suffix, []
    notes = ["EXIF rotation applied"] * rotated + ["first frame of an animation"] * animated
    if img.format not in KEPT_FORMATS:
        notes.append(f"{img.format} stored as PNG")
    alpha = transparent(img)
    if alpha:
        notes.append("transparency kept: with Masked loss on, training learns only the opaque part")
        img.seek(0)
        picture = ImageOps.exif_transpose(img).convert("RGBA")
    else:
        if img.mode != "RGB":
            notes.append(f"{img.mode} converted to RGB")
        picture = to_rgb(img)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue(), ".png", notes


def import_image(data: bytes, path: PurePosixPath, images_dir: Path) -> tuple[FileResult, Path | None]:
    """Check one image and store a normalised copy; returns the outcome and where the image now is (a duplicate's
    existing copy included), for its caption."""
    name = path.name
    if not data:
        return FileResult(name, "skipped", "empty file (0 bytes)"), None
    problem = image_problem(io.BytesIO(data))
    if problem:
        return FileResult(name, "skipped", problem), None
    mask = is_mask_file(Path(name))
    with open_image(io.BytesIO(data)) as img:
        width, height = img.size
        if min(width, height) < MIN_SIDE and not mask:
            return FileResult(name, "skipped", f"too small ({width}×{height}): use images at least {GOOD_SIDE} px "
                                               "on the short side"), None
        if img.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
        payload, suffix, notes = _normalised(img, data, Path(name).suffix.lower())
    with open_image(io.BytesIO(data)) as img:
        advice = [] if mask else image_advice(img)
    wanted = disk_name(Path(unicodedata.normalize("NFC", name)).stem + suffix, "image")
    if Path(wanted).stem != Path(unicodedata.normalize("NFC", name)).stem:
        notes.append(f"stored as '{wanted}' (the name had characters a file name cannot hold, or was too long)")
    folder = _target_folder(images_dir, path)
    folder.mkdir(parents=True, exist_ok=True)
    target, duplicate = _unique(folder / wanted, payload)
    if duplicate:
        return FileResult(name, "skipped", f"already in the dataset as {target.name}"), target
    write_bytes_atomic(target, payload)
    if mask:
        return FileResult(target.name, "imported", f"loss mask of {Path(name).name[:-len(MASK_SUFFIX)]}.*"), None
    if min(width, height) < GOOD_SIDE:
        advice.insert(0, f"small ({width}×{height}): under {GOOD_SIDE} px on the short side, it will be upscaled "
                         "and look soft")
    status = "warning" if advice else "imported"
    return FileResult(target.name, status, "; ".join(advice + notes) or f"{width}×{height}"), target


def import_caption(data: bytes, name: str, image: Path) -> FileResult:
    """Decode a caption and store it beside its image, unless that image already has another caption."""
    text, notes = decode_caption(data)
    existing = read_caption(image)
    if existing and existing != text:
        return FileResult(name, "skipped", f"{image.name} already has a different caption; kept it (edit it in the "
                                           "Caption tab)")
    write_caption(image, text)
    message = "; ".join([f"caption for {image.name}", *notes])
    return FileResult(caption_path(image).name, "warning" if notes else "imported", message)


@dataclass
class ImportJob:
    """Where an import goes and how it is watched: the dataset's images folder, the server's cap on images, who
    hears its progress, and the Stop that ends it between two files."""

    images_dir: Path
    max_images: int | None = None
    emit: Emit = ignore
    stop: threading.Event | None = None


def import_entries(entries: Iterable[Entry | FileResult], job: ImportJob, sources: list[str], total: int,
                   ) -> ImportReport:
    """Import images first, then attach each ``.txt`` caption to the image at the same path; past ``max_images``
    in the dataset, images are refused. Captions are read as they come (a zip is open only while it is walked).
    ``total`` is how many entries are expected, for the progress."""
    images_dir, max_images = job.images_dir, job.max_images
    images_dir.mkdir(parents=True, exist_ok=True)
    results: list[FileResult] = []
    captions: list[tuple[Entry, bytes]] = []
    stored: dict[str, Path] = {}
    room = max_images - len(list_images(images_dir)) if max_images is not None else None
    notes, stopped = [], False
    for index, entry in enumerate(entries):
        if job.stop is not None and job.stop.is_set():
            stopped = True
            notes.append(f"stopped after {index} of {max(total, index)} files; what was imported stays")
            job.emit(JobEvent("stopped", f"Import stopped after {index} of {max(total, index)} files."))
            break
        progress(job.emit, "Read {} of {} files", index + 1, max(total, index + 1))
        if isinstance(entry, FileResult):
            results.append(entry)
            continue
        result = _import_entry(entry, images_dir, room, max_images, captions, stored)
        if result is not None:
            result.source = entry.source
            results.append(result)
            if room is not None and result.status in ("imported", "warning"):
                room -= 1
    for entry, data in captions:
        image = stored.get(pair_key(entry.path))
        if image is None:
            results.append(FileResult(entry.path.name, "skipped", "caption without an image at the same path "
                                                                  f"({entry.path.with_suffix('')}.*)", entry.source))
            continue
        try:
            result = import_caption(data, entry.path.name, image)
        except OSError as exc:
            result = FileResult(entry.path.name, "skipped", f"could not be stored ({exc.strerror or exc})")
        result.source = entry.source
        results.append(result)
    zero = sorted({p.parent.name for p in list_images(images_dir) if p.parent != images_dir
                   and REPEAT_FOLDER.match(p.parent.name) and REPEAT_FOLDER.match(p.parent.name).group(1) == "0"})
    notes += [f"folder '{name}' asks for 0 repeats, so its images train once per epoch: rename it to "
              f"'1_{REPEAT_FOLDER.match(name).group(2)}' or more" for name in zero]
    return ImportReport(results, sources, notes, stopped)


def _import_entry(entry: Entry, images_dir: Path, room: int | None, max_images: int | None,
                  captions: list[tuple[Entry, bytes]], stored: dict[str, Path]) -> FileResult | None:
    """One entry: a system file is ignored, a caption is read and kept for later, an image is imported."""
    if ".." in PurePosixPath(str(entry.path).replace("\\", "/")).parts:  # a name like ..\..\x.png climbs out
        return FileResult(entry.path.name, "skipped", "unsafe path (it leads outside the dataset); refused",
                          unsafe=True)
    if is_system_file(entry.path):
        return FileResult(entry.path.name, "ignored", "system file")
    suffix = entry.path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES | {".txt"}:
        return FileResult(entry.path.name, "skipped", f"not an image type ({suffix or 'no extension'}); images: "
                                                      f"{', '.join(sorted(PREFERRED))} and every format Pillow reads")
    if suffix != ".txt" and room is not None and room <= 0:
        return FileResult(entry.path.name, "skipped", f"the dataset is full: {max_images} images is this server's "
                                                      "limit per dataset")
    try:
        data = entry.read()
        if suffix == ".txt":
            captions.append((entry, data))
            return None
        result, target = import_image(data, entry.path, images_dir)
    except SkipFile as exc:
        return FileResult(entry.path.name, "skipped", str(exc))
    except OSError as exc:  # a full disk, a name the file system refuses: this file only
        return FileResult(entry.path.name, "skipped", f"could not be stored ({exc.strerror or exc})")
    if target is not None:
        stored[pair_key(entry.path)] = target
    return result


def import_folder(folder: Path, images_dir: Path, max_images: int | None = None, emit: Emit = ignore,
                  stop: threading.Event | None = None) -> ImportReport:
    """Import a folder on the server into a dataset."""
    entries = list(folder_entries(folder))  # each entry opens its file only when read
    return import_entries(entries, ImportJob(images_dir, max_images, emit, stop), [Path(folder).name or str(folder)],
                          len(entries))


def import_sources(paths: Iterable[Path], images_dir: Path, max_images: int | None = None, emit: Emit = ignore,
                   stop: threading.Event | None = None) -> ImportReport:
    """Import uploads of any mix: images, ``.txt`` captions, and zips."""
    paths = [Path(p) for p in paths]
    loose = [p for p in paths if p.suffix.lower() != ".zip"]
    sources = [loose[0].name if len(loose) == 1 else f"{len(loose)} files"] if loose else []
    sources += [p.name for p in paths if p.suffix.lower() == ".zip"]

    def expand() -> Iterator[Entry | FileResult]:
        for path in paths:
            if path.suffix.lower() == ".zip":
                yield from zip_entries(path)
            else:
                yield file_entry(path, PurePosixPath(path.name), "the upload")

    total = sum(zip_members(p) if p.suffix.lower() == ".zip" else 1 for p in paths)
    return import_entries(expand(), ImportJob(images_dir, max_images, emit, stop), sources, total)
