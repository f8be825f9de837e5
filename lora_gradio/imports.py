"""Bring images into a dataset from uploads, zips or a folder: normalised copies, one message per file, one summary.

Captions pair with images by their full path inside the upload, zip or folder (Unicode-normalised, any case), so
``A/001.txt`` and ``B/001.txt`` never trade places; they are decoded by :func:`dataset.decode_caption`.
"""

from __future__ import annotations

import io
import os
import stat
import time
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

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

MAX_FILE_BYTES = 100 * 2**20  # one image, packed or unpacked
MAX_ZIP_BYTES = 4 * 2**30  # everything a zip may unpack to
MAX_CAPTION_BYTES = 64 * 2**10
WALK_FILES = 20_000  # files and folders a server-folder import looks at, at most ...
WALK_SECONDS = 30.0  # ... and for how long
MIN_SIDE = 64  # below this an image carries nothing to learn
GOOD_SIDE = 512
KEPT_FORMATS = {"JPEG", "PNG", "WEBP"}
SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}  # made by Finder and Explorer
PREFERRED = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".avif"}  # named in messages; every Pillow format works
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
ZIP_METHOD_NAMES = {9: "Deflate64", 93: "Zstandard", 95: "XZ", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}


class SkipFile(Exception):
    """A file that cannot be imported; the message says why, in the user's terms."""


@dataclass
class FileResult:
    """The outcome for one file: ``imported``, ``warning`` (imported, with advice), ``skipped`` or ``ignored``
    (a system file, counted but not listed). ``unsafe`` marks archive entries refused for their path or kind."""

    name: str
    status: str
    message: str
    source: str = ""
    unsafe: bool = False


@dataclass
class Entry:
    """A file to import: its path inside the upload/zip/folder, where it came from, and how to read it (bounded)."""

    path: PurePosixPath
    read: Callable[[], bytes]
    source: str = ""


@dataclass
class ImportReport:
    """Every file's outcome, the notes that concern the whole import, and one summary line."""

    files: list[FileResult]
    sources: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def shown(self) -> list[FileResult]:
        """The rows worth a line each (system files are only counted)."""
        return [r for r in self.files if r.status != "ignored"]

    def summary(self) -> str:
        """'12 images and 10 captions imported from photos.zip; …': what was kept and what was not, in one line."""
        counts = Counter(r.status for r in self.files)
        kept = [r for r in self.files if r.status in ("imported", "warning")]
        captions = sum(1 for r in kept if r.name.lower().endswith(".txt"))
        images = len(kept) - captions
        parts = [f"{images} {'image' if images == 1 else 'images'} and {captions} "
                 f"{'caption' if captions == 1 else 'captions'} imported from {_names(self.sources) or 'nothing'}"]
        if not kept and not counts["skipped"]:
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


def _size(limit: int) -> str:
    return f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 2**10} kB"


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
    """The bytes to store: the original when it is a plain RGB JPEG/PNG/WebP, otherwise an RGB PNG."""
    animated = getattr(img, "n_frames", 1) > 1
    rotated = img.getexif().get(0x0112, 1) not in (0, 1)
    if img.format in KEPT_FORMATS and img.mode == "RGB" and not animated and not rotated:
        return data, suffix, []
    notes = ["EXIF rotation applied"] * rotated + ["first frame of an animation"] * animated
    if img.format not in KEPT_FORMATS:
        notes.append(f"{img.format} stored as PNG")
    if img.mode != "RGB":
        notes.append(f"{img.mode} converted to RGB")
    buffer = io.BytesIO()
    to_rgb(img).save(buffer, format="PNG")
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
    with open_image(io.BytesIO(data)) as img:
        width, height = img.size
        if min(width, height) < MIN_SIDE:
            return FileResult(name, "skipped", f"too small ({width}×{height}): use images at least {GOOD_SIDE} px "
                                               "on the short side"), None
        if img.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
        payload, suffix, notes = _normalised(img, data, Path(name).suffix.lower())
    with open_image(io.BytesIO(data)) as img:
        advice = image_advice(img)
    wanted = disk_name(Path(unicodedata.normalize("NFC", name)).stem + suffix, "image")
    if Path(wanted).stem != Path(unicodedata.normalize("NFC", name)).stem:
        notes.append(f"stored as '{wanted}' (the name had characters a file name cannot hold, or was too long)")
    folder = _target_folder(images_dir, path)
    folder.mkdir(parents=True, exist_ok=True)
    target, duplicate = _unique(folder / wanted, payload)
    if duplicate:
        return FileResult(name, "skipped", f"already in the dataset as {target.name}"), target
    write_bytes_atomic(target, payload)
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


