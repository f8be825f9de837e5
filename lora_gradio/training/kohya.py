"""The kohya LoRA file format for SD1.x: key names, ``ss_*`` metadata and hashes, export and import.

Convention (kohya sd-scripts ``networks/lora.py``, read by ComfyUI, A1111/Forge and diffusers): a LoRA on the module at
diffusers path ``P`` of the UNet is stored as ``lora_unet_{P with '.' -> '_'}.lora_down.weight`` (A, rank x in),
``.lora_up.weight`` (B, out x rank) and ``.alpha`` (a scalar; the applied scale is alpha / rank). Text-encoder modules
use ``lora_te_text_model_{path below text_model}``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_bytes_atomic
from ..dataset import split_tags
from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

    from ..models import BaseModelSpec
    from .config import TrainConfig

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
ADAPTER = "default"
ATTACHED = "_lora_gradio_attached"  # on a pipeline: (file, mtime) of the LoRA attached for testing


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
        tensors[f"{name}.lora_down.weight"] = module.lora_A[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = module.lora_B[ADAPTER].weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(module.lora_alpha[ADAPTER]), dtype=dtype)
    return tensors


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


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with a clear message for files that are not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise UserError(f"'{path.name}' is not a readable .safetensors LoRA ({exc}).") from exc
    return tensors, metadata


def module_table(pipe: StableDiffusionPipeline) -> dict[str, tuple[str, str]]:
    """Every kohya module name this pipeline can take, mapped to (component, module path)."""
    import torch

    table = {}
    for component in ("unet", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".base_layer" not in path \
                    and ".lora_" not in path:
                table[kohya_module_name(component, path)] = (component, path)
    return table


def check_compatible(tensors: dict[str, torch.Tensor], pipe: StableDiffusionPipeline, name: str) -> None:
    """Refuse a LoRA whose modules this base model lacks (another architecture), instead of half-loading it."""
    table = module_table(pipe)
    modules = {k.split(".")[0] for k in tensors if k.endswith(".lora_down.weight")}
    if not modules:
        raise UserError(f"'{name}' holds no kohya LoRA weights (no '.lora_down.weight' keys).")
    missing = sorted(modules - table.keys())
    if missing:
        hint = "SDXL" if any("input_blocks" in m or "_te1_" in m or "_te2_" in m for m in missing) else "another model"
        raise UserError(
            f"'{name}' does not fit this SD1.x base model: {len(missing)} of its {len(modules)} modules do not exist "
            f"here (first: {missing[0]}). It was probably trained for {hint}; use an SD1.x LoRA."
        )


def load_lora_into(pipe: StableDiffusionPipeline, path: Path, adapter_name: str) -> dict[str, str]:
    """Load a kohya SD1.x LoRA (ours or anyone's) as a peft adapter on the pipeline; returns its metadata."""
    tensors, metadata = read_lora(path)
    check_compatible(tensors, pipe, Path(path).name)
    pipe.load_lora_weights(dict(tensors), adapter_name=adapter_name)
    return metadata


def attach(pipe: StableDiffusionPipeline, path: Path | None, adapter_name: str) -> None:
    """Make ``path`` the pipeline's only LoRA (None: none), reusing it when that same file is already attached.

    Strength changes then cost nothing but ``set_adapters``; the base weights are never touched.
    """
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns) if path is not None else None
    if getattr(pipe, ATTACHED, None) == key:
        return
    detach(pipe)
    if path is not None:
        load_lora_into(pipe, Path(path), adapter_name)
        setattr(pipe, ATTACHED, key)


def detach(pipe: StableDiffusionPipeline) -> None:
    """Remove every LoRA layer, leaving the clean base model (before training reuses it, say)."""
    pipe.unload_lora_weights()
    setattr(pipe, ATTACHED, None)


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> str:
    """``ss_tag_frequency``: per dataset folder, how often each comma-separated tag occurs (A1111 shows it)."""
    table: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts = table.setdefault(folder, {})
        for caption in captions:
            for tag in split_tags(caption):
                counts[tag] = counts.get(tag, 0) + 1
    return json.dumps(table, ensure_ascii=False)


def build_metadata(config: TrainConfig, base: BaseModelSpec, started: float, steps: int, epoch: int,
                   num_images: int, tag_frequency: str) -> dict[str, str]:
    """The ``ss_*`` metadata (kohya sd-scripts' names) that A1111/Forge and other tools read, all as strings."""
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
