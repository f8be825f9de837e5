"""Bring images into a dataset from uploads, zips or a folder: normalised copies, one message per file."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .atomic import write_bytes_atomic
from .dataset import IMAGE_SUFFIXES, REPEAT_FOLDER, image_problem, list_images, open_image, to_rgb, write_caption

MAX_FILE_BYTES = 100 * 2**20  # one image, packed or unpacked
MAX_ZIP_BYTES = 4 * 2**30  # everything a zip may unpack to
MAX_CAPTION_BYTES = 64 * 2**10
MIN_SIDE = 64  # below this an image carries nothing to learn
GOOD_SIDE = 512
KEPT_FORMATS = {"JPEG", "PNG", "WEBP"}
UNSAFE_CHARS = re.compile(r'[\x00-\x1f<>:"/\\|?*]')


@dataclass
class FileResult:
    """The outcome for one file: ``imported``, ``warning`` (imported, with advice) or ``skipped``."""

    name: str
    status: str
    message: str


@dataclass
class Entry:
    """A file to import: its path inside the upload/zip/folder, and how to read it (bounded)."""

    path: PurePosixPath
    read: Callable[[], bytes]


def safe_name(name: str) -> str:
    """A file name with path separators and control characters removed; unicode and spaces are kept."""
    cleaned = UNSAFE_CHARS.sub("_", name).strip(" .")
    return cleaned or "image"


def _target_folder(images_dir: Path, path: PurePosixPath) -> Path:
    """Kohya repeat folders (``10_name/``) are kept; any other folder structure is flattened."""
    parent = path.parent.name
    return images_dir / safe_name(parent) if REPEAT_FOLDER.match(parent) else images_dir


def _unique(target: Path, data: bytes) -> tuple[Path, bool]:
    """A free path for ``data`` (appending ' (2)' etc.), and whether identical bytes are already there."""
    candidate, index = target, 1
    while candidate.exists():
        if candidate.read_bytes() == data:
            return candidate, True
        index += 1
        candidate = target.with_name(f"{target.stem} ({index}){target.suffix}")
    return candidate, False


def import_image(data: bytes, path: PurePosixPath, images_dir: Path) -> FileResult:
    """Check one image and store a normalised copy, keeping the original bytes when nothing needed changing."""
    name = path.name
    if not data:
        return FileResult(name, "skipped", "empty file (0 bytes)")
    problem = image_problem(io.BytesIO(data))
    if problem:
        return FileResult(name, "skipped", problem)
    with open_image(io.BytesIO(data)) as img:
        width, height = img.size
        animated = getattr(img, "n_frames", 1) > 1
        rotated = img.getexif().get(0x0112, 1) not in (0, 1)
        if min(width, height) < MIN_SIDE:
            return FileResult(name, "skipped", f"too small ({width}×{height}): use images at least {GOOD_SIDE} px "
                                               "on the short side")
        notes = []
        if img.format in KEPT_FORMATS and img.mode == "RGB" and not animated and not rotated:
            payload, suffix = data, Path(name).suffix.lower()
        else:
            notes += ["EXIF rotation applied"] * rotated + ["first frame of an animation"] * animated
            if img.mode != "RGB":
                notes.append(f"{img.mode} converted to RGB")
            buffer = io.BytesIO()
            to_rgb(img).save(buffer, format="PNG")
            payload, suffix = buffer.getvalue(), ".png"
    folder = _target_folder(images_dir, path)
    folder.mkdir(parents=True, exist_ok=True)
    target, duplicate = _unique(folder / (safe_name(Path(name).stem) + suffix), payload)
    if duplicate:
        return FileResult(name, "skipped", f"already in the dataset as {target.name}")
    write_bytes_atomic(target, payload)
    if rotated:
        width, height = height, width
    if min(width, height) < GOOD_SIDE:
        return FileResult(target.name, "warning", f"small ({width}×{height}): under {GOOD_SIDE} px on the short "
                                                  "side, it will be upscaled and look soft")
    return FileResult(target.name, "imported", "; ".join(notes) or f"{width}×{height}")


def import_entries(entries: Iterable[Entry | FileResult], images_dir: Path,
                   max_images: int | None = None) -> list[FileResult]:
    """Import images first, then attach ``.txt`` captions to the images of the same name; past ``max_images`` in
    the dataset, images are refused."""
    images_dir.mkdir(parents=True, exist_ok=True)
    results, captions, stored = [], [], {}
    room = max_images - len(list_images(images_dir)) if max_images is not None else None
    for entry in entries:
        if isinstance(entry, FileResult):
            results.append(entry)
            continue
        suffix = entry.path.suffix.lower()
        if suffix == ".txt":
            captions.append(entry)
            continue
        if suffix not in IMAGE_SUFFIXES:
            results.append(FileResult(entry.path.name, "skipped", f"not an image type ({suffix or 'no extension'})"))
            continue
        if room is not None and room <= 0:
            results.append(FileResult(entry.path.name, "skipped", f"the dataset is full: {max_images} images is "
                                                                  "this server's limit per dataset"))
            continue
        try:
            data = entry.read()
        except ValueError as exc:  # a bounded read that went past its limit
            results.append(FileResult(entry.path.name, "skipped", str(exc)))
            continue
        result = import_image(data, entry.path, images_dir)
        results.append(result)
        if result.status != "skipped":
            room = room - 1 if room is not None else None
            stored[(entry.path.parent.name, Path(entry.path.name).stem)] = _target_folder(
                images_dir, entry.path) / result.name
    for entry in captions:
        image = stored.get((entry.path.parent.name, entry.path.stem))
        if image is None:
            results.append(FileResult(entry.path.name, "skipped", "caption without an image of the same name"))
            continue
        try:
            text = entry.read().decode("utf-8", errors="replace")
        except ValueError as exc:
            results.append(FileResult(entry.path.name, "skipped", str(exc)))
            continue
        write_caption(image, text)
        results.append(FileResult(entry.path.name, "imported", f"caption for {image.name}"))
    return results


def _bounded(read: Callable[[int], bytes], limit: int, what: str) -> bytes:
    """Read at most ``limit`` bytes; more means the file is refused (declared sizes in zips can lie)."""
    data = read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} is larger than {limit // 2**20} MB when unpacked; refused (possible zip bomb)")
    return data


def _file_entry(path: Path, inside: PurePosixPath) -> Entry:
    """A file on disk as an entry, read with the limit of its kind."""
    limit = MAX_CAPTION_BYTES if path.suffix.lower() == ".txt" else MAX_FILE_BYTES

    def read() -> bytes:
        with path.open("rb") as handle:
            return _bounded(handle.read, limit, path.name)

    return Entry(inside, read)


def zip_entries(zip_path: Path) -> Iterator[Entry | FileResult]:
    """Members of a zip, refusing unsafe paths (zip-slip) and anything that unpacks too large (zip bombs)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield FileResult(Path(zip_path).name, "skipped", f"not a readable zip ({exc})")
        return
    with archive:
        budget = MAX_ZIP_BYTES
        for info in archive.infolist():
            member = PurePosixPath(info.filename.replace("\\", "/"))
            if info.is_dir() or member.parts[0] == "__MACOSX" or member.name.startswith("._"):
                continue
            if member.is_absolute() or ".." in member.parts or ":" in member.parts[0]:
                yield FileResult(info.filename, "skipped", "unsafe path in the zip (it points outside the dataset)")
                continue
            if info.file_size > budget:
                yield FileResult(member.name, "skipped", "the zip unpacks to more than "
                                                         f"{MAX_ZIP_BYTES // 2**30} GB; refused (possible zip bomb)")
                return
            budget -= info.file_size
            limit = MAX_CAPTION_BYTES if member.suffix.lower() == ".txt" else MAX_FILE_BYTES

            def read(info: zipfile.ZipInfo = info, limit: int = limit, name: str = member.name) -> bytes:
                with archive.open(info) as handle:
                    return _bounded(handle.read, limit, name)

            yield Entry(member, read)


def folder_entries(folder: Path) -> Iterator[Entry | FileResult]:
    """Images and captions of a folder on the server, including kohya ``N_name`` subfolders; links that lead out of
    the folder are refused."""
    folder = Path(folder).resolve()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        inside = PurePosixPath(*path.relative_to(folder).parts)
        if folder not in path.resolve().parents:
            yield FileResult(str(inside), "skipped", "a link to a file outside the imported folder; refused")
            continue
        yield _file_entry(path, inside)


def import_sources(paths: Iterable[Path], images_dir: Path, max_images: int | None = None) -> list[FileResult]:
    """Import uploads of any mix: images, ``.txt`` captions, and zips."""
    def expand() -> Iterator[Entry | FileResult]:
        for path in paths:
            path = Path(path)
            if path.suffix.lower() == ".zip":
                yield from zip_entries(path)
            else:
                yield _file_entry(path, PurePosixPath(path.name))

    return import_entries(expand(), images_dir, max_images)
