"""Turning a dataset scan into training batches: aspect-ratio buckets, caption handling, cached latents."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from ..buckets import fit_to_bucket, make_buckets, pick_bucket
from ..dataset import TrainImage, open_rgb, oriented_size, split_tags

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


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


@torch.no_grad()
def cache_latents(vae: AutoencoderKL, images: list[TrainImage], resolution: int, buckets_enabled: bool, flip: bool,
                  device: torch.device, dtype: torch.dtype,
                  progress: Callable[[int, int], None] | None = None) -> list[CachedImage]:
    """Encode every image once; each training step then samples from the stored distribution."""
    buckets = make_buckets(resolution, buckets_enabled)
    cached = []
    for index, item in enumerate(images):
        img = open_rgb(item.path)
        bucket = pick_bucket(img.size, buckets)
        pixels = to_tensor(fit_to_bucket(img, bucket))
        variants = [pixels, pixels.flip(-1)] if flip else [pixels]
        batch = torch.stack(variants).to(device, dtype)
        params = vae.encode(batch).latent_dist.parameters.float().cpu()
        cached.append(CachedImage(list(params), item.caption, bucket, item.repeats))
        if progress:
            progress(index + 1, len(images))
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
    usable = len(batches) // num_processes * num_processes or len(batches)
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


def sample_latents(cached: Iterable[CachedImage], generator: torch.Generator, scaling: float) -> torch.Tensor:
    """Draw latents for a batch from the cached distributions (random mirror variant when there are two)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    picked = []
    for item in cached:
        variant = int(torch.randint(len(item.latent_params), (1,), generator=generator))
        params = item.latent_params[variant].unsqueeze(0)
        picked.append(DiagonalGaussianDistribution(params).sample(generator=generator))
    return torch.cat(picked) * scaling
