"""Captions that start with the trigger word, from any captioner of :mod:`captioners` (BLIP, Florence-2, a WD
tagger): loaded once through the model cache, batched, on the GPU if any."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .cache import ModelCache
from .captioners import BLIP_MODELS, DEFAULT_BLIP, CaptionOptions, SentenceCaptioner, Tagger, load_captioner
from .dataset import list_images, open_rgb, read_caption, with_trigger, write_caption
from .errors import Stopped, UserError
from .events import Emit, JobEvent, ignore, progress, status_events

__all__ = ["BLIP_MODELS", "DEFAULT_BLIP", "CaptionOptions", "CaptionResult", "caption_dataset", "load_captioner"]
SPLIT_WORDS = re.compile(r"\s*(?:,|\b(?:with|and|in|on|at|of|near|behind|next to|while|that is|who is)\b)\s*")
ARTICLES = re.compile(r"^(?:a|an|the|some|two|three)\s+")
GENERIC = {"photo", "picture", "image", "close up", "closeup", "there"}


def to_tags(sentence: str) -> str:
    """Short comma-separated phrases from a sentence: 'a woman with red hair in a park' -> 'woman, red hair, park'."""
    phrases = []
    for part in SPLIT_WORDS.split(sentence.lower()):
        phrase = ARTICLES.sub("", part.strip(" ."))
        if phrase and phrase not in GENERIC and phrase not in phrases:
            phrases.append(phrase)
    return ", ".join(phrases)


def compose(generated: str, options: CaptionOptions, tagged: bool = False) -> str:
    """Prefix, caption (sentence or tags; a tagger's tags as they are), suffix, with the trigger word first."""
    body = to_tags(generated) if options.style == "tags" and not tagged else generated
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


def caption_batches(captioner: SentenceCaptioner | Tagger, todo: list[Path], images_dir: Path, options: CaptionOptions,
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
            for path, text in zip(batch, captioner.describe(pictures, options), strict=True):
                caption = compose(text, options, captioner.tags)
                write_caption(path, caption)
                result.written[str(path.relative_to(images_dir))] = caption
        done = min(start + options.batch_size, len(todo))
        progress(emit, "Captioned {} of {} images", done, len(todo))
