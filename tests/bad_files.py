"""Hostile and broken inputs for the import tests, built small: bombs are highly compressible streams."""

import io
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image


def png_bomb(path: Path, side: int = 20000) -> Path:
    """A real side x side greyscale PNG of zeros: a few hundred KB on disk, 400 MB once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def truncated_jpeg(path: Path) -> Path:
    """The first half of a valid JPEG."""
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 40).convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def zip_slip(path: Path, good: bytes) -> Path:
    """A zip with one normal image and members that point outside the folder."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok.png", good)
        archive.writestr("../../escaped.png", good)
        archive.writestr("/etc/absolute.png", good)
    return path


def zip_bomb(path: Path, megabytes: int = 300) -> Path:
    """A zip whose one member unpacks to ``megabytes`` of zeros (well past the per-file limit)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("huge.png", "w", force_zip64=True) as member:
        zeros = b"\x00" * 2**20
        for _ in range(megabytes):
            member.write(zeros)
    return path


def photo_bytes(seed: int, size: tuple[int, int] = (640, 768)) -> bytes:
    """A distinct, repeatable photo-like PNG (noise plus shapes), so perceptual hashes tell the images apart."""
    import numpy as np
    from PIL import ImageDraw

    noise = np.random.default_rng(seed).normal(128, 30, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(noise)
    draw = ImageDraw.Draw(img)
    for index in range(4):
        x, y = (seed * 97 + index * 131) % size[0], (seed * 53 + index * 71) % size[1]
        colour = ((seed * 40 + index * 60) % 256, (seed * 90) % 256, (index * 80) % 256)
        draw.ellipse((x - 90, y - 90, x + 90, y + 90), fill=colour)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()



def zip_with_header(path: Path, name: str, data: bytes, *, flags: int = 0, method: int = 0) -> Path:
    """A one-member zip whose headers claim what zipfile cannot write: ``flags`` bit 0 (encrypted), or a compression
    ``method`` such as Deflate64 (9). Written stored, then the fields of both headers are rewritten."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, data)
    raw = bytearray(path.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # the method field follows the flags
        start = raw.index(signature) + flag_at
        raw[start:start + 4] = struct.pack("<HH", flags, method)
    path.write_bytes(bytes(raw))
    return path


def zip_link(name: str) -> zipfile.ZipInfo:
    """A zip member header that marks a symbolic link (Unix mode in the external attributes)."""
    info = zipfile.ZipInfo(name, date_time=(2024, 5, 1, 12, 0, 0))
    info.external_attr = (0o120777) << 16
    return info
