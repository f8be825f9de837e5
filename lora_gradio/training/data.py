"""Turning a dataset scan into training batches: aspect-ratio buckets, caption handling, cached latents."""

from __future__ import annotations

import hashlib
import math
import random
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from ..atomic import write_bytes_atomic
from ..buckets import fit_to_bucket, make_buckets, pick_bucket
from ..dataset import DatasetScan, TrainImage, open_rgb, oriented_size, scan_training_folder, split_tags
from ..errors import Stopped, UserError
from ..masks import open_mask

MAX_REPEATS = 1000
AUTO_HELD_OUT = -1  # validation_images: hold out 10% of a dataset of 15 or more, from 2 to 5
MIN_HELD_OUT_DATASET = 15  # below this, holding images out costs the training more than the numbers are worth
AUTO_SHARE, AUTO_LEAST, AUTO_MOST = 0.10, 2, 5
KEEP_TRAINING = 5  # a chosen hold-out must leave this many images to train on
LATENT_CACHE = ".latent-cache"  # in the images folder; hidden, so no scan takes it for images

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from .config import TrainConfig


def held_out_count(images: int, setting: int) -> int:
    """How many of a dataset's images a run holds out: ``setting`` itself, or (``AUTO_HELD_OUT``) 10% of 15 or
    more, from 2 to 5, and none below 15."""
    if setting != AUTO_HELD_OUT:
        return setting
    if images < MIN_HELD_OUT_DATASET:
        return 0
    return min(AUTO_MOST, max(AUTO_LEAST, round(images * AUTO_SHARE)))


def split_held_out(images: list[TrainImage], setting: int, seed: int) -> tuple[list[TrainImage], list[TrainImage]]:
    """The images to train on and the ones held out, picked by the run's seed (the same run holds out the same
    ones); both keep the dataset's order."""
    count = held_out_count(len(images), setting)
    if count and len(images) - count < KEEP_TRAINING:
        raise UserError(f"Holding out {count} of {len(images)} images leaves fewer than {KEEP_TRAINING} to train on. "
                        "Hold out fewer ('Held-out images'), pick a validation dataset instead, or set it to -1 (10% "
                        f"of datasets of {MIN_HELD_OUT_DATASET} images or more).")
    picked = set(random.Random(seed).sample(range(len(images)), count))
    return ([image for index, image in enumerate(images) if index not in picked],
            [image for index, image in enumerate(images) if index in picked])


@dataclass
class RunImages:
    """What a run does with its data: the images it trains on, the regularisation images, the held-out images it
    scores but never trains on, and a sentence saying which those are, or why there are none."""

    scan: DatasetScan
    prior: list[TrainImage]
    held: list[TrainImage]
    held_out_note: str
    validation_dataset: str = ""  # the dataset the held-out images come from, when it is not the trained one


@dataclass(frozen=True)
class TrainData:
    """What a run trains on: a folder of images with their captions, Prepare's copies of them, an optional second
    dataset of regularisation images (prior preservation), how often an epoch shows the top-level images, and an
    optional dataset of the same subject to validate on instead of held-out images."""

    images: Path
    prepared: Path | None = None
    regularization: Path | None = None
    repeats: int = 1
    validation: Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or \
                not 1 <= self.repeats <= MAX_REPEATS:
            raise UserError(f"repeats = {self.repeats!r}: use a whole number from 1 to {MAX_REPEATS} (how often an "
                            "epoch shows each image).")
        if self.regularization is not None and Path(self.regularization).resolve() == Path(self.images).resolve():
            raise UserError("The regularisation images must be another dataset than the one trained on: a set of "
                            "plain pictures of the class (e.g. 'a photo of a woman'), without your subject.")
        if self.validation is not None and Path(self.validation).resolve() in \
                {Path(folder).resolve() for folder in (self.images, self.regularization) if folder is not None}:
            raise UserError("The validation dataset must be another dataset than the ones trained on: other photos "
                            "of the same subject, which the run scores but never trains on.")

    @property
    def latent_cache(self) -> Path:
        """Where ``cache_latents_to_disk`` keeps this data's latents between runs."""
        return Path(self.images) / LATENT_CACHE

    def scan(self, config: TrainConfig) -> RunImages:
        """The training images (with every problem found), the regularisation images balanced against them (their
        captions stay as they are, without the trigger word), and the held-out images: the validation dataset's,
        or some of this one's, picked by the run's seed."""
        scan = scan_training_folder(self.images, config.trigger_word, self.prepared, self.repeats, config.masked_loss)
        if self.validation is not None:
            held = scan_training_folder(self.validation, config.trigger_word).images
            where = self.validation.parent.name if self.validation.name == "images" else \
                f"{self.validation.parent.name}/{self.validation.name}"
            note = f"Validating on dataset {where} ({len(held)} images)"
        else:
            scan.images, held = split_held_out(scan.images, config.validation_images, config.seed)
            names = ", ".join(str(image.path.name) for image in held[:6]) + (" …" if len(held) > 6 else "")
            note = f"Held out for validation, {len(held)} of {len(scan.images) + len(held)} images: {names}"
        if held:
            note += ". They never train; their loss is measured at every save."
        elif config.validation_images == 0:
            note = "No held-out images (Held-out images is 0): every image trains, and nothing measures overfitting."
        else:
            note = (f"No held-out images: {len(scan.images)} images is under {MIN_HELD_OUT_DATASET}, so every one "
                    "trains. Pick a validation dataset of the same subject to measure overfitting.")
        other = self.validation.parent.name if self.validation is not None else ""
        if self.regularization is None:
            return RunImages(scan, [], held, note, other)
        regular = scan_training_folder(self.regularization)
        scan.warnings += [f"Regularisation images: {warning}" for warning in regular.warnings]
        return RunImages(scan, prior_images(regular.images, scan.total_repeats), held, note, other)


