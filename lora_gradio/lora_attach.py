"""A LoRA file attached to a pipeline as peft adapters (LoRA, LoCon and DoRA layers), weighted with ComfyUI's
strengths, and removed again; which modules go where is lora_map.py's answer."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
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
        alphas = {re.escape(path): item.alpha_or_rank for path, item in items.items()}
        dora = component in fit.dora_components
        with warnings.catch_warnings():  # several files side by side are meant (see attach)
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(items), rank_pattern=ranks,
                                         alpha_pattern=alphas, use_dora=dora), adapter_name=adapter_name)
        with torch.no_grad():
            for path, item in items.items():
                layer = model.get_submodule(path)
                layer.lora_A[adapter_name].weight.copy_(item.down)
                layer.lora_B[adapter_name].weight.copy_(item.up)
                if dora:
                    set_magnitude(layer, item, adapter_name)
                    if not getattr(layer, BLENDS, False):  # one hook per layer, whichever files it holds
                        layer.register_forward_hook(_blend, with_kwargs=True)
                        setattr(layer, BLENDS, True)


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
BLENDS = "_lora_gradio_blends"  # on a layer: its output is blended by STRENGTH


def _blend(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """ComfyUI's strength on a DoRA layer, W + s·(W_DoRA − W), done on outputs: peft's adapter weight would scale
    the pair inside DoRA's norm instead, and at 0 would still rescale the base."""
    strength = getattr(module, STRENGTH, 1.0)
    if strength == 1.0:
        return output
    base = module.get_base_layer()(*args, **kwargs)
    return base + strength * (output - base)


def set_strengths(pipe: StableDiffusionPipeline, fit: LoraFit, strengths: dict[str, float]) -> None:
    """Weight the active LoRA (the last :func:`attach`) per component with ComfyUI's meaning: each layer becomes
    W + s·(W' − W), W' the layer at full strength. peft's adapter weight is exactly that for a LoRA pair; DoRA layers
    blend outputs, and every other layer's blend is set to 1, a no-op, whatever file set it before."""
    name = getattr(pipe, ACTIVE)
    present = {part for part, names in pipe.get_list_adapters().items() if name in names}  # UNet-only files exist
    weights = {part: 1.0 if part in fit.dora_components else strength for part, strength in strengths.items()
               if part in present}
    pipe.set_adapters([name], adapter_weights=[weights])
    for part, strength in strengths.items():
        for layer in lora_layers(pipe, part):
            setattr(layer, STRENGTH, strength if part in fit.dora_components else 1.0)


def lora_layers(pipe: StableDiffusionPipeline, part: str) -> Iterator[torch.nn.Module]:
    """The adapter-holding layers of one component."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return (layer for layer in getattr(pipe, part).modules() if isinstance(layer, BaseTunerLayer))


ATTACHED = "_lora_gradio_attached"  # on a pipeline: {(file, mtime): (adapter, fit)}, least recently used first
ACTIVE = "_lora_gradio_active"  # on a pipeline: the adapter the next render uses; None for the clean base
ADDED = "_lora_gradio_added"  # on a pipeline: how many adapters it has had, so that each name is new
KEEP_ATTACHED = 4  # files kept attached to one view: going back to one of them costs no loading


def attach(pipe: StableDiffusionPipeline, path: Path | None, adapter_name: str) -> LoraFit | None:
    """Make ``path`` the LoRA the pipeline renders with (None: the clean base) and return what was applied. The last
    KEEP_ATTACHED files stay attached as adapters of their own (``adapter_name``-N), so going back to an epoch
    compared a moment ago, or a strength change, costs nothing but ``set_adapters``; the base is never touched."""
    attached: dict[tuple[str, int], tuple[str, LoraFit]] = getattr(pipe, ATTACHED, None) or {}
    if path is None:
        for part in ("unet", "text_encoder"):
            for layer in lora_layers(pipe, part):
                layer.enable_adapters(False)
        setattr(pipe, ACTIVE, None)
        return None
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in attached:
        while len(attached) >= KEEP_ATTACHED:
            pipe.delete_adapters(attached.pop(next(iter(attached)))[0])
        tensors, metadata = read_lora(Path(path))
        fit = fit_lora(tensors, metadata, pipe, Path(path).name)
        name = f"{adapter_name}-{getattr(pipe, ADDED, 0)}"
        setattr(pipe, ADDED, getattr(pipe, ADDED, 0) + 1)
        try:
            apply_fit(pipe, fit, name)
        except BaseException:
            detach(pipe)  # a half-added adapter must not stay on the view
            raise
        attached[key] = (name, fit)
    attached[key] = attached.pop(key)  # the most recently used last
    setattr(pipe, ATTACHED, attached)
    for part in ("unet", "text_encoder"):
        for layer in lora_layers(pipe, part):
            layer.enable_adapters(True)
    setattr(pipe, ACTIVE, attached[key][0])
    return attached[key][1]



def detach(pipe: StableDiffusionPipeline) -> None:
    """Remove every LoRA layer, leaving the clean base model."""
    pipe.unload_lora_weights()
    setattr(pipe, ATTACHED, None)
    setattr(pipe, ACTIVE, None)
