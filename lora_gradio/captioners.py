"""The captioning models, each from a hub id or a local folder: BLIP's and Florence-2's sentences for photos and
styles, and a WD tagger's booru tags (the SmilingWolf v3 family, run as published with ONNX Runtime) for anime and
illustration models. :mod:`captioning` reads every one of them the same way."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .dataset import invisible_characters
from .errors import UserError
from .models import from_folder_or_hub, quiet_libraries
from .views import pick_device

if TYPE_CHECKING:
    import torch
    from PIL import Image

BLIP_MODELS = {
    "BLIP base (990 MB)": "Salesforce/blip-image-captioning-base",
    "BLIP large (1.9 GB)": "Salesforce/blip-image-captioning-large",
}
FLORENCE_MODELS = {
    "Florence-2 base (0.23 B parameters)": "florence-community/Florence-2-base",
    "Florence-2 large (0.77 B parameters)": "florence-community/Florence-2-large",
}
WD_MODELS = {
    "WD ViT tagger v3 (booru tags)": "SmilingWolf/wd-vit-tagger-v3",
    "WD SwinV2 tagger v3 (booru tags)": "SmilingWolf/wd-swinv2-tagger-v3",
    "WD EVA02 large tagger v3 (booru tags)": "SmilingWolf/wd-eva02-large-tagger-v3",
}
CAPTION_MODELS = {**BLIP_MODELS, **FLORENCE_MODELS, **WD_MODELS}
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "paragraph": "<MORE_DETAILED_CAPTION>"}
Family = Literal["blip", "florence2", "wd"]
CAPTIONER_KINDS = {"blip": "BLIP captioner", "florence2": "Florence-2 captioner", "wd": "WD tagger"}
RATING, GENERAL, CHARACTER = 9, 0, 4  # the categories of a WD tagger's selected_tags.csv
WORDS = re.compile(r"[a-z]{2}", re.IGNORECASE)  # a tag with no two letters in a row is a face (^_^, o_o)


@dataclass
class CaptionOptions:
    """How captions are written; the trigger word always comes first. ``detail`` is Florence-2's caption length; the
    thresholds, ``ratings``, ``underscores`` and ``blacklist`` (comma-separated) are a WD tagger's."""

    trigger_word: str = ""
    prefix: str = ""
    suffix: str = ""
    max_length: int = 40
    style: Literal["sentence", "tags"] = "sentence"
    overwrite: bool = False
    batch_size: int = 8
    detail: Literal["short", "detailed", "paragraph"] = "detailed"
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    ratings: bool = False
    underscores: bool = False
    blacklist: str = ""

    def __post_init__(self) -> None:
        problems = [text for ok, text in (
            (self.style in ("sentence", "tags"), f"style '{self.style}': use sentence or tags"),
            (self.detail in FLORENCE_TASKS, f"detail '{self.detail}': use {', '.join(FLORENCE_TASKS)}"),
            (1 <= self.max_length <= 75, f"maximum length {self.max_length}: use 1 to 75 tokens"),
            (1 <= self.batch_size <= 32, f"batch size {self.batch_size}: use 1 to 32"),
            *((isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1,
               f"{name} threshold {value}: use 0 to 1") for name, value in (
                ("general", self.general_threshold), ("character", self.character_threshold))),
            (all(len(t) <= 200 for t in (self.trigger_word, self.prefix, self.suffix)),
             "trigger word, prefix and suffix are limited to 200 characters"),
            (len(self.blacklist) <= 5000, "the blacklist is limited to 5000 characters"),
            (not invisible_characters(self.trigger_word), "the trigger word holds invisible characters "
             f"({', '.join(invisible_characters(self.trigger_word))}); retype it"),
        ) if not ok]
        if problems:
            raise UserError("Cannot caption: " + "; ".join(problems) + ".")

    def blacklisted(self) -> set[str]:
        """The blacklist's tags as a tagger compares them (any case, underscores or spaces)."""
        return {normal_tag(tag) for tag in self.blacklist.split(",") if tag.strip()}


def family(source: str) -> Family:
    """Which kind of captioner a hub id or a local folder holds: a WD tagger has selected_tags.csv, Florence-2's
    config says florence2; everything else is read as BLIP."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if (folder / "selected_tags.csv").is_file():
            return "wd"
        try:
            kind = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        return "florence2" if kind == "florence2" else "blip"
    lowered = source.lower()
    if source in WD_MODELS.values() or "tagger" in lowered:
        return "wd"
    return "florence2" if "florence" in lowered else "blip"


class SentenceCaptioner:
    """BLIP or Florence-2 with its processor: one sentence (or paragraph) per picture, deterministic decoding."""

    tags = False  # what it writes is prose, which the "tags" style may cut into phrases

    def __init__(self, model, processor, source: str, florence: bool) -> None:  # noqa: ANN001 - transformers
        self.model, self.processor, self.source, self.florence = model, processor, source, florence

    def describe(self, images: list[Image.Image], options: CaptionOptions) -> list[str]:
        """Each picture's caption; Florence-2 is asked for the options' detail, with beam search as its card uses."""
        import torch

        task = [FLORENCE_TASKS[options.detail]] * len(images) if self.florence else None
        inputs = self.processor(images=images, text=task, return_tensors="pt").to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(**inputs, max_new_tokens=options.max_length, do_sample=False,
                                         num_beams=3 if self.florence else 1)
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]


@dataclass
class Tagger:
    """A WD tagger: its ONNX session, the square size it reads, and its tags with their categories."""

    session: object  # onnxruntime.InferenceSession
    size: int
    names: list[str]
    categories: list[int]
    source: str
    tags = True  # what it writes is tags already

    def describe(self, images: list[Image.Image], options: CaptionOptions) -> list[str]:
        """Each picture's tags, most confident first: general and character tags over their thresholds, the top
        rating if asked for, less the blacklist; underscores as the options say."""
        import numpy as np

        batch = np.stack([self.pixels(image) for image in images])
        feed = self.session.get_inputs()[0].name
        probabilities = self.session.run(None, {feed: batch})[0]
        return [", ".join(self.kept(row, options)) for row in probabilities]

    def pixels(self, image: Image.Image) -> object:
        """A picture as the WD models take it: padded to a white square, resized, BGR values 0–255, channels last."""
        import numpy as np
        from PIL import Image as PilImage

        side = max(image.size)
        square = PilImage.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        resized = square.resize((self.size, self.size), PilImage.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.float32)[:, :, ::-1]

    def kept(self, row: object, options: CaptionOptions) -> list[str]:
        """The tags of one picture's probabilities."""
        found = [(float(p), name) for p, name, kind in zip(row, self.names, self.categories, strict=True)
                 if (kind == GENERAL and p >= options.general_threshold)
                 or (kind == CHARACTER and p >= options.character_threshold)]
        ratings = [(float(p), name) for p, name, kind in zip(row, self.names, self.categories, strict=True)
                   if kind == RATING]
        if options.ratings and ratings:
            found.append(max(ratings))
        banned = options.blacklisted()
        tags = [shown_tag(name, options.underscores) for _, name in sorted(found, key=lambda item: -item[0])]
        return [tag for tag in tags if normal_tag(tag) not in banned]


