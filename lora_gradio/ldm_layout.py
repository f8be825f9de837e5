"""A diffusers SD1.x pipeline as an original-layout (LDM) single-file checkpoint, as A1111 and Civitai ship them: what
a baked checkpoint is written as, and how a module's weight is found in a fine-tune's file.

The renaming tables are the CompVis layout facts: ``model.diffusion_model.*`` for the UNet, ``first_stage_model.*``
for the VAE and ``cond_stage_model.transformer.text_model.*`` for the CLIP text encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_block_prefix(parts: list[str], layers: int) -> tuple[str, list[str]]:
    """Map the leading diffusers block path of a UNet key to its LDM block path; return it and the rest."""
    head = parts[0]
    if head == "time_embedding":
        return {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]], parts[2:]
    if head in ("conv_in", "conv_norm_out", "conv_out"):
        return {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[head], parts[1:]
    if head == "mid_block":
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return f"middle_block.{index}", parts[3:]
    level, kind = int(parts[1]), parts[2]
    if head == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(layers + 1) * (level + 1)}.0.op", parts[5:]
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{(layers + 1) * level + int(parts[3]) + 1}.{slot}", parts[4:]
    if kind == "upsamplers":  # after the resnet, and after the attention on levels that have one
        return f"output_blocks.{(layers + 1) * level + layers}.{2 if level > 0 else 1}", parts[4:]
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{(layers + 1) * level + int(parts[3])}.{slot}", parts[4:]


def unet_to_ldm(state: dict[str, torch.Tensor], layers: int = 2) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to the LDM layout."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        block, rest = _unet_block_prefix(parts, layers)
        is_resnet = "resnets" in parts[:4] and rest[0] in RESNET_NAMES
        if is_resnet:
            rest = RESNET_NAMES[rest[0]].split(".") + rest[1:]
        out[f"model.diffusion_model.{block}.{'.'.join(rest)}"] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int = 4) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the LDM layout (attention weights become 1x1 convs)."""
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = new.split(".")
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2])
            if parts[1] == "down_blocks":
                sub = "block" if parts[3] == "resnets" else "downsample"
                new = ".".join([parts[0], "down", str(level), sub, *parts[4 + (sub == "downsample"):]])
            else:
                sub = "block" if parts[3] == "resnets" else "upsample"
                new = ".".join([parts[0], "up", str(levels - 1 - level), sub, *parts[4 + (sub == "upsample"):]])
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
            else:
                rest = ".".join(parts[4:])
                for diffusers_name, ldm_name in VAE_ATTENTION_NAMES.items():
                    rest = rest.replace(diffusers_name + ".", ldm_name + ".")
                new = ".".join([parts[0], "mid", "attn_1", rest])
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out[f"first_stage_model.{new}"] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix CLIP text-encoder keys the LDM way, whatever nesting the installed transformers uses."""
    return {f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in state.items()}


def pipeline_to_ldm(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The whole pipeline as one LDM-layout state dict, ready for ``safetensors.torch.save_file``."""
    layers = pipe.unet.config.layers_per_block
    state = unet_to_ldm(pipe.unet.state_dict(), layers)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    state.update(text_encoder_to_ldm(pipe.text_encoder.state_dict()))
    return {k: v.contiguous() for k, v in state.items()}


def ldm_key(component: str, key: str, layers: int = 2) -> str:
    """Where one UNet or text-encoder weight of the diffusers layout lies in an LDM checkpoint."""
    renamed = unet_to_ldm({key: None}, layers) if component == "unet" else text_encoder_to_ldm({key: None})
    return next(iter(renamed))
