"""The kohya LoRA file format for SD1.x: key names, ``ss_*`` metadata and hashes, export and import.

Convention (kohya sd-scripts ``networks/lora.py``, read by ComfyUI, A1111/Forge and diffusers): a LoRA on the module at
diffusers path ``P`` of the UNet is stored as ``lora_unet_{P with '.' -> '_'}.lora_down.weight`` (A, rank x in),
``.lora_up.weight`` (B, out x rank) and ``.alpha`` (a scalar; the applied scale is alpha / rank). Text-encoder modules
use ``lora_te_text_model_{path below text_model}``. A DoRA layer adds ``.dora_scale``, its magnitude on the output axis.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_bytes_atomic
from ..dataset import split_tags
from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..dataset import TrainImage
    from ..models import BaseModelSpec
    from .config import TrainConfig
    from .data import CachedImage, RunImages
    from .validation import Score

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
ADAPTER = "default"


def kohya_module_name(component: str, module_path: str) -> str:
    """The kohya name of the module at ``module_path`` in the UNet or CLIP text encoder."""
    if component == "unet":
        return UNET_PREFIX + module_path.replace(".", "_")
    # transformers 5 flattened CLIPTextModel (no ``text_model.`` level); kohya names keep it.
    path = module_path.removeprefix("text_model.")
    return TEXT_ENCODER_PREFIX + "text_model_" + path.replace(".", "_")


def lora_layers(models: dict[str, torch.nn.Module]) -> Iterator[tuple[str, Any]]:
    """(kohya name, peft LoRA layer) for every trained module of the given components."""
    from peft.tuners.lora import LoraLayer

    for component, model in models.items():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                yield kohya_module_name(component, path), module


def lora_state_dict(models: dict[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Collect every peft LoRA layer of the given components as kohya tensors."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, module in lora_layers(models):
        down, up = module.lora_A[ADAPTER].weight.detach(), module.lora_B[ADAPTER].weight.detach()
        tensors[f"{name}.lora_down.weight"] = down.to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(module.lora_alpha[ADAPTER]), dtype=dtype)
        if ADAPTER in module.lora_magnitude_vector:
            base = module.get_base_layer().weight.detach()
            delta = lora_delta(down, up, module.scaling[ADAPTER], base.shape)
            magnitude = module.lora_magnitude_vector[ADAPTER].weight.detach()
            tensors[f"{name}.dora_scale"] = dora_scale(base, delta, magnitude).to("cpu", dtype).contiguous()
    return tensors


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """The weight change a LoRA pair makes, up · down · alpha/rank, in fp32 and the weight's shape (convs too)."""
    return (up.flatten(1).float() @ down.flatten(1).float()).reshape(shape) * scale


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row (each output channel of a conv)."""
    return weight.float().flatten(1).norm(dim=1)


def dora_scale(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude as the output-axis ``dora_scale`` ComfyUI and Forge read. They scale W + ΔW by
    dora_scale / ‖W‖ (the base rows' norms), peft by magnitude / ‖W + ΔW‖, so the file holds
    magnitude · ‖W‖ / ‖W + ΔW‖, shaped (out, 1, …) to broadcast over the weight: both then give the same layer."""
    scale = magnitude.float().flatten() * row_norms(weight) / row_norms(weight.float() + delta)
    return scale.reshape(-1, *[1] * (weight.dim() - 1))