def prior_images(regular: list[TrainImage], count: int) -> list[TrainImage]:
    """Regularisation images balanced as kohya does: each with its folder's repeats, in order, until an epoch holds
    ``count`` of them (the training images, repeats counted); when they run out first, one more each in turn."""
    repeats: list[int] = []
    for image in regular:
        if sum(repeats) >= count:
            break
        repeats.append(image.repeats)
    for turn in range(max(count - sum(repeats), 0)):
        repeats[turn % len(repeats)] += 1
    return [replace(image, repeats=times, prior=True) for image, times in zip(regular, repeats, strict=False)]


class Bucketed(Protocol):
    """What batching needs of an image: its bucket and how often an epoch shows it."""

    bucket: tuple[int, int]
    repeats: int


@dataclass
class PlannedImage:
    """An image's bucket and repeats, read from its header: enough to count steps before anything is encoded."""

    bucket: tuple[int, int]
    repeats: int


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB to a CHW float tensor in [-1, 1], the VAE's input range."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def process_caption(caption: str, rng: random.Random, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout, then tag shuffle that keeps the first ``keep_tokens`` comma-separated tags in place."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


@dataclass
class CachedImage:
    """An image's VAE latent distribution (mean and log-variance), encoded once and sampled every step."""

    latent_params: list[torch.Tensor]  # one per variant: as is, and mirrored when flip augmentation is on
    caption: str
    bucket: tuple[int, int]
    repeats: int
    prior: bool = False
    masks: list[torch.Tensor] | None = None  # with masked loss: each variant's mask at the latents' size, in [0, 1]


def latent_masks(source: Path, bucket: tuple[int, int], size: tuple[int, int], flip: bool) -> list[torch.Tensor]:
    """An image's loss mask cropped like its pixels to ``bucket``, then averaged down to the latents' ``size``
    (width, height): a pixel of the latents counts as much as its 8×8 patch of the picture does."""
    mask = fit_to_bucket(open_mask(source), bucket).resize(size, Image.Resampling.BOX)
    values = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(1, size[1], size[0]) / 255
    return [values, values.flip(-1)] if flip else [values]


