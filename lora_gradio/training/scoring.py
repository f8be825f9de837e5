"""Scores of each saved epoch's samples, through one evaluator interface: likeness (do the trigger prompts draw the
subject?), prompt following (does the rest of each prompt still hold?) and health (no drift to dark or saturated
against epoch 0). The demo base is read by its own image analysis; real bases by CLIP, on the CPU, so scoring never
takes GPU memory from the training."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image, ImageStat

if TYPE_CHECKING:
    from .config import TrainConfig

DARKER = 0.75  # mean brightness under 75% of epoch 0's: the seed guide's sign of a too-high rate
MORE_SATURATED = 1.35  # mean saturation over 135% of epoch 0's
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
REFERENCE_IMAGES = 16  # training and held-out images CLIP compares samples with
SCORERS = ("auto", "off", "clip")  # besides a CLIP hub id or folder


@dataclass(frozen=True)
class Marks:
    """One set of samples judged: likeness and prompt following (None where no prompt asks for it)."""

    likeness: float | None
    following: float | None


class Evaluator(Protocol):
    """Judges samples against their prompts; ``tolerance`` is a difference in its marks too small to mean much, and
    ``shares`` says its marks are shares of pictures (shown as percentages) rather than similarities."""

    name: str
    tolerance: float
    shares: bool

    def marks(self, prompts: list[str], images: list[Image.Image]) -> Marks:
        """Likeness over the prompts with the trigger word, following over the prompts with more than it."""


def without_trigger(prompt: str, trigger: str) -> str:
    """The rest of a prompt: what it asks for besides the subject."""
    if not trigger:
        return prompt.strip()
    rest = re.sub(rf"\b{re.escape(trigger)}\b", " ", prompt)
    return re.sub(r"\s+", " ", re.sub(r"^[\s,]+|[\s,]+$", "", rest)).strip()


def mean(values: list[float]) -> float | None:
    """The mean, or None for no values."""
    return sum(values) / len(values) if values else None


class DemoEvaluator:
    """The demo base's own analysis: likeness is the share of trigger samples read as the concept's shape, and
    following the share whose shape colour and background colour are the prompt's."""

    name = "the demo's image analysis"
    tolerance = 0.25  # one picture in four
    shares = True

    def __init__(self, trigger: str) -> None:
        self.trigger = trigger

    def marks(self, prompts: list[str], images: list[Image.Image]) -> Marks:
        """Read every picture with the demo's analysis and compare it with the colours its prompt names."""
        from ..demo.shapes import CONCEPT, PALETTE
        from ..demo.vision import read_picture

        colours = "|".join(PALETTE)
        asked = re.compile(rf"\b({colours})\b.*\bon an? ({colours}) background")
        likeness, following = [], []
        for prompt, image in zip(prompts, images, strict=True):
            reading = read_picture(image)
            if self.trigger and re.search(rf"\b{re.escape(self.trigger)}\b", prompt):
                likeness.append(float(reading.shape == CONCEPT))
            if found := asked.search(without_trigger(prompt, self.trigger)):
                following.append(float(reading.colour == found[1] and reading.background == found[2]))
        return Marks(mean(likeness), mean(following))


def projected(output):  # noqa: ANN001, ANN201 - torch tensors or a transformers output, lazily imported
    """CLIP's projected embeddings: transformers 5 hands them back as the output's ``pooler_output``, earlier
    versions as the tensor itself."""
    return getattr(output, "pooler_output", output)


class ClipEvaluator:
    """CLIP's image–image similarity of trigger samples to the training images (likeness) and image–text similarity
    of each sample to its prompt without the trigger word (following)."""

    name = "CLIP"
    tolerance = 0.02  # cosine similarity
    shares = False

    def __init__(self, model, processor, trigger: str, references: list[Path]) -> None:  # noqa: ANN001 - transformers
        self.model, self.processor, self.trigger = model, processor, trigger
        pictures = []
        for path in references[:REFERENCE_IMAGES]:
            with Image.open(path) as image:
                pictures.append(image.convert("RGB"))
        self.reference = self.image_features(pictures).mean(0) if pictures else None

    def image_features(self, images: list[Image.Image]):  # noqa: ANN201 - a torch tensor, lazily imported
        """Unit-length CLIP embeddings of pictures."""
        import torch

        with torch.inference_mode():
            inputs = self.processor(images=images, return_tensors="pt")
            features = projected(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        return torch.nn.functional.normalize(features, dim=-1)

    def text_features(self, texts: list[str]):  # noqa: ANN201 - a torch tensor, lazily imported
        """Unit-length CLIP embeddings of texts, cut to CLIP's 77 tokens."""
        import torch

        with torch.inference_mode():
            inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
            features = projected(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                              attention_mask=inputs["attention_mask"]))
        return torch.nn.functional.normalize(features, dim=-1)

    def marks(self, prompts: list[str], images: list[Image.Image]) -> Marks:
        """Mean cosine similarities: trigger samples to the references' mean, every sample to its prompt's rest."""
        import torch

        pictures = self.image_features([image.convert("RGB") for image in images])
        with_trigger = [i for i, p in enumerate(prompts) if self.trigger and self.trigger in p]
        likeness = None
        if with_trigger and self.reference is not None:
            reference = torch.nn.functional.normalize(self.reference, dim=-1)
            likeness = float((pictures[with_trigger] @ reference).mean())
        rests = [(i, without_trigger(p, self.trigger)) for i, p in enumerate(prompts)]
        rests = [(i, rest) for i, rest in rests if rest]
        following = None
        if rests:
            texts = self.text_features([rest for _, rest in rests])
            following = float((pictures[[i for i, _ in rests]] * texts).sum(-1).mean())
        return Marks(likeness, following)


