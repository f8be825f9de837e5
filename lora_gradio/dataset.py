"""Training images and their captions on disk: the kohya layout, safe image decoding, and Prepare's training copies
in their bucket sizes."""

from __future__ import annotations

import codecs
import json
import re
import shutil
import tempfile
import threading
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, ImageStat
from pillow_heif import register_heif_opener

from .atomic import write_text_atomic
from .buckets import fit_to_bucket, make_buckets, pick_bucket
from .errors import UserError
from .events import Emit, JobEvent, ignore, progress
from .masks import is_mask_file, mask_file, mask_source

register_heif_opener()  # HEIC photos from phones
Image.init()
# Pillow formats that need a program or a handler it does not ship with, or that are not pictures.
UNDECODABLE = {"BUFR", "EPS", "GRIB", "HDF5", "MPEG", "WMF"}
IMAGE_SUFFIXES = {suffix for suffix, kind in Image.registered_extensions().items()
                  if kind in Image.OPEN and kind not in UNDECODABLE}
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "10_ohwx woman" = 10 repeats, class words "ohwx woman"
MAX_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's own guard, for every image opened anywhere in the process
MAX_ASPECT = 4  # the widest bucket is 4:1; beyond that, training crops most of the picture away
FLAT = 2.0  # pixel standard deviation (0-255) below which an image is one flat colour
MANIFEST = ".manifest.json"  # in prepared/: which original (size, mtime) each training copy was made from


@dataclass
class TrainImage:
    """One image to train on, with its caption and how often an epoch shows it."""

    path: Path
    caption: str
    repeats: int = 1
    folder: str = ""
    prior: bool = False  # a regularisation image: its loss is weighted by prior_loss_weight
    mask: Path | None = None  # with masked loss: the file its mask comes from (None: all of it is learnt)


@dataclass
class DatasetScan:
    """What a dataset folder holds, plus the problems worth telling the user about."""

    images: list[TrainImage]
    warnings: list[str] = field(default_factory=list)
    stale: str | None = None  # what changed in the images since Prepare, when training copies exist

    @property
    def total_repeats(self) -> int:
        """Images per epoch, counting repeats (kohya's ``ss_num_train_images``)."""
        return sum(i.repeats for i in self.images)


