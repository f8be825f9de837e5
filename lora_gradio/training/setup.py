"""Setting a run up: its accelerator, its view of the base, its latents and fixed captions, and the LoRA layers on
the view; the loop (loop.py) trains what these return."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..dataset import TrainImage
from ..errors import UserError
from ..events import Emit, JobEvent
from ..views import encode_prompts, pipeline_view
from .clock import RunClock
from .config import TrainConfig
from .data import CachedImage, LatentStore, RunImages, cache_latents
from .network import add_lora_adapters, make_optimizer
from .validation import Validator, evaluation_count, timesteps_per_image

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from .scoring import Evaluator

T = TypeVar("T")
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def announce(config: TrainConfig, images: RunImages, emit: Emit) -> None:
    """What the run says before it loads anything: the data's problems, what is held out, doubtful settings."""
    for warning in images.scan.warnings:
        emit(JobEvent("warning", warning))
    emit(JobEvent("status", images.held_out_note))
    if config.optimizer == "prodigy" and config.unet_lr < 0.1:
        emit(JobEvent("warning", "Prodigy sets its own step size and expects learning rates near 1.0; "
                                 f"{config.unet_lr} will train very slowly."))


@contextmanager
def evaluating(pipe: StableDiffusionPipeline) -> Iterator[None]:
    """The view's UNet and text encoder in eval mode (no dropout) for a while, then back as they were."""
    unet_training, te_training = pipe.unet.training, pipe.text_encoder.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    try:
        yield
    finally:
        pipe.unet.train(unet_training)
        pipe.text_encoder.train(te_training)


def make_validator(pipe: StableDiffusionPipeline, images: RunImages, config: TrainConfig, scheduler: DDPMScheduler,
                   length: tuple[int, int], history: list, encode: Callable[[list[TrainImage]], list[CachedImage]],
                   ) -> Validator | None:
    """The held-out images' scorer (None without any): their latents, apart from the training ones, and as many
    timesteps each as keep the evaluations within a tenth of the run's work."""
    if not images.held:
        return None
    epochs, steps = length
    timesteps = timesteps_per_image(len(images.held), evaluation_count(config, epochs, steps), steps,
                                    config.batch_size)
    return Validator.build(encode(images.held), config, scheduler, pipe.vae.config.scaling_factor, timesteps,
                           history)


def make_evaluator(config: TrainConfig, demo_base: bool, references: list[Path], emit: Emit) -> Evaluator | None:
    """The samples' judge for the recommendation. Where CLIP was left to ``auto`` and cannot be had (offline, say),
    the run goes on without it and says what the recommendation then rests on."""
    from .scoring import make_evaluator as evaluator_for

    try:
        return evaluator_for(config, demo_base, references)
    except UserError as exc:
        if config.scorer != "auto":
            raise
        emit(JobEvent("warning", f"No sample scorer: {exc} The recommended epoch rests on the validation loss "
                                 "alone, and the strength stays 1."))
        return None


def precision_group(config: TrainConfig) -> str:
    """The mixed precision a run trains in on this machine (fp16 needs CUDA): runs side by side in one process
    share accelerate's state, so they share this too."""
    mixed = "no" if config.mixed_precision == "fp32" else config.mixed_precision
    return "no" if mixed == "fp16" and not torch.cuda.is_available() else mixed


class ProcessRuns:
    """accelerate's state and the global random generators belong to the process: runs side by side (one per
    device) set up one at a time, and the state is made afresh only when no other run trains."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0

    @contextmanager
    def run(self, config: TrainConfig, emit: Emit, device: torch.device, build: Callable[[Accelerator], T],
            ) -> Iterator[T]:
        """What ``build`` makes of the run's accelerator (seeded: the run's LoRA starts from its own seed), made
        while no other run of the process sets up; the run counts as training until the block ends."""
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # this thread's "cuda", accelerate's too, is the run's own GPU
        with self._lock:
            built = build(make_accelerator(config, emit, fresh=not self._active))
            self._active += 1
        try:
            yield built
        finally:
            with self._lock:
                self._active -= 1


RUNS = ProcessRuns()


def make_accelerator(config: TrainConfig, emit: Emit, fresh: bool = True) -> Accelerator:
    """The run's accelerator (``fresh``: accelerate's state made anew; else the one the runs training now share,
    in the same precision); gradient accumulation is done by :meth:`Trainer.train_step`, not by accelerate."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    mixed = precision_group(config)
    if mixed != config.mixed_precision and config.mixed_precision == "fp16":
        emit(JobEvent("warning", "fp16 mixed precision needs a CUDA GPU; training in fp32 on this device."))
    if fresh:
        AcceleratorState._reset_state()  # a long-running app trains many times, with different precisions
    accelerator = Accelerator(mixed_precision=mixed)
    set_seed(config.seed)
    return accelerator