def load_clip(source: str, trigger: str, references: list[Path]) -> ClipEvaluator:
    """CLIP from a local folder or a hub id, on the CPU; downloaded on first use like BLIP, with the same offline
    rules and messages."""
    from transformers import CLIPModel, CLIPProcessor

    from ..models import from_folder_or_hub, quiet_libraries

    quiet_libraries()

    def load(local_only: bool) -> ClipEvaluator:
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
        model = CLIPModel.from_pretrained(source, local_files_only=local_only).eval()
        return ClipEvaluator(model, processor, trigger, references)

    return from_folder_or_hub(
        load, source, "a CLIP model", "CLIP folder",
        "Connect to the internet for the first use (the weights are cached afterwards), or download it on a machine "
        f"that can: huggingface-cli download {source} --local-dir clip, copy that folder into the workspace and set "
        "the sample scorer to it.")


def make_evaluator(config: TrainConfig, demo_base: bool, references: list[Path]) -> Evaluator | None:
    """The run's evaluator: the demo's analysis on the demo base, CLIP elsewhere; None when scoring is off or the
    run has no sample prompts to score."""
    if config.scorer == "off" or not config.sample_prompts:
        return None
    if config.scorer == "auto" and demo_base:
        return DemoEvaluator(config.trigger_word)
    source = DEFAULT_CLIP if config.scorer in ("auto", "clip") else config.scorer
    return load_clip(source, config.trigger_word, references)


def tone(paths: list[Path]) -> tuple[float, float]:
    """Mean brightness and mean saturation (0-255) over a set of images."""
    brightness, saturation = [], []
    for path in paths:
        with Image.open(path) as img:
            brightness.append(ImageStat.Stat(img.convert("L")).mean[0])
            saturation.append(ImageStat.Stat(img.convert("HSV").getchannel("S")).mean[0])
    return sum(brightness) / len(brightness), sum(saturation) / len(saturation)


def overtraining_warning(first: list[Path], now: list[Path], when: str) -> str | None:
    """Advice when samples got much darker or more saturated than at epoch 0, the usual sign of a too-high rate."""
    if not first or not now:
        return None
    (b0, s0), (b1, s1) = tone(first), tone(now)
    symptoms = []
    if b0 > 0 and b1 < b0 * DARKER:
        symptoms.append(f"{100 - 100 * b1 / b0:.0f}% darker")
    if s0 > 0 and s1 > s0 * MORE_SATURATED:
        symptoms.append(f"{100 * s1 / s0 - 100:.0f}% more saturated")
    if not symptoms:
        return None
    return (f"The {when} samples are {' and '.join(symptoms)} than at epoch 0: the LoRA is probably overcooking. "
            f"Use an earlier epoch's file, or train again with a lower learning rate.")


def health(first: list[Path], now: list[Path]) -> tuple[float, str]:
    """1.0 while samples keep epoch 0's tone, less as they pass the darker or more-saturated line the
    over-training warning uses; and what went wrong, in words."""
    if not first or not now:
        return 1.0, ""
    (b0, s0), (b1, s1) = tone(first), tone(now)
    dark = (b1 / b0) / DARKER if b0 > 0 else 1.0
    saturated = (s0 * MORE_SATURATED) / s1 if s1 > 0 else 1.0
    notes = [text for value, text in ((dark, "darker"), (saturated, "more saturated")) if value < 1]
    return min(1.0, dark, saturated), " and ".join(notes)


@dataclass(frozen=True)
class EpochScores:
    """Everything known about one saved file: its held-out loss, its samples' likeness and following, and health."""

    epoch: int
    file: str
    validation_loss: float | None
    likeness: float | None
    following: float | None
    health: float
    health_note: str = ""

    def record(self) -> dict:
        """The scores as JSON."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> EpochScores:
        """Back from JSON (a resume state or recommendation.json)."""
        return cls(**{name: record.get(name) for name in cls.__dataclass_fields__})


def judge_samples(evaluator: Evaluator | None, prompts: list[str], paths: list[Path]) -> Marks:
    """Marks of one epoch's sample files (none without an evaluator)."""
    if evaluator is None or not paths:
        return Marks(None, None)
    pictures = []
    for path in paths:
        with Image.open(path) as image:
            pictures.append(image.convert("RGB"))
    return evaluator.marks(prompts[:len(pictures)], pictures)
