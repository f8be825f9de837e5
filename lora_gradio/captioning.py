"""BLIP captions that start with the trigger word: loaded once through the model cache, batched, on the GPU if any."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .cache import ModelCache
from .dataset import invisible_characters, list_images, open_rgb, read_caption, with_trigger, write_caption
from .errors import Stopped, UserError
from .events import Emit, JobEvent, ignore, progress, status_events
from .models import from_folder_or_hub, quiet_libraries
from .views import pick_device

if TYPE_CHECKING:
    import torch
    from PIL import Image

BLIP_MODELS = {
    "BLIP base (990 MB)": "Salesforce/blip-image-captioning-base",
    "BLIP large (1.9 GB)": "Salesforce/blip-image-captioning-large",
}
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
SPLIT_WORDS = re.compile(r"\s*(?:,|\b(?:with|and|in|on|at|of|near|behind|next to|while|that is|who is)\b)\s*")
ARTICLES = re.compile(r"^(?:a|an|the|some|two|three)\s+")
GENERIC = {"photo", "picture", "image", "close up", "closeup", "there"}


@dataclass
class CaptionOptions:
    """How captions are written; the trigger word always comes first."""

    trigger_word: str = ""
    prefix: str = ""
    suffix: str = ""
    max_length: int = 40
    style: Literal["sentence", "tags"] = "sentence"
    overwrite: bool = False
    batch_size: int = 8

    def __post_init__(self) -> None:
        problems = [text for ok, text in (
            (self.style in ("sentence", "tags"), f"style '{self.style}': use sentence or tags"),
            (1 <= self.max_length <= 75, f"maximum length {self.max_length}: use 1 to 75 tokens"),
            (1 <= self.batch_size <= 32, f"batch size {self.batch_size}: use 1 to 32"),
            (all(len(t) <= 200 for t in (self.trigger_word, self.prefix, self.suffix)),
             "trigger word, prefix and suffix are limited to 200 characters"),
            (not invisible_characters(self.trigger_word), "the trigger word holds invisible characters "
             f"({', '.join(invisible_characters(self.trigger_word))}); retype it"),
        ) if not ok]
        if problems:
            raise UserError("Cannot caption: " + "; ".join(problems) + ".")


class Captioner:
    """A loaded BLIP model and its processor."""

    def __init__(self, model, processor, source: str) -> None:  # noqa: ANN001 - transformers classes
        self.model, self.processor, self.source = model, processor, source

    def caption(self, images: list[Image.Image], max_length: int) -> list[str]:
        """One sentence per image, greedy decoding (deterministic)."""
        import torch

        inputs = self.processor(images=images, return_tensors="pt").to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, max_new_tokens=max_length, num_beams=1, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


def load_captioner(source: str, device: torch.device | None = None) -> Captioner:
    """BLIP from a local folder or a hub id, onto ``device`` (else the best one); a clear message when neither is
    available."""
    quiet_libraries()
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device = device or pick_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def load(local_only: bool) -> Captioner:
        processor = BlipProcessor.from_pretrained(source, local_files_only=local_only)
        model = BlipForConditionalGeneration.from_pretrained(source, local_files_only=local_only, dtype=dtype)
        return Captioner(model.to(device).eval(), processor, source)

    return from_folder_or_hub(
        load, source, "a BLIP captioning model", "BLIP folder",
        "Connect to the internet for the first use (the weights are cached afterwards), or download it on a machine "
        f"that can: huggingface-cli download {source} --local-dir blip-base, copy that folder into the workspace and "
        "pick it as a local folder ('Local folder…').")


def to_tags(sentence: str) -> str:
    """Short comma-separated phrases from a sentence: 'a woman with red hair in a park' -> 'woman, red hair, park'."""
    phrases = []
    for part in SPLIT_WORDS.split(sentence.lower()):
        phrase = ARTICLES.sub("", part.strip(" ."))
        if phrase and phrase not in GENERIC and phrase not in phrases:
            phrases.append(phrase)
    return ", ".join(phrases)


def compose(generated: str, options: CaptionOptions) -> str:
    """Prefix, caption (sentence or tags), suffix, with the trigger word first."""
    body = to_tags(generated) if options.style == "tags" else generated
    parts = [p.strip(" ,") for p in (options.prefix, body, options.suffix) if p and p.strip(" ,")]
    return with_trigger(", ".join(parts), options.trigger_word)


@dataclass
class CaptionResult:
    """What a captioning run did; ``stopped`` when a Stop ended it (what was written stays)."""

    written: dict[str, str]
    skipped: list[str]
    problems: list[str]
    stopped: bool = False


def caption_dataset(cache: ModelCache, source: str, images_dir: Path, options: CaptionOptions,
                    emit: Emit | None = None, stop: threading.Event | None = None) -> CaptionResult:
    """Caption the dataset's images (only uncaptioned ones unless ``overwrite``), saving each ``.txt`` at once.

    The captioner is used under the cache's lease; ``stop`` ends the run between batches, keeping what was written.
    """
    emit = emit or ignore
    images = list_images(images_dir)
    if not images:
        raise UserError("The dataset has no images to caption. Add some in the Dataset tab.")
    todo = [p for p in images if options.overwrite or not read_caption(p)]
    result = CaptionResult({}, [str(p.relative_to(images_dir)) for p in images if p not in todo], [])
    if not todo:
        return result
    try:
        with cache.use(("captioner", source), lambda: load_captioner(source, cache.device), "captioning",
                       on_wait=status_events(emit), stop=stop) as captioner:
            caption_batches(captioner, todo, images_dir, options, result, emit, stop)
    except Stopped as exc:
        result.stopped = True
        emit(JobEvent("stopped", str(exc)))
    return result


def caption_batches(captioner: Captioner, todo: list[Path], images_dir: Path, options: CaptionOptions,
                    result: CaptionResult, emit: Emit, stop: threading.Event | None) -> None:
    """Caption ``todo`` batch by batch into ``result``, counting each batch; a Stop ends it between batches."""
    for start in range(0, len(todo), options.batch_size):
        if stop is not None and stop.is_set():
            result.stopped = True
            emit(JobEvent("stopped", f"Captioning stopped after {start} of {len(todo)} images; their captions are "
                                     "saved."))
            return
        batch, pictures = [], []
        for path in todo[start:start + options.batch_size]:
            try:
                pictures.append(open_rgb(path))
                batch.append(path)
            except (OSError, SyntaxError, ValueError) as exc:
                result.problems.append(f"{path.name}: {exc}")
        if pictures:
            for path, text in zip(batch, captioner.caption(pictures, options.max_length), strict=True):
                caption = compose(text, options)
                write_caption(path, caption)
                result.written[str(path.relative_to(images_dir))] = caption
        done = min(start + options.batch_size, len(todo))
        progress(emit, "Captioned {} of {} images", done, len(todo))
