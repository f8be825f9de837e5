"""The LoRA training loop: readable top to bottom, with progress events for the UI and the CLI."""

from __future__ import annotations

import io
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic import write_bytes_atomic
from ..dataset import DatasetScan, scan_training_folder
from ..errors import UserError
from ..models import BaseModelSpec, ModelCache, quiet_libraries
from . import kohya
from .config import TEXT_ENCODER_MODULES, TrainConfig
from .data import cache_latents, plan_epoch, process_caption, sample_latents
from .samples import overtraining_warning, render_samples

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

RESUME_FILE = "resume-state.pt"
CHECKPOINT_SECONDS = 600  # besides every epoch end, keep resume state at most this old
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainEvent:
    """One progress report. ``kind`` is status, warning, step, epoch, saved, samples, done, stopped or error."""

    kind: str
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    path: str | None = None
    paths: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    """What a run produced: the final LoRA, every saved file, and the loss history."""

    lora_path: Path | None
    saved: list[Path]
    steps: int
    epochs: int
    stopped: bool
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    it_per_s: float = 0.0
    peak_memory_gb: float | None = None  # CUDA only

    def summary(self) -> str:
        """One line for logs: steps, speed and peak GPU memory."""
        memory = f", peak GPU memory {self.peak_memory_gb:.2f} GB" if self.peak_memory_gb is not None else ""
        return f"{self.steps} steps in {self.epochs} epochs at {self.it_per_s:.2f} it/s{memory}"


def check_writable(folder: Path) -> None:
    """Fail before any work if the output folder cannot take files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"Cannot write to output folder '{folder}': {exc.strerror or exc}. "
                        "Choose a folder you have write access to.") from exc


def make_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The configured optimizer over per-component parameter groups (each with its own learning rate)."""
    if config.optimizer == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=fused or None)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("AdamW8bit needs bitsandbytes: pip install bitsandbytes, or pick adamw.") from exc
        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=config.weight_decay)
    from prodigyopt import Prodigy

    return Prodigy(groups, weight_decay=config.weight_decay, safeguard_warmup=True, use_bias_correction=True)


def build_metadata(config: TrainConfig, base: BaseModelSpec, started: float, steps: int, epoch: int,
                   num_images: int, tag_frequency: str) -> dict[str, str]:
    """The ``ss_*`` metadata A1111/Forge and other tools read, all as strings."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_args": "{}",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": config.output_name,
        "ss_sd_model_name": base.display_name,
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(time.time()),
        "ss_num_train_images": str(num_images),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(config.epochs),
        "ss_learning_rate": str(config.unet_lr),
        "ss_unet_lr": str(config.unet_lr),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_optimizer": config.optimizer,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.enable_buckets),
        "ss_flip_aug": str(config.flip_augment),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_seed": str(config.seed),
        "ss_clip_skip": "1",
        "ss_tag_frequency": tag_frequency,
        "ss_training_comment": f"trigger word: {config.trigger_word}" if config.trigger_word else "",
    }


def add_lora_adapters(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, config: TrainConfig) -> list[dict]:
    """Attach fresh LoRA layers (B = 0, so training starts from the base model) and return optimizer groups."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.unet_modules)))
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.unet_lr}]
    if config.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                            target_modules=TEXT_ENCODER_MODULES))
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad],
                       "lr": config.text_encoder_lr})
    cast_training_params([m for m in (unet, text_encoder) if m is not None], dtype=torch.float32)
    return groups