def shown_tag(name: str, underscores: bool) -> str:
    """A tag as written: with its underscores, or with spaces, except in faces (``^_^``), whose underscore is part
    of the picture."""
    return name if underscores or not WORDS.search(name) else name.replace("_", " ")


def normal_tag(tag: str) -> str:
    """A tag as the blacklist compares it: any case, underscores or spaces."""
    return tag.strip().lower().replace("_", " ") if WORDS.search(tag) else tag.strip().lower()


def load_tagger(source: str) -> Tagger:
    """A WD tagger's ``model.onnx`` and ``selected_tags.csv`` from a folder or the hub, on the GPU where ONNX
    Runtime has one."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise UserError("The WD taggers need ONNX Runtime: pip install onnxruntime (it is in requirements.txt), "
                        "then caption again.") from exc

    def load(local_only: bool) -> Tagger:
        folder = Path(source).expanduser()
        if folder.is_dir():
            model, tags = folder / "model.onnx", folder / "selected_tags.csv"
        else:
            from huggingface_hub import hf_hub_download

            model, tags = (Path(hf_hub_download(source, name, local_files_only=local_only))
                           for name in ("model.onnx", "selected_tags.csv"))
        with tags.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"name", "category"} <= set(rows[0]):
            raise ValueError("selected_tags.csv has no name and category columns")
        wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                  if p in onnxruntime.get_available_providers()]
        try:
            session = onnxruntime.InferenceSession(str(model), providers=wanted)
        except Exception as exc:  # ONNX Runtime raises its own error types for a file it cannot read
            raise ValueError(f"model.onnx cannot be read: {exc}") from exc
        shape = session.get_inputs()[0].shape  # batch, height, width, 3
        if len(session.get_outputs()[0].shape) != 2 or len(shape) != 4 or shape[3] != 3:
            raise ValueError("model.onnx does not take pictures channels-last and give one probability per tag")
        return Tagger(session, int(shape[1]), [row["name"] for row in rows], [int(row["category"]) for row in rows],
                      source)

    return from_folder_or_hub(
        load, source, "a WD tagger (model.onnx and selected_tags.csv)", "Tagger folder",
        "Connect to the internet for the first use (the files are cached afterwards), or download them on a machine "
        f"that can: huggingface-cli download {source} model.onnx selected_tags.csv config.json --local-dir "
        "wd-tagger, copy that folder into the workspace and pick it as a local folder ('Local folder…').")


def load_sentences(source: str, kind: Family, device: torch.device) -> SentenceCaptioner:
    """BLIP or Florence-2 from a local folder or a hub id, onto ``device``."""
    import torch
    from transformers import (
        BlipForConditionalGeneration,
        BlipProcessor,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    florence = kind == "florence2"
    model_class = Florence2ForConditionalGeneration if florence else BlipForConditionalGeneration
    processor_class = Florence2Processor if florence else BlipProcessor
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def load(local_only: bool) -> SentenceCaptioner:
        processor = processor_class.from_pretrained(source, local_files_only=local_only)
        model = model_class.from_pretrained(source, local_files_only=local_only, dtype=dtype)
        return SentenceCaptioner(model.to(device).eval(), processor, source, florence)

    name, short = ("a Florence-2 model", "florence-2") if florence else ("a BLIP captioning model", "blip-base")
    return from_folder_or_hub(
        load, source, name, "Florence-2 folder" if florence else "BLIP folder",
        "Connect to the internet for the first use (the weights are cached afterwards), or download it on a machine "
        f"that can: huggingface-cli download {source} --local-dir {short}, copy that folder into the workspace and "
        "pick it as a local folder ('Local folder…').")


def load_captioner(source: str, device: torch.device | None = None) -> SentenceCaptioner | Tagger:
    """The captioner a hub id or a local folder holds (see :func:`family`), on ``device`` (else the best one); a
    clear message when neither the folder nor the download is there."""
    quiet_libraries()
    kind = family(source)
    return load_tagger(source) if kind == "wd" else load_sentences(source, kind, device or pick_device())