def dora_magnitude(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`dora_scale`: peft's magnitude for a file's ``dora_scale`` on this base weight."""
    return scale.float().flatten() * row_norms(weight.float() + delta) / row_norms(weight)


def addnet_hashes(file_bytes: bytes) -> tuple[str, str]:
    """The ``sshs_model_hash`` (sha256 of the tensor data after the header) and ``sshs_legacy_hash`` pair.

    The legacy hash is the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB, as the A1111 Additional
    Networks extension computes it.
    """
    (header_len,) = struct.unpack("<Q", file_bytes[:8])
    model_hash = hashlib.sha256(file_bytes[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def encode_lora_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise tensors and metadata, adding the hash pair computed over the ``ss_*``-only file as kohya does."""
    from safetensors.torch import save

    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    model_hash, legacy_hash = addnet_hashes(save(tensors, training_only))
    return save(tensors, {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})


def save_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a kohya LoRA file atomically; an unwritable folder gives a message, never a partial file."""
    path = Path(path)
    try:
        write_bytes_atomic(path, encode_lora_file(tensors, metadata))
    except OSError as exc:
        raise UserError(f"Could not write the LoRA to '{path}': {exc.strerror or exc}. "
                        "Choose an output folder you can write to, with free space.") from exc
    return path


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> str:
    """``ss_tag_frequency``: per dataset folder, how often each comma-separated tag occurs (A1111 shows it)."""
    table: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts = table.setdefault(folder, {})
        for caption in captions:
            for tag in split_tags(caption):
                counts[tag] = counts.get(tag, 0) + 1
    return json.dumps(table, ensure_ascii=False)


def dataset_dirs(images: list[TrainImage]) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs``: each folder's repeats and image count."""
    folders: dict[str, dict[str, int]] = {}
    for item in images:
        folder = folders.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        folder["img_count"] += 1
    return folders


@dataclass(frozen=True)
class RunFacts:
    """What a run knows about itself when it saves a file, besides its settings."""

    started: float
    steps: int
    epoch: int
    num_epochs: int
    max_steps: int
    num_images: int  # images per epoch, repeats counted
    tag_frequency: str
    dataset_dirs: dict[str, dict[str, int]]  # folder -> {"n_repeats", "img_count"}
    buckets: dict[tuple[int, int], int]  # (width, height) -> images per epoch
    session_id: int
    reg_dataset_dirs: dict[str, dict[str, int]]
    num_reg_images: int  # regularisation images per epoch, repeats counted
    held_out: list[str]  # the images scored but never trained on, relative to their dataset
    validation_dataset: str  # the dataset they come from when it is not the trained one
    scores: list[Score] = field(default_factory=list)  # each save fills in the held-out scores so far


def run_facts(images: RunImages, cached: list[CachedImage], num_epochs: int, max_steps: int) -> RunFacts:
    """The facts a run's files record, gathered once when it starts; each save fills in its step, epoch and
    scores."""
    scan, prior = images.scan, images.prior
    captions_by_folder: dict[str, list[str]] = {}
    for item in scan.images:
        captions_by_folder.setdefault(item.folder, []).append(item.caption)
    buckets: dict[tuple[int, int], int] = {}
    for latent in cached:
        buckets[latent.bucket] = buckets.get(latent.bucket, 0) + latent.repeats
    return RunFacts(time.time(), 0, 0, num_epochs, max_steps, scan.total_repeats, tag_frequency(captions_by_folder),
                    dataset_dirs(scan.images), buckets, random.SystemRandom().randrange(2**31),  # kohya: one a session
                    dataset_dirs(prior), sum(item.repeats for item in prior),
                    [image.path.name for image in images.held], images.validation_dataset)


def network_args(config: TrainConfig) -> dict[str, str]:
    """``ss_network_args`` as kohya and LyCORIS write them: LoCon's conv rank and alpha, or DoRA's flags; and the
    block-wise settings."""
    if config.network_type == "locon":
        return {"conv_dim": str(config.conv_rank), "conv_alpha": str(config.conv_alpha), **block_args(config)}
    if config.network_type == "dora":
        return {"dora_wd": "True", "wd_on_output": "True", **block_args(config)}
    return block_args(config)


def block_args(config: TrainConfig) -> dict[str, str]:
    """kohya's network_args for the block-wise settings: ``block_dims``, ``block_alphas``, and ``block_lr`` as
    ``down_lr_weight`` (IN00–IN11), ``mid_lr_weight`` and ``up_lr_weight`` (OUT00–OUT11)."""
    from ..blocks import MID

    args = {}
    if config.block_dims:
        args["block_dims"] = ",".join(map(str, config.block_dims))
    if config.block_alphas:
        args["block_alphas"] = ",".join(f"{alpha:g}" for alpha in config.block_alphas)
    if config.block_lr:
        rates = [f"{rate:g}" for rate in config.block_lr]
        args |= {"down_lr_weight": ",".join(rates[:MID]), "mid_lr_weight": rates[MID],
                 "up_lr_weight": ",".join(rates[MID + 1:])}
    return args


def build_metadata(config: TrainConfig, base: BaseModelSpec, facts: RunFacts) -> dict[str, str]:
    """The ``ss_*`` metadata (kohya sd-scripts' names) and the ``modelspec.*`` fields of Stability AI's model spec
    that A1111/Forge, ComfyUI managers and model sites read, all as strings."""
    finished = time.time()
    buckets = {str(i): {"resolution": list(size), "count": count} for i, (size, count) in
               enumerate(sorted(facts.buckets.items()))}
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": config.output_name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished)),
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        **({"modelspec.trigger_phrase": config.trigger_word} if config.trigger_word else {}),
        "ss_session_id": str(facts.session_id),
        "ss_max_train_steps": str(facts.max_steps),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs, ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs, ensure_ascii=False),
        "ss_num_reg_images": str(facts.num_reg_images),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_bucket_info": json.dumps({"buckets": buckets}),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_network_args": json.dumps(network_args(config)),
        "ss_network_dropout": str(config.network_dropout or None),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": config.output_name,
        "ss_sd_model_name": base.display_name,
        "ss_training_started_at": str(facts.started),
        "ss_training_finished_at": str(finished),
        "ss_num_train_images": str(facts.num_images),
        "ss_steps": str(facts.steps),
        "ss_epoch": str(facts.epoch),
        "ss_num_epochs": str(facts.num_epochs),
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
        "ss_cache_latents": "True",  # always: each image is encoded once per run (on disk too with the setting)
        "ss_flip_aug": str(config.flip_augment),
        "ss_masked_loss": str(config.masked_loss),
        "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_scale_weight_norms": str(config.scale_weight_norms or None),
        "ss_ema_decay": str(config.ema_decay or None),
        "ss_noise_offset": str(config.noise_offset),
        "ss_multires_noise_iterations": str(config.multires_noise_iterations or None),
        "ss_multires_noise_discount": str(config.multires_noise_discount),
        "ss_loss_type": config.loss_type,
        "ss_huber_c": str(config.huber_c),
        "ss_huber_schedule": config.huber_schedule,
        "ss_debiased_estimation": str(config.debiased_estimation),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_seed": str(config.seed),
        "ss_clip_skip": str(config.clip_skip),
        "ss_tag_frequency": facts.tag_frequency,
        "ss_training_comment": f"trigger word: {config.trigger_word}" if config.trigger_word else "",
        **validation_metadata(config, facts),
    }


def validation_metadata(config: TrainConfig, facts: RunFacts) -> dict[str, str]:
    """``ss_validation_*``: which images were held out (or the dataset validated on), the seed of their fixed noise,
    and their loss at this file's step; nothing when the run held none out."""
    if not facts.held_out:
        return {}
    score = next((s for s in reversed(facts.scores) if s.step == facts.steps), None)
    return {"ss_validation_images": json.dumps(facts.held_out, ensure_ascii=False),
            "ss_validation_dataset": facts.validation_dataset, "ss_validation_seed": str(config.seed),
            **({"ss_validation_loss": f"{score.loss:.6f}"} if score else {})}
