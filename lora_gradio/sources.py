"""What an import reads: the entries of uploads, zips and server folders, each read with a size limit, and
refusals for what is unsafe (zip-slip paths, links out, zip bombs, encryption) before anything is stored."""

from __future__ import annotations

import os
import stat
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_FILE_BYTES = 100 * 2**20  # one image, packed or unpacked
MAX_ZIP_BYTES = 4 * 2**30  # everything a zip may unpack to
MAX_CAPTION_BYTES = 64 * 2**10
WALK_FILES = 20_000  # files and folders a server-folder import looks at, at most ...
WALK_SECONDS = 30.0  # ... and for how long
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


def _size(limit: int) -> str:
    return f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 2**10} kB"


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


def file_entry(path: Path, inside: PurePosixPath, source: str = "") -> Entry:
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
            yield file_entry(path, inside, folder.name)


def zip_members(path: Path) -> int:
    """How many files a zip lists (1 for one that cannot be read: its refusal is one row)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(1 for info in archive.infolist() if not info.is_dir()) or 1
    except (zipfile.BadZipFile, OSError):
        return 1