def import_entries(entries: Iterable[Entry | FileResult], images_dir: Path, max_images: int | None = None,
                   sources: list[str] | None = None) -> ImportReport:
    """Import images first, then attach each ``.txt`` caption to the image at the same path; past ``max_images``
    in the dataset, images are refused. Captions are read as they come (a zip is open only while it is walked)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    results: list[FileResult] = []
    captions: list[tuple[Entry, bytes]] = []
    stored: dict[str, Path] = {}
    room = max_images - len(list_images(images_dir)) if max_images is not None else None
    for entry in entries:
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
    notes = [f"folder '{name}' asks for 0 repeats, so its images train once per epoch: rename it to "
             f"'1_{REPEAT_FOLDER.match(name).group(2)}' or more" for name in zero]
    return ImportReport(results, sources or [], notes)


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


def _bounded(read: Callable[[int], bytes], limit: int, message: str) -> bytes:
    """Read at most ``limit`` bytes; more means the file is refused (declared sizes in zips can lie)."""
    data = read(limit + 1)
    if len(data) > limit:
        raise SkipFile(message)
    return data


def _limit(path: PurePosixPath, packed: bool) -> tuple[int, str]:
    """The size limit of a file of this kind, and the message when it is passed."""
    if path.suffix.lower() == ".txt":
        return MAX_CAPTION_BYTES, (f"caption over {_size(MAX_CAPTION_BYTES)}: a caption is a sentence or a list of "
                                   "tags; shorten it")
    return MAX_FILE_BYTES, f"over {_size(MAX_FILE_BYTES)}" + (" when unpacked; refused (possible zip bomb)" if packed
                                                             else "; refused: use a smaller export of the photo")


def _file_entry(path: Path, inside: PurePosixPath, source: str = "") -> Entry:
    """A file on disk as an entry, read with the limit of its kind."""
    limit, message = _limit(inside, packed=False)

    def read() -> bytes:
        with path.open("rb") as handle:
            return _bounded(handle.read, limit, message)

    return Entry(inside, read, source)


def _zip_refusal(info: zipfile.ZipInfo, member: PurePosixPath) -> FileResult | None:
    """Why a zip entry cannot be imported, before it is read: unsafe path or kind, a password, a method."""
    if member.is_absolute() or ".." in member.parts or ":" in member.parts[0]:
        return FileResult(info.filename, "skipped", "unsafe path in the zip (it points outside the dataset)",
                          unsafe=True)
    if stat.S_ISLNK(info.external_attr >> 16):
        return FileResult(info.filename, "skipped", "a link inside the zip; links are not followed", unsafe=True)
    if info.flag_bits & 0x1:
        return FileResult(member.name, "skipped", "encrypted (the zip has a password): unzip it yourself, then "
                                                  "import the folder or the images")
    if info.compress_type not in ZIP_METHODS:
        method = ZIP_METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
        return FileResult(member.name, "skipped", f"compressed with {method}, which cannot be unpacked here: zip it "
                                                  "again with the standard (Deflate) compression")
    return None


def zip_entries(zip_path: Path, source: str | None = None) -> Iterator[Entry | FileResult]:
    """Members of a zip, refusing unsafe paths (zip-slip, links), encrypted or exotic entries, and anything that
    unpacks too large (zip bombs). Each entry must be read before the next is asked for."""
    source = source or Path(zip_path).name
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        with Path(zip_path).open("rb") as handle:
            started_as_zip = handle.read(2) == b"PK"
        yield FileResult(source, "skipped", "the zip is cut off: its end, which lists the files, is missing (an "
                         "interrupted download or copy?); download or copy it again" if started_as_zip else
                         "not a zip file, though its name ends in .zip", source)
        return
    with archive:
        budget = MAX_ZIP_BYTES
        for info in archive.infolist():
            member = PurePosixPath(info.filename.replace("\\", "/"))
            if info.is_dir() or not member.parts:
                continue
            refusal = _zip_refusal(info, member)
            if refusal is not None:
                refusal.source = source
                yield refusal
                continue
            if info.file_size > budget:
                yield FileResult(member.name, "skipped", "the zip unpacks to more than "
                                 f"{MAX_ZIP_BYTES // 2**30} GB; refused (possible zip bomb)", source)
                return
            budget -= info.file_size
            limit, message = _limit(member, packed=True)

            def read(info: zipfile.ZipInfo = info, limit: int = limit, message: str = message) -> bytes:
                try:
                    with archive.open(info) as handle:
                        return _bounded(handle.read, limit, message)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # passwords, methods: refused above
                    raise SkipFile(f"damaged in the zip ({exc})") from exc

            yield Entry(member, read, source)


def folder_entries(folder: Path, max_files: int = WALK_FILES, max_seconds: float = WALK_SECONDS,
                   ) -> Iterator[Entry | FileResult]:
    """Images and captions of a folder on the server, including kohya ``N_name`` subfolders. Links that lead out
    of the folder are refused and named; links to folders are not followed. The walk ends, saying so, after
    ``max_files`` files or ``max_seconds``, so a huge folder cannot hold the server."""
    folder = Path(folder).resolve()
    deadline = time.monotonic() + max_seconds
    for seen, entry in enumerate(_walk(folder)):
        if seen >= max_files or time.monotonic() > deadline:
            yield FileResult("(the rest of the folder)", "skipped", f"not read: a folder import reads at most "
                             f"{max_files} files in {max_seconds:g} s. Import a smaller folder, or a zip.",
                             folder.name)
            return
        yield entry


def _walk(folder: Path) -> Iterator[Entry | FileResult]:
    """Every file and link below ``folder``, in a stable order, as entries or refusals."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        here = Path(root)
        for name in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(name)
            inside = PurePosixPath(*(here / name).relative_to(folder).parts)
            outside = folder not in (here / name).resolve().parents
            yield FileResult(str(inside), "skipped", "a link to a folder outside the imported folder; refused"
                             if outside else "a link to a folder; links are not followed", folder.name, unsafe=outside)
        for name in sorted(files):
            path = here / name
            inside = PurePosixPath(*path.relative_to(folder).parts)
            if folder not in path.resolve().parents:
                yield FileResult(str(inside), "skipped", "a link to a file outside the imported folder; refused",
                                 folder.name, unsafe=True)
                continue
            yield _file_entry(path, inside, folder.name)


def import_folder(folder: Path, images_dir: Path, max_images: int | None = None) -> ImportReport:
    """Import a folder on the server into a dataset."""
    return import_entries(folder_entries(folder), images_dir, max_images, [Path(folder).name or str(folder)])


def import_sources(paths: Iterable[Path], images_dir: Path, max_images: int | None = None) -> ImportReport:
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
                yield _file_entry(path, PurePosixPath(path.name), "the upload")

    return import_entries(expand(), images_dir, max_images, sources)