def prepare(pipe: StableDiffusionPipeline, config: TrainConfig, accelerator: Accelerator, groups: list[dict],
            total_steps: int, emit: Emit) -> tuple[list[torch.nn.Module], Any, Any, torch.nn.Module, bool]:
    """The optimizer and its schedule, handed to accelerate with the trained models; the UNet compiled if asked.
    Returns the prepared models, optimizer and schedule, the UNet to call, and whether it compiles on first use."""
    from diffusers.optimization import get_scheduler

    processes = accelerator.num_processes
    optimizer = make_optimizer(config, groups)
    # accelerate steps a prepared schedule once per process at every step, so its lengths scale the same way
    schedule = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * processes,
                             num_training_steps=total_steps * processes, num_cycles=config.lr_cycles)
    models = [pipe.unet, pipe.text_encoder] if config.train_text_encoder else [pipe.unet]
    *trained, optimizer, schedule = accelerator.prepare(*models, optimizer, schedule)
    unet, compiling = trained[0], config.compile_unet and accelerator.device.type == "cuda"
    if compiling:
        emit(JobEvent("status", "Compiling the UNet: the first step takes a minute or two"))
        unet = torch.compile(unet)
    elif config.compile_unet:
        emit(JobEvent("warning", "Compiling the UNet needs a CUDA GPU; training without it."))
    return trained, optimizer, schedule, unet, compiling


def working_view(pipe: StableDiffusionPipeline, config: TrainConfig, device: torch.device, dtype: torch.dtype
                 ) -> StableDiffusionPipeline:
    """The run's view of the base on its device and in its precision, with the fast attention and layout."""
    view = pipeline_view(pipe, device, dtype)  # frozen weights shared, or copies
    if config.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        view.unet.set_attn_processor(AttnProcessor2_0())
    if device.type == "cuda":  # convolutions run fastest in NHWC on tensor cores
        view.unet.to(memory_format=torch.channels_last)
    return view


def encode_images(pipe: StableDiffusionPipeline, images: list[TrainImage], config: TrainConfig,
                  latent_cache: Path | None, clock: RunClock | None, emit: Emit, stop: threading.Event,
                  ) -> list[CachedImage]:
    """Every image's latents (from the disk cache where it has them), timed for later estimates by ``clock``."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    prior = sum(image.prior for image in images)
    regular = f" and {prior} regularisation images" if prior else ""
    emit(JobEvent("status", f"Encoding {len(images) - prior} images{regular} to latents"))
    store = LatentStore(latent_cache, pipe.vae, dtype) if latent_cache else None
    started = time.perf_counter()
    cached = cache_latents(pipe.vae, images, config.resolution, config.enable_buckets, config.flip_augment,
                           device, dtype, store, stop=stop)
    encoded = (store.written if store else len(cached)) * (2 if config.flip_augment else 1)
    if clock is not None:
        clock.encoded(time.perf_counter() - started, encoded)
    if store:
        emit(JobEvent("status", f"Latents: {store.read} read from the disk cache, {store.written} encoded "
                                     "and stored"))
    too_long = [i.path.name for i in images if len(pipe.tokenizer(i.caption).input_ids) > 77]
    if too_long:
        emit(JobEvent("warning", f"{len(too_long)} captions are longer than 75 tokens and will be cut "
                                      f"(first: {too_long[0]}). Shorten them so the end is learned too."))
    return cached


def encode_fixed_captions(pipe: StableDiffusionPipeline, cached: list[CachedImage], config: TrainConfig
                          ) -> dict[str, torch.Tensor]:
    """Captions that never change (a frozen text encoder, no shuffling) encoded once; empty otherwise."""
    if config.train_text_encoder or config.shuffle_caption:
        return {}
    with torch.no_grad():
        captions = sorted({c.caption for c in cached} | {""})
        encoded = encode_prompts(pipe.text_encoder, pipe.tokenizer, captions, config.clip_skip)
        return dict(zip(captions, encoded, strict=True))


def attach_network(pipe: StableDiffusionPipeline, config: TrainConfig) -> list[dict]:
    """The LoRA (LoCon, DoRA) layers on the view, in training mode; their optimizer groups."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    groups = add_lora_adapters(unet, text_encoder, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.activation_checkpointing_enable()
    unet.train()
    text_encoder.train(config.train_text_encoder)
    return groups