def train(config: TrainConfig, base: BaseModelSpec, data_dir: Path, output_dir: Path,
          on_event: Callable[[TrainEvent], None] | None = None, stop: threading.Event | None = None,
          cache: ModelCache | None = None, resume: bool = False) -> TrainResult:
    """Train a LoRA on ``data_dir`` and save kohya files into ``output_dir``; ``stop`` ends it early with a save.

    With ``resume``, continue the interrupted run in ``output_dir`` from its saved state (same config and data).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    emit = on_event or (lambda event: None)
    stop = stop or threading.Event()
    output_dir = Path(output_dir)
    check_writable(output_dir)
    scan = scan_training_folder(Path(data_dir), config.trigger_word)
    for warning in scan.warnings:
        emit(TrainEvent("warning", warning))

    mixed = config.mixed_precision
    if mixed == "fp16" and not torch.cuda.is_available():
        emit(TrainEvent("warning", "fp16 mixed precision needs a CUDA GPU; training in fp32 on this device."))
        mixed = "no"
    AcceleratorState._reset_state()  # a long-running app trains many times, with different precisions
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=config.gradient_accumulation_steps)
    set_seed(config.seed)
    quiet_libraries()

    if config.optimizer == "prodigy" and config.unet_lr < 0.1:
        emit(TrainEvent("warning", "Prodigy sets its own step size and expects learning rates near 1.0; "
                                   f"{config.unet_lr} will train very slowly."))
    emit(TrainEvent("status", f"Loading base model {base.display_name}"))
    cache = cache or ModelCache()
    pipe = cache.pipeline(base)
    kohya.detach(pipe)  # a LoRA attached for testing must not become part of the base we train on
    try:
        with cache.busy("training"):
            return _train_on(pipe, config, base, scan, output_dir, accelerator, emit, stop, resume)
    finally:
        kohya.detach(pipe)  # the cached base goes back to clean, ready for the next job
        if config.gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
            pipe.text_encoder.activation_checkpointing_disable()
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            model.eval()
        accelerator.free_memory()


def _train_on(pipe: StableDiffusionPipeline, config: TrainConfig, base: BaseModelSpec, scan: DatasetScan,
              output_dir: Path, accelerator: Accelerator, emit: Callable[[TrainEvent], None],
              stop: threading.Event, resume: bool) -> TrainResult:
    """The loop proper, on an already loaded pipeline."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr

    weight_dtype = DTYPES[accelerator.mixed_precision]
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.to(accelerator.device, dtype=weight_dtype)
    if config.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())

    emit(TrainEvent("status", f"Encoding {len(scan.images)} images to latents"))
    cached = cache_latents(vae, scan.images, config.resolution, config.enable_buckets, config.flip_augment,
                           accelerator.device, weight_dtype)
    scaling = vae.config.scaling_factor
    if accelerator.device.type == "cuda":
        vae.to("cpu")  # its work is done: free the memory for the UNet

    def encode_text(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(accelerator.device)
        return text_encoder(ids)[0]

    too_long = [i.path.name for i in scan.images if len(tokenizer(i.caption).input_ids) > 77]
    if too_long:
        emit(TrainEvent("warning", f"{len(too_long)} captions are longer than 75 tokens and will be cut "
                                   f"(first: {too_long[0]}). Shorten them so the end is learned too."))
    text_cache: dict[str, torch.Tensor] = {}
    if not config.train_text_encoder and not config.shuffle_caption:
        with torch.no_grad():
            for caption in {c.caption for c in cached} | {""}:
                text_cache[caption] = encode_text([caption])[0]

    groups = add_lora_adapters(unet, text_encoder, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.activation_checkpointing_enable()
    unet.train()
    text_encoder.train(config.train_text_encoder)

    batches_per_epoch = len(plan_epoch(cached, config.batch_size, config.seed, 0, accelerator.process_index,
                                       accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs
    optimizer = make_optimizer(config, groups)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total_steps, num_cycles=config.lr_cycles)
    trained = [unet, text_encoder] if config.train_text_encoder else [unet]
    *trained, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    unet = trained[0]
    if config.train_text_encoder:
        text_encoder = trained[1]
    params = [p for g in groups for p in g["params"]]

    started = time.time()
    captions_by_folder: dict[str, list[str]] = {}
    for item in scan.images:
        captions_by_folder.setdefault(item.folder, []).append(item.caption)
    tag_frequency = kohya.tag_frequency(captions_by_folder)
    result = TrainResult(None, [], 0, 0, False, warnings=list(scan.warnings))
    generator = torch.Generator().manual_seed(config.seed)
    caption_rng = random.Random(config.seed)
    lora_params = trainable_parameters(accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder))
    start_epoch, skip_batches = 0, 0
    if resume:
        state = load_state(output_dir)
        start_epoch, skip_batches = state["epoch"], state["batches_in_epoch"]
        result.steps, result.losses = state["step"], list(state["losses"])
        for name, value in state["lora"].items():
            lora_params[name].data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        caption_rng.setstate(state["caption_rng"])
        emit(TrainEvent("status", f"Resuming at step {result.steps} (epoch {start_epoch + 1}, batch "
                                  f"{skip_batches + 1})", step=result.steps, total_steps=total_steps,
                        epoch=start_epoch, total_epochs=config.epochs))

    def save(name: str, epoch: int) -> Path:
        tensors = kohya.lora_state_dict(
            {"unet": accelerator.unwrap_model(unet), "text_encoder": accelerator.unwrap_model(text_encoder)},
            DTYPES[config.save_dtype])
        metadata = build_metadata(config, base, started, result.steps, epoch, scan.total_repeats, tag_frequency)
        path = kohya.save_lora(output_dir / f"{name}.safetensors", tensors, metadata)
        result.saved.append(path)
        emit(TrainEvent("saved", f"Saved {path.name}", step=result.steps, total_steps=total_steps, epoch=epoch,
                        total_epochs=config.epochs, path=str(path)))
        return path

    def checkpoint(epoch: int, batches_in_epoch: int) -> None:
        save_state(output_dir, {
            "step": result.steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "losses": result.losses,
            "lora": {k: v.detach().float().cpu() for k, v in lora_params.items()},
            "optimizer": optimizer.state_dict(), "scheduler": lr_scheduler.state_dict(),
            "generator": generator.get_state(), "caption_rng": caption_rng.getstate()})

    sample_dir = output_dir / "samples"
    first_samples: list[Path] = sorted(sample_dir.glob("epoch0000-*.png")) if resume else []

    def samples(epoch: int) -> list[Path]:
        if not config.sample_prompts or not accelerator.is_main_process:
            return []
        emit(TrainEvent("status", f"Rendering sample images for epoch {epoch}"))
        vae_device = pipe.vae.device
        pipe.vae.to(accelerator.device)
        paths = render_samples(pipe, list(config.sample_prompts), config.seed, config.sample_steps, sample_dir,
                               epoch)
        pipe.vae.to(vae_device)
        emit(TrainEvent("samples", f"Samples for epoch {epoch}", epoch=epoch, total_epochs=config.epochs,
                        paths=[str(p) for p in paths]))
        warning = overtraining_warning(first_samples, paths, epoch)
        if warning:
            emit(TrainEvent("warning", warning, epoch=epoch))
        return paths

    emit(TrainEvent("status", f"Training {total_steps} steps ({config.epochs} epochs of {steps_per_epoch})",
                    total_steps=total_steps, total_epochs=config.epochs))
    if not first_samples:
        first_samples = samples(0)
    step_times: list[float] = []
    tick = time.perf_counter()
    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        plan = plan_epoch(cached, config.batch_size, config.seed, epoch, accelerator.process_index,
                          accelerator.num_processes)
        done_in_epoch = skip_batches if epoch == start_epoch else 0
        for batch in plan[done_in_epoch:]:
            items = [cached[i] for i in batch]
            done_in_epoch += 1
            with accelerator.accumulate(*trained):
                latents = sample_latents(items, generator, scaling).to(accelerator.device, weight_dtype)
                noise = torch.randn(latents.shape, generator=generator).to(latents)
                if config.noise_offset:
                    offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator)
                    noise += config.noise_offset * offset.to(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(items),),
                                          generator=generator).to(accelerator.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                captions = [process_caption(i.caption, caption_rng, config.shuffle_caption, config.keep_tokens,
                                            config.caption_dropout) for i in items]
                with accelerator.autocast():
                    hidden = torch.stack([text_cache[c] for c in captions]) if text_cache else encode_text(captions)
                    pred = unet(noisy, timesteps, hidden.to(weight_dtype)).sample
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
                if config.min_snr_gamma:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weight = snr.clamp(max=config.min_snr_gamma) / snr
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        weight = snr.clamp(max=config.min_snr_gamma) / (snr + 1)
                    loss = loss * weight
                loss = loss.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            value = accelerator.gather(loss.detach()).mean().item()
            if not math.isfinite(value):
                emit(TrainEvent("error", "The loss became NaN/inf: training stopped and the last saved epoch kept. "
                                         "Lower the learning rate, or use bf16 instead of fp16."))
                raise UserError(f"Training diverged at step {result.steps + 1} (loss {value}). "
                                "Lower the learning rate, or use bf16 instead of fp16.")
            result.steps += 1
            result.losses.append(value)
            now = time.perf_counter()
            step_times.append(now - tick)
            tick = now
            recent = step_times[-20:]
            rate = result.it_per_s = len(recent) / sum(recent)
            emit(TrainEvent("step", step=result.steps, total_steps=total_steps, epoch=epoch + 1,
                            total_epochs=config.epochs, loss=value, lr=lr_scheduler.get_last_lr()[0], it_per_s=rate,
                            eta_s=(total_steps - result.steps) / rate))
            if stop.is_set():
                break
            if accelerator.is_main_process and time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                checkpoint(epoch, done_in_epoch)
                last_checkpoint = time.monotonic()
        result.epochs = epoch + 1
        if stop.is_set():
            result.stopped = True
            if accelerator.is_main_process:
                checkpoint(epoch, done_in_epoch)
            break
        emit(TrainEvent("epoch", f"Epoch {epoch + 1}/{config.epochs} done", step=result.steps,
                        total_steps=total_steps, epoch=epoch + 1, total_epochs=config.epochs))
        last = epoch + 1 == config.epochs
        if accelerator.is_main_process:
            checkpoint(epoch + 1, 0)
            last_checkpoint = time.monotonic()
            if not last and config.save_every_n_epochs and (epoch + 1) % config.save_every_n_epochs == 0:
                save(f"{config.output_name}-{epoch + 1:06d}", epoch + 1)
                samples(epoch + 1)

    if accelerator.device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    if accelerator.is_main_process:
        result.lora_path = save(config.output_name, result.epochs)
        if not result.stopped:
            samples(result.epochs)
            state_path(output_dir).unlink(missing_ok=True)  # finished: nothing left to resume
    accelerator.wait_for_everyone()
    emit(TrainEvent("stopped" if result.stopped else "done",
                    f"{'Stopped' if result.stopped else 'Finished'} after {result.steps} steps: {result.lora_path}",
                    step=result.steps, total_steps=total_steps, epoch=result.epochs, total_epochs=config.epochs,
                    path=str(result.lora_path) if result.lora_path else None))
    return result


def trainable_parameters(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters by a stable name, for resume state."""
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    named.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    return named


def state_path(output_dir: Path) -> Path:
    """Where an unfinished run keeps what it needs to resume."""
    return Path(output_dir) / RESUME_FILE


def save_state(output_dir: Path, state: dict) -> None:
    """Write the resume state atomically, so a kill mid-write leaves the previous one."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(state_path(output_dir), buffer.getvalue())


def load_state(output_dir: Path) -> dict:
    """The resume state of an interrupted run, or a clear message when there is none."""
    path = state_path(output_dir)
    if not path.is_file():
        raise UserError(f"There is nothing to resume in '{output_dir}': no {RESUME_FILE} (the run finished, "
                        "or never saved an epoch).")
    return torch.load(path, map_location="cpu", weights_only=True)
