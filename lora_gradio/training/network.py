"""The LoRA layers a run trains and the optimizer over them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .config import TEXT_ENCODER_MODULES, TrainConfig

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel


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


def trainable_parameters(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters by a stable name, for resume state."""
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    named.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    return named


@torch.no_grad()
def apply_max_norm(models: list[torch.nn.Module], max_norm: float) -> int:
    """kohya's ``scale_weight_norms``: every LoRA layer whose update (up · down · alpha/rank) has a norm above
    ``max_norm`` has both factors scaled down alike until it does not; returns how many layers were scaled."""
    from peft.tuners.lora import LoraLayer

    scaled = 0
    for module in (m for model in models for m in model.modules() if isinstance(m, LoraLayer)):
        for adapter in module.lora_A:
            down, up = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            norm = (up.flatten(1) @ down.flatten(1)).norm() * module.scaling[adapter]
            if norm > max_norm:
                ratio = (max_norm / norm).sqrt()
                down.mul_(ratio)
                up.mul_(ratio)
                scaled += 1
    return scaled


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
