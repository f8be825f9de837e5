"""The LoRA layers a run trains and the optimizer over them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..blocks import block_index
from ..errors import UserError
from .config import TEXT_ENCODER_MODULES, TrainConfig

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

# LoCon, as kohya's networks.lora with conv_dim: inside every ResBlock and down/upsampler, the linear and 1×1
# layers take the LoRA rank and the 3×3 convolutions the conv rank ('conv' is a down/upsampler's only layer)
LOCON_LINEAR = ["time_emb_proj", "conv_shortcut"]
LOCON_CONV = ["conv1", "conv2", "conv"]


def lora_config(config: TrainConfig, targets: list[str], ranks: dict[str, int] | None = None,
                alphas: dict[str, float] | None = None) -> LoraConfig:
    """The peft adapter for one component: the network type, rank, alpha and dropout of the settings, and the
    ranks and alphas of the layers (a name or a path) that differ."""
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, rank_pattern=ranks or {},
                      alpha_pattern=alphas or {}, lora_dropout=config.network_dropout,
                      use_dora=config.network_type == "dora")


def unet_adapter(unet: UNet2DConditionModel, config: TrainConfig) -> LoraConfig:
    """The UNet's adapter. With block-wise settings, each layer by its path, at its block's rank and alpha (LoCon's
    3×3 convolutions at the conv rank), leaving out the blocks whose rank or learning rate is 0."""
    locon = config.network_type == "locon"
    targets = list(config.unet_modules) + (LOCON_LINEAR + LOCON_CONV if locon else [])
    if not (config.block_dims or config.block_alphas or config.block_lr):
        return lora_config(config, targets, dict.fromkeys(LOCON_CONV, config.conv_rank) if locon else {},
                           dict.fromkeys(LOCON_CONV, config.conv_alpha) if locon else {})
    ranks, alphas = {}, {}
    for path, _ in unet.named_modules():
        leaf = next((target for target in targets if path == target or path.endswith(f".{target}")), None)
        block = block_index(path)
        if leaf is None or block is None or (config.block_lr and not config.block_lr[block]):
            continue
        conv = leaf in LOCON_CONV
        rank = config.conv_rank if conv else config.block_dims[block] if config.block_dims else config.rank
        if rank:
            ranks[path] = rank
            alphas[path] = config.conv_alpha if conv else \
                config.block_alphas[block] if config.block_alphas else config.alpha
    if not ranks:
        raise UserError("The block-wise settings leave no layer to train: give some block a rank and a learning "
                        "rate above 0.")
    return lora_config(config, list(ranks), ranks, alphas)


def unet_groups(unet: UNet2DConditionModel, config: TrainConfig) -> list[dict]:
    """The UNet's optimizer groups: one at the UNet learning rate, or with ``block_lr`` one per rate, the fastest
    first (the rate the loss chart shows)."""
    trained = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    rates: dict[float, list[torch.nn.Parameter]] = {}
    for name, parameter in trained:
        block = block_index(name) if config.block_lr else None
        rates.setdefault(config.unet_lr * (config.block_lr[block] if block is not None else 1.0), []).append(parameter)
    return [{"params": rates[rate], "lr": rate} for rate in sorted(rates, reverse=True)]


def add_lora_adapters(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, config: TrainConfig) -> list[dict]:
    """Attach fresh LoRA layers (B = 0, so training starts from the base model) and return optimizer groups."""
    from diffusers.training_utils import cast_training_params

    unet.add_adapter(unet_adapter(unet, config))
    groups = unet_groups(unet, config)
    if config.train_text_encoder:
        text_encoder.add_adapter(lora_config(config, TEXT_ENCODER_MODULES))
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
def apply_max_norm(models: list[torch.nn.Module], max_norm: float) -> None:
    """kohya's ``scale_weight_norms``: every LoRA layer whose update (up · down · alpha/rank) has a norm above
    ``max_norm`` has both factors scaled down alike until it does not. The norm comes from the two rank × rank
    products (‖BA‖² = Σ (BᵀB ⊙ AAᵀ)), and the scaling has no branch, so nothing waits for the GPU."""
    from peft.tuners.lora import LoraLayer

    for module in (m for model in models for m in model.modules() if isinstance(m, LoraLayer)):
        for adapter in module.lora_A:
            down, up = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            a, b = down.flatten(1).float(), up.flatten(1).float()
            norm = ((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt() * module.scaling[adapter]
            ratio = (max_norm / norm.clamp(min=max_norm)).sqrt()  # 1 for a layer within the limit
            down.mul_(ratio.to(down.dtype))
            up.mul_(ratio.to(up.dtype))


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
