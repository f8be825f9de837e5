"""The files the web server may hand out: links to what the page shows, and visitors' uploads, both kept in bounds.

The server serves one folder (Gradio's upload folder) and nothing else of the workspace. A file the page shows is
linked into ``shown/`` there, and the link's source is recorded outside that folder, so a link whose source was
deleted or replaced is removed with it: an old URL then answers 404. Uploads are removed after an age, and the
oldest first past a size budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .atomic import write_bytes_atomic, write_text_atomic

SHOWN = "shown"


def _record_dir(upload_dir: Path) -> Path:
    """Where each link's source is noted: beside the served folder, never inside it (the server's own paths stay
    private)."""
    return upload_dir.parent / f"{upload_dir.name}-shown-sources"


def _fingerprint(stat: os.stat_result) -> list[int]:
    return [stat.st_mtime_ns, stat.st_size]


def show(upload_dir: Path, path: Path | str) -> Path:
    """A workspace file as the server may hand it out: a link (or, across file systems, a copy) in ``shown/``."""
    source = Path(path).resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()[:24]
    target = upload_dir / SHOWN / key / source.name
    if not target.exists():
        record = _record_dir(upload_dir) / f"{key}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(record, json.dumps({"source": str(source), "stat": _fingerprint(stat)}))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except FileExistsError:  # another request linked it first
            return target
        except OSError:  # another file system: a copy, written whole before it appears
            write_bytes_atomic(target, source.read_bytes())
    return target


def forget_deleted(upload_dir: Path) -> int:
    """Remove every shown file whose source is gone or was replaced since; returns how many went."""
    shown, records = upload_dir / SHOWN, _record_dir(upload_dir)
    removed = 0
    for folder in list(shown.iterdir()) if shown.is_dir() else []:
        record = records / f"{folder.name}.json"
        try:
            noted = json.loads(record.read_text(encoding="utf-8"))
            current = _fingerprint(Path(noted["source"]).stat())
        except (OSError, ValueError, KeyError, TypeError):
            current, noted = None, {}
        if current is None or current != noted.get("stat"):
            shutil.rmtree(folder, ignore_errors=True)
            record.unlink(missing_ok=True)
            removed += 1
    return removed


def clean_uploads(upload_dir: Path, max_age_s: float, max_bytes: int) -> int:
    """Remove uploads older than ``max_age_s``, then the oldest until the rest fit ``max_bytes``; returns how many
    uploads went. Each upload is a folder of Gradio's cache; the shown links are not uploads."""
    entries = []
    for folder in upload_dir.iterdir() if upload_dir.is_dir() else []:
        if folder.name == SHOWN or not folder.is_dir():
            continue
        files = [p for p in folder.rglob("*") if p.is_file()]
        newest = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
        entries.append((newest, sum(p.stat().st_size for p in files), folder))
    entries.sort()  # oldest first
    total = sum(size for _, size, _ in entries)
    removed, now = 0, time.time()
    for newest, size, folder in entries:
        if now - newest <= max_age_s and total <= max_bytes:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed += 1
    return removed