class LatentStore:
    """Latents kept on disk between runs, one file per image and setting, named by a hash of all they depend on: the
    image file's bytes, its bucket at this resolution, mirroring, and the VAE's weights and precision. A changed
    image or another VAE gets another name, so a stale entry is never read; a damaged one is encoded again."""

    def __init__(self, folder: Path, vae: AutoencoderKL, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        digest = hashlib.sha256(str(dtype).encode())
        for name, tensor in sorted({**vae.encoder.state_dict(), **vae.quant_conv.state_dict()}.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.vae_key = digest.hexdigest()
        self.read = self.written = 0

    def key(self, path: Path, resolution: int, bucket: tuple[int, int], flip: bool) -> str:
        """The entry name of one image under these settings."""
        digest = hashlib.sha256(Path(path).read_bytes())
        digest.update(f"{resolution}|{bucket}|{flip}|{self.vae_key}".encode())
        return digest.hexdigest()[:40]

    def load(self, key: str) -> list[torch.Tensor] | None:
        """The stored latent parameters of an entry, or None when there is none (or it cannot be read)."""
        from safetensors.torch import load_file

        path = self.folder / f"{key}.safetensors"
        try:
            stored = load_file(path) if path.is_file() else None
        except Exception:  # a damaged entry (any error of the reader): encoded again and rewritten
            return None
        if stored is None:
            return None
        self.read += 1
        return [stored[str(index)] for index in range(len(stored))]

    def save(self, key: str, params: list[torch.Tensor]) -> None:
        """Keep an entry; a full disk only costs the encoding next time."""
        from safetensors.torch import save

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.folder / f"{key}.safetensors",
                               save({str(index): p.cpu().contiguous() for index, p in enumerate(params)}))
        except OSError:
            return
        self.written += 1


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, images: list[TrainImage], resolution: int, buckets_enabled: bool, flip: bool,
                  device: torch.device, dtype: torch.dtype, store: LatentStore | None = None,
                  stop: threading.Event | None = None,
                  ) -> list[CachedImage]:
    """Encode every image once (or read it from ``store``); each training step then samples from the stored
    distribution, which stays on ``device``. ``stop`` ends the encoding between two images."""
    buckets = make_buckets(resolution, buckets_enabled)
    cached = []
    for index, item in enumerate(images):
        if stop is not None and stop.is_set():
            raise Stopped(f"Stopped while encoding the images ({index} of {len(images)} done); nothing was "
                            "trained yet.")
        bucket = pick_bucket(oriented_size(item.path), buckets)
        key = store.key(item.path, resolution, bucket, flip) if store else ""
        params = store.load(key) if store else None
        if params is None:
            pixels = to_tensor(fit_to_bucket(open_rgb(item.path), bucket))
            variants = [pixels, pixels.flip(-1)] if flip else [pixels]
            params = list(vae.encode(torch.stack(variants).to(device, dtype)).latent_dist.parameters.float())
            if store:
                store.save(key, params)
        masks = None if item.mask is None else [m.to(device) for m in latent_masks(
            item.mask, bucket, (params[0].shape[-1], params[0].shape[-2]), flip)]
        cached.append(CachedImage([p.to(device) for p in params], item.caption, bucket, item.repeats, item.prior,
                                  masks))
    return cached


def plan_epoch(cached: Sequence[Bucketed], batch_size: int, seed: int, epoch: int,
               process_index: int = 0, num_processes: int = 1) -> list[list[int]]:
    """This process's batches for one epoch: same-bucket images, repeats included, in a seeded order.

    The order depends only on (seed, epoch), so a resumed run replays exactly the batches it missed.
    """
    rng = random.Random(seed * 100_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, item in enumerate(cached):
        by_bucket[item.bucket].extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches.extend(indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
    rng.shuffle(batches)
    if batches and len(batches) < num_processes:  # each process needs a batch, or the others wait for it forever
        batches = [batches[index % len(batches)] for index in range(num_processes)]
    usable = len(batches) // num_processes * num_processes
    return batches[:usable][process_index::num_processes]


def plan_images(images: list[TrainImage], resolution: int, buckets_enabled: bool) -> list[PlannedImage]:
    """Buckets from image headers, the same ones :func:`cache_latents` will pick after decoding."""
    buckets = make_buckets(resolution, buckets_enabled)
    return [PlannedImage(pick_bucket(oriented_size(item.path), buckets), item.repeats) for item in images]


def steps_per_epoch(images: Sequence[Bucketed], batch_size: int, accumulation: int, num_processes: int = 1) -> int:
    """Optimizer steps in one epoch of one process: its batches, ``accumulation`` of them per step.

    The only step count: the estimate, the progress bar and the learning-rate schedule all use it.
    """
    return math.ceil(len(plan_epoch(images, batch_size, 0, 0, 0, num_processes)) / accumulation)


def run_length(per_epoch: int, epochs: int, max_train_steps: int = 0) -> tuple[int, int]:
    """The run's epochs and optimizer steps: ``epochs`` of ``per_epoch`` steps, or, with ``max_train_steps``, as
    many epochs as those steps start (the last one cut short)."""
    if max_train_steps:
        return math.ceil(max_train_steps / max(per_epoch, 1)), max_train_steps
    return epochs, per_epoch * epochs


def sample_latents(cached: Iterable[CachedImage], generator: torch.Generator, rng: random.Random, scaling: float,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw latents for a batch from the cached distributions, on their device with ``generator``; ``rng`` picks
    the mirrored variant when there are two, so nothing waits for the GPU. With them, the batch's loss masks (ones
    for an image without one); else None."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    cached, picked, masks = list(cached), [], []
    for item in cached:
        variant = rng.randrange(len(item.latent_params))
        params = item.latent_params[variant].unsqueeze(0)
        picked.append(DiagonalGaussianDistribution(params).sample(generator=generator))
        masks.append(item.masks[variant] if item.masks else torch.ones_like(params[:, :1])[0])
    latents = torch.cat(picked) * scaling
    return latents, (torch.stack(masks) if any(item.masks for item in cached) else None)