def open_image(source: Path | BinaryIO) -> Image.Image:
    """Open lazily, refusing sizes that would exhaust memory before any pixel is decoded."""
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past twice the limit: say it in our words
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) // 1_000_000} megapixels" if found else "the image"
        raise Image.DecompressionBombError(
            f"{size} is over {MAX_PIXELS // 1_000_000} megapixels (a possible decompression bomb)") from exc
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise Image.DecompressionBombError(
            f"{img.width}×{img.height} is over {MAX_PIXELS // 1_000_000} megapixels (a possible decompression bomb)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF rotation applied, first frame only, 16-bit/CMYK/palette to RGB, alpha flattened onto white."""
    img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return img.convert("RGB")


def image_advice(img: Image.Image) -> list[str]:
    """Readable images that still teach nothing: a single flat colour, or a panorama no bucket can hold."""
    width, height = img.size
    notes = []
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio > MAX_ASPECT:
        notes.append(f"extreme shape ({ratio:.0f}:1): training crops it to {MAX_ASPECT}:1 at most, so crop it around "
                     "the subject first")
    img.draft("RGB", (128, 128))
    small = to_rgb(img)
    small.thumbnail((128, 128))
    if max(ImageStat.Stat(small).stddev) < FLAT:
        notes.append("one flat colour (blank): there is nothing to learn from it; remove it")
    return notes


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file to normalised RGB (see :func:`to_rgb`)."""
    with open_image(path) as img:
        return to_rgb(img)


BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # longest first: UTF-32 LE starts FF FE
ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]?")  # terminal colours and other escape sequences


def invisible(char: str) -> bool:
    """Characters that show as nothing (or as a plain space) but change what the tokenizer sees."""
    kind = unicodedata.category(char)
    return kind in ("Cc", "Cf", "Zl", "Zp") or (kind == "Zs" and char != " ")


def invisible_characters(text: str) -> list[str]:
    """The invisible characters in ``text`` by code point and name, e.g. 'U+200B ZERO WIDTH SPACE'."""
    return [f"U+{ord(c):04X} {unicodedata.name(c, 'control character')}" for c in dict.fromkeys(text) if invisible(c)]


def decode_caption(data: bytes) -> tuple[str, list[str]]:
    """Caption bytes as the text a person meant: BOM-aware (UTF-8, UTF-16, UTF-32), Windows-1252 when not UTF-8,
    control and invisible characters removed, NFC; with a note for each repair."""
    notes = []
    encoding = next((name for bom, name in BOMS if data.startswith(bom)), None)
    if encoding:
        text = data.decode(encoding, errors="replace")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
            notes.append("not UTF-8, read as Windows-1252: check its accented letters")
    text = ESCAPES.sub("\x00", text)
    kept = "".join(c for c in text if c in "\t\n\r" or not invisible(c))
    if len(kept) != len(text):
        notes.append(f"{len(text) - len(kept)} control or invisible characters removed")
    return unicodedata.normalize("NFC", kept).strip(), notes


def caption_path(image: Path) -> Path:
    """Where the caption of ``image`` lives: a same-name ``.txt`` beside it (kohya layout)."""
    return image.with_suffix(".txt")


def load_caption(image: Path) -> tuple[str | None, list[str]]:
    """The caption text (None without a caption file) and what had to be repaired to read it."""
    path = caption_path(image)
    return decode_caption(path.read_bytes()) if path.is_file() else (None, [])


def read_caption(image: Path) -> str | None:
    """The caption text, or None when the image has no caption file."""
    return load_caption(image)[0]


def write_caption(image: Path, text: str) -> None:
    """Save a caption atomically beside its image."""
    write_text_atomic(caption_path(image), text.strip() + "\n")


def with_trigger(caption: str, trigger: str) -> str:
    """Put the trigger word first, once, so the LoRA ties to it."""
    caption, trigger = caption.strip(), trigger.strip()
    if not trigger:
        return caption
    if caption == trigger or caption.startswith(trigger + ",") or caption.startswith(trigger + " "):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def image_problem(source: Path | BinaryIO) -> str | None:
    """None when the image decodes completely; otherwise why not, in a few words.

    For files the answer is cached by path and modification time: the report, the estimate and training all ask.
    """
    if isinstance(source, Path):
        return _file_problem(str(source), source.stat().st_mtime_ns)
    return _decode_problem(source)


@lru_cache(maxsize=8192)
def _file_problem(path: str, _mtime_ns: int) -> str | None:
    return _decode_problem(Path(path))


def _decode_problem(source: Path | BinaryIO) -> str | None:
    try:
        with open_image(source) as img:
            img.load()
    except Image.DecompressionBombError as exc:
        return str(exc)
    except Image.UnidentifiedImageError:
        return "not an image (the content is not a format Pillow reads)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt or truncated image ({exc})"
    return None


def list_images(images_dir: Path) -> list[Path]:
    """The dataset's images (in kohya repeat subfolders too), sorted by path; mask pictures are not images."""
    if not images_dir.is_dir():
        return []
    return sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not is_mask_file(p) and not any(part.startswith(".") for part in p.relative_to(images_dir).parts))


