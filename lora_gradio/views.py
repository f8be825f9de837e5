"""Views of the cached base (its modules over the same weight tensors, so a job's adapters never reach it), where
a model runs, and CLIP's prompt encoding."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UserError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

M = TypeVar("M", bound="torch.nn.Module")


def free_accelerator_memory() -> None:
    """Return cached GPU blocks to the driver after a big model or a job goes away, and freed heap pages to the
    system: glibc keeps them otherwise, and a long-running server's memory would only grow."""
    import ctypes
    import gc
    from contextlib import suppress

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def place_pipeline(pipe: StableDiffusionPipeline, device: torch.device | None = None) -> StableDiffusionPipeline:
    """Put a freshly loaded base where it will be used (``device``, else the best one; fp16 on CUDA) and freeze it:
    from here on it never changes."""
    import torch

    device = device or pick_device()
    pipe.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
        model.eval()
    return pipe


def module_view(module: M, device: torch.device | None = None, dtype: torch.dtype | None = None) -> M:
    """A copy of the module's structure over the same weight tensors, so adapters, modes and processors added to it
    never reach the original; tensors whose device or dtype must change are converted copies instead."""
    import torch

    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        moved = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        if moved is not tensor and isinstance(tensor, torch.nn.Parameter):
            moved = torch.nn.Parameter(moved, requires_grad=False)
        memo[id(tensor)] = moved
    return copy.deepcopy(module, memo)


def pipeline_view(pipe: StableDiffusionPipeline, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """A pipeline over views of the base's UNet, text encoder and VAE, with its own scheduler: work on it freely."""
    from diffusers import StableDiffusionPipeline

    components = dict(pipe.components)
    for name in ("unet", "text_encoder", "vae"):
        components[name] = module_view(components[name], device, dtype)
    components["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config)
    view = StableDiffusionPipeline(**{**components, "requires_safety_checker": False})
    view.set_progress_bar_config(disable=True)
    return view


def encode_prompts(text_encoder: torch.nn.Module, tokenizer: Any, texts: list[str], clip_skip: int = 1
                   ) -> torch.Tensor:
    """CLIP's conditioning for SD1.x, padded to 77 tokens. ``clip_skip`` 2 takes the second-to-last layer through
    the final layer norm, as A1111's 'Clip skip: 2' and ComfyUI's CLIPSetLastLayer -2 do."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    if clip_skip == 1:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the text_model level
    return model.final_layer_norm(hidden)


def available_devices() -> list[str]:
    """The devices a server trains on side by side, one run each: every CUDA GPU, else Apple MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return ["mps"] if torch.backends.mps.is_available() else ["cpu"]


def torch_device(name: str) -> torch.device:
    """The device a slot's name means: ``cuda:1``, ``cpu``; ``cpu#2`` is a second slot on the CPU (two runs side by
    side there). A name this machine lacks is refused with what it has."""
    import torch

    device_text = name.strip().partition("#")[0]
    try:
        device = torch.device(device_text)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"'{name}' is not a device name: use cuda:0, cuda:1 …, mps or cpu (cpu#2 for a second run "
                        "on the CPU).") from exc
    cuda = torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if (device.type == "cuda" and not cuda) or (device.type == "mps" and not torch.backends.mps.is_available()):
        has = sorted({*available_devices(), "cpu"})
        raise UserError(f"Device '{name}' is not on this machine; it has {', '.join(has)}.")
    return device


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
