"""A LoRA file attached to a pipeline as peft adapters (LoRA, LoCon and DoRA layers), weighted with ComfyUI's
strengths, and removed again; which modules go where is lora_map.py's answer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .lora_map import LoraFit, LoraModule, fit_lora, read_lora
from .training.kohya import dora_magnitude, lora_delta, row_norms

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline


def apply_fit(pipe: StableDiffusionPipeline, fit: LoraFit, adapter_name: str) -> None:
    """Add one peft adapter per component with each module's own rank and alpha, holding the file's weights;
    a component with ``dora_scale`` keys gets a DoRA adapter."""
    import torch
    from peft import LoraConfig

    for component in ("unet", "text_encoder"):
        items = {path: item for part, path, item in fit.applied.values() if part == component}
        if not items:
            continue
        model = getattr(pipe, component)
        ranks = {re.escape(path): item.rank for path, item in items.items()}
        alphas = {re.escape(path): item.alpha if item.alpha is not None else float(item.rank)
                  for path, item in items.items()}
        dora = component in fit.dora_components
        model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(items), rank_pattern=ranks,
                                     alpha_pattern=alphas, use_dora=dora), adapter_name=adapter_name)
        with torch.no_grad():
            for path, item in items.items():
                layer = model.get_submodule(path)
                layer.lora_A[adapter_name].weight.copy_(item.down)
                layer.lora_B[adapter_name].weight.copy_(item.up)
                if dora:
                    set_magnitude(layer, item, adapter_name)
                    layer.register_forward_hook(_blend, with_kwargs=True)


def set_magnitude(layer: torch.nn.Module, item: LoraModule, adapter_name: str) -> None:
    """A DoRA layer's magnitude from the file's ``dora_scale``; a plain pair in a DoRA file gets the magnitude that
    leaves it a plain LoRA (the merged weight's own norms)."""
    weight = layer.get_base_layer().weight
    delta = lora_delta(item.down, item.up, layer.scaling[adapter_name], weight.shape)
    magnitude = (row_norms(weight.float() + delta) if item.dora_scale is None
                 else dora_magnitude(weight, delta, item.dora_scale))
    target = layer.lora_magnitude_vector[adapter_name].weight
    target.copy_(magnitude.reshape(target.shape))


STRENGTH = "_lora_gradio_strength"  # on a DoRA layer: the strength its output is blended with


def _blend(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """ComfyUI's strength on a DoRA layer, W + s·(W_DoRA − W), done on outputs: peft's adapter weight would scale
    the pair inside DoRA's norm instead, and at 0 would still rescale the base."""
    strength = getattr(module, STRENGTH, 1.0)
    if strength == 1.0:
        return output
    base = module.get_base_layer()(*args, **kwargs)
    return base + strength * (output - base)


def set_strengths(pipe: StableDiffusionPipeline, fit: LoraFit, adapter_name: str,
                  strengths: dict[str, float]) -> None:
    """Weight the attached LoRA per component with ComfyUI's meaning: each layer becomes W + s·(W' − W), W' the
    layer at full strength. peft's adapter weight is exactly that for a LoRA pair; DoRA layers blend outputs."""
    from peft.tuners.lora import LoraLayer

    present = pipe.get_list_adapters()  # a UNet-only LoRA has no text-encoder part to weight
    weights = {part: 1.0 if part in fit.dora_components else strength for part, strength in strengths.items()
               if part in present}
    pipe.set_adapters([adapter_name], adapter_weights=[weights])
    for part in fit.dora_components & set(strengths):
        for layer in getattr(pipe, part).modules():
            if isinstance(layer, LoraLayer):
                setattr(layer, STRENGTH, strengths[part])


ATTACHED = "_lora_gradio_attached"  # on a pipeline: ((file, mtime), fit) of the LoRA attached for testing


def attach(pipe: StableDiffusionPipeline, path: Path | None, adapter_name: str) -> LoraFit | None:
    """Make ``path`` the pipeline's only LoRA (None: none), reusing it when that same file is already attached;
    returns what was applied. Strength changes then cost nothing but ``set_adapters``; the base is never touched."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns) if path is not None else None
    attached = getattr(pipe, ATTACHED, None)
    if attached is not None and attached[0] == key:
        return attached[1]
    detach(pipe)
    if path is None:
        return None
    tensors, metadata = read_lora(Path(path))
    fit = fit_lora(tensors, metadata, pipe, Path(path).name)
    try:
        apply_fit(pipe, fit, adapter_name)
    except BaseException:
        detach(pipe)  # a half-added adapter must not stay on the view
        raise
    setattr(pipe, ATTACHED, (key, fit))
    return fit


def detach(pipe: StableDiffusionPipeline) -> None:
    """Remove every LoRA layer, leaving the clean base model."""
    pipe.unload_lora_weights()
    setattr(pipe, ATTACHED, None)