def find_replace_captions(images_dir: Path, find: str, replace: str) -> int:
    """Replace text in every caption of a dataset; returns how many captions changed."""
    if not find:
        raise UserError("Type the text to find.")
    changed = 0
    for image in list_images(images_dir):
        caption = read_caption(image)
        if caption and find in caption:
            write_caption(image, caption.replace(find, replace))
            changed += 1
    return changed


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, trimmed and non-empty: one rule for counts, metadata and shuffling."""
    return [tag for tag in (part.strip() for part in caption.split(",")) if tag]


def tag_frequencies(images_dir: Path) -> list[tuple[str, int]]:
    """Comma-separated tags across all captions, most frequent first."""
    counts: dict[str, int] = {}
    for image in list_images(images_dir):
        for tag in split_tags(read_caption(image) or ""):
            counts[tag] = counts.get(tag, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def source_stamp(path: Path) -> list[int]:
    """Size and modification time: what tells a training copy from a stale one."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def read_manifest(prepared_dir: Path) -> dict:
    """Prepare's record: resolution, crop, and for each original (relative path) its stamp and its copy."""
    path = Path(prepared_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # unreadable: every copy counts as stale and training reads the originals


def fresh_copy(image: Path, images_dir: Path, manifest: dict, prepared_dir: Path) -> Path | None:
    """The training copy of ``image`` if Prepare made it from the file as it is now."""
    entry = manifest.get("files", {}).get(str(image.relative_to(images_dir)))
    if not entry or entry.get("stamp") != source_stamp(image):
        return None
    copy = Path(prepared_dir) / entry["copy"]
    return copy if copy.is_file() else None


@dataclass
class PreparedStatus:
    """How the prepared copies differ from the images as they are now."""

    added: list[str]
    changed: list[str]
    removed: list[str]

    def message(self) -> str | None:
        """What changed since Prepare and what training does about it, or None when the copies are current."""
        parts = [f"{len(names)} {'image was' if len(names) == 1 else 'images were'} {verb} ({', '.join(names[:3])}"
                 f"{', …' if len(names) > 3 else ''})"
                 for names, verb in ((self.added, "added"), (self.changed, "changed"), (self.removed, "removed"))
                 if names]
        if not parts:
            return None
        return ("Since Prepare, " + "; ".join(parts) + ". Training reads those images from the originals (removed "
                "ones are left out); press Prepare again to refresh the training copies.")


def prepared_status(images_dir: Path, prepared_dir: Path, manifest: dict | None = None) -> PreparedStatus | None:
    """Compare the images with Prepare's record (read here unless given); None when the dataset was never
    prepared."""
    manifest = read_manifest(prepared_dir) if manifest is None else manifest
    if not manifest:
        return None
    recorded = manifest.get("files", {})
    now = {str(p.relative_to(images_dir)): p for p in list_images(images_dir)}
    return PreparedStatus(
        sorted(set(now) - set(recorded)),
        sorted(name for name, path in now.items()
               if name in recorded and fresh_copy(path, images_dir, manifest, prepared_dir) is None),
        sorted(set(recorded) - set(now)))


def scan_training_folder(folder: Path, trigger_word: str = "", prepared: Path | None = None, repeats: int = 1,
                         masks: bool = False) -> DatasetScan:
    """Collect images and captions from a folder, including kohya ``N_name`` repeat subfolders; the other images
    repeat ``repeats`` times per epoch; with ``masks``, each image's loss mask.

    Captions and masks always come from ``folder``; with ``prepared``, pixels come from Prepare's copies where they
    are current.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Dataset folder '{folder}' does not exist. Point --data at a folder of images.")
    manifest = read_manifest(prepared) if prepared else {}
    images, warnings, zero_folders = [], [], set()
    for path in list_images(folder):  # hidden folders (thumbnails) are not training data
        match = REPEAT_FOLDER.match(path.parent.name) if path.parent != folder else None
        shown, class_words = (int(match.group(1)), match.group(2)) if match else (repeats, "")
        pixels = (fresh_copy(path, folder, manifest, prepared) if manifest else None) or path
        problem = image_problem(pixels)
        rel = path.relative_to(folder)
        if problem:
            warnings.append(f"Skipped {rel}: {problem}.")
            continue
        caption, notes = load_caption(path)
        warnings += [f"{caption_path(rel)}: {note}." for note in notes]
        if match and shown == 0 and match.group(0) not in zero_folders:
            zero_folders.add(match.group(0))
            warnings.append(f"Folder '{match.group(0)}' asks for 0 repeats; its images are trained once per epoch. "
                            f"Rename it to '1_{class_words}' (or more) to say how often.")
        if caption is None or not caption:
            fallback = trigger_word or class_words
            warnings.append(f"{rel} has no caption; training it with '{fallback or 'an empty caption'}'. "
                            f"Add {caption_path(rel).name} to describe it.")
            caption = fallback
        mask = mask_source(path) if masks else None
        if mask is not None and mask != path and (problem := image_problem(mask)):
            warnings.append(f"{mask.relative_to(folder)}: {problem}; {rel} is learnt whole. Replace the mask.")
            mask = None
        images.append(TrainImage(pixels, with_trigger(caption, trigger_word), max(shown, 1),
                                 path.parent.name if path.parent != folder else folder.name, mask=mask))
    unmasked = [image.path.name for image in images if masks and image.mask is None]
    if unmasked:
        warnings.append(f"Masked loss is on, but {len(unmasked)} of {len(images)} images have no mask (neither "
                        f"transparency nor a {mask_file(Path(unmasked[0])).name}), so all of each is learnt: "
                        f"{', '.join(unmasked[:3])}{' …' if len(unmasked) > 3 else ''}.")
    status = prepared_status(folder, prepared, manifest) if manifest else None
    stale = status.message() if status else None
    if stale:
        warnings.insert(0, stale)
    if not images:
        raise UserError(
            f"No usable images in '{folder}'. Add .png, .jpg or .webp files (captions as same-name .txt files)."
            + (f" Problems: {' '.join(warnings)}" if warnings else "")
        )
    return DatasetScan(images, warnings, stale)


def oriented_size(path: Path) -> tuple[int, int]:
    """Width and height as training sees them (EXIF rotation applied), read from the header alone."""
    with open_image(path) as img:
        width, height = img.size
        turned = img.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the axes
    return (height, width) if turned else (width, height)


@dataclass
class PrepareResult:
    """How many training copies were written, the images skipped (with why), and whether a Stop ended it."""

    done: int
    skipped: list[str]
    stopped: bool = False


def prepare_dataset(images_dir: Path, prepared_dir: Path, resolution: int, center_crop: bool = False,
                    emit: Emit | None = None, stop: threading.Event | None = None) -> PrepareResult:
    """Write training copies (pixels only): each image in the aspect-ratio bucket nearest its shape (about
    ``resolution``² pixels, sides in steps of 64), or a centred square.

    Captions stay with the originals, where training reads them. The copies replace the previous ones in one rename
    at the end, so a failure or a Stop leaves the last good set in place.
    """
    images = list_images(images_dir)
    if not images:
        raise UserError("The dataset has no images to prepare. Add some in the Dataset tab.")
    buckets = [(resolution, resolution)] if center_crop else make_buckets(resolution)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=prepared_dir.parent))
    skipped, files = [], {}
    try:
        for index, path in enumerate(images):
            if stop is not None and stop.is_set():
                (emit or ignore)(JobEvent("stopped", f"Prepare stopped after {index} of {len(images)} images; the "
                                                     "previous training copies (if any) are unchanged."))
                return PrepareResult(index - len(skipped), skipped, stopped=True)
            relative = path.relative_to(images_dir)
            stamp = source_stamp(path)
            try:
                img = open_rgb(path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                skipped.append(f"{relative}: {exc}")
                continue
            fitted = fit_to_bucket(img, pick_bucket(img.size, buckets))
            target = staging / relative.with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            fitted.save(target)
            files[str(relative)] = {"stamp": stamp, "copy": str(relative.with_suffix(".png"))}
            progress(emit or ignore, "Prepared {} of {} images", index + 1, len(images))
        write_text_atomic(staging / MANIFEST, json.dumps(
            {"resolution": resolution, "center_crop": center_crop, "files": files}, indent=1))
        old = prepared_dir.with_name(prepared_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if prepared_dir.exists():
            prepared_dir.rename(old)
        staging.rename(prepared_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PrepareResult(len(images) - len(skipped), skipped)
