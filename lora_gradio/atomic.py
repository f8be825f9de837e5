"""Atomic file writes: a crash or a full disk never leaves a half-written file under the final name."""

import hashlib
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

# Names the app gives files: under the usual 255-byte limit with room for a ' (12)' suffix and the temporary name.
MAX_NAME_BYTES = 200
UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f-\x9f<>:"/\\|?*]')  # control characters and what Windows forbids


def _read_umask() -> int:
    """The process umask; reading it means setting it, so this runs once, at import, before any threads write."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file in the same folder as ``path`` for a writer that takes a path (safetensors' save_file),
    renamed over ``path`` once the block ends; removed instead when it fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:32]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A handle on a temporary file in the same folder as ``path``, renamed over it once everything is on disk."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over ``path``."""
    with atomic_writer(path) as handle:
        handle.write(data)


def copy_atomic(source: Path, path: Path) -> None:
    """Copy a file (a LoRA of hundreds of MB, say) in chunks, atomically."""
    with atomic_writer(path) as handle, Path(source).open("rb") as original:
        shutil.copyfileobj(original, handle, 2**22)


def write_text_atomic(path: Path, text: str) -> None:
    """Text flavour of :func:`write_bytes_atomic` (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def disk_name(name: str, fallback: str = "file") -> str:
    """The one rule for a file name the app writes: NFC, no separators or control characters, and at most
    ``MAX_NAME_BYTES`` of UTF-8, shortened with a stable hash of the full name so that two long names stay apart."""
    name = UNSAFE_CHARS.sub("_", unicodedata.normalize("NFC", name)).strip(" .")
    stem, dot, suffix = name.rpartition(".") if "." in name[1:] else (name, "", "")
    stem, suffix = (stem or fallback), dot + suffix
    if len((stem + suffix).encode()) <= MAX_NAME_BYTES:
        return stem + suffix
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    room = MAX_NAME_BYTES - len((tag + suffix[:16]).encode())
    return stem.encode()[:room].decode(errors="ignore").rstrip(" .") + tag + suffix[:16]
