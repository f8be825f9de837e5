"""Base models: SD1.x single files (offline), diffusers folders, hub ids and the built-in demo, found, checked and
loaded."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import UserError

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SD15_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
DEMO_WEIGHTS = Path(__file__).parent / "demo" / "demo-base.safetensors"  # built by python -m lora_gradio.demo
DEMO = "demo"
RANDOM_SD15 = "sd15-random"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
T = TypeVar("T")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# Tiny SD1.5-shaped components: the UNet keeps SD1.5's 4 levels of 2 layers so every kohya key pattern exists.
DEMO_UNET = {
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    "sample_size": 8,
}
DEMO_VAE = {
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
DEMO_TEXT_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
DEMO_NOTE = ("The demo base model is tiny: it draws 64 px pictures of a red, orange, yellow, green, blue, purple, "
             "black or white circle, square or triangle on a background of another of those colours, and knows "
             "nothing else. Train the demo dataset (Load demo dataset) to teach it a ring.")


@dataclass(frozen=True)
class BaseModelSpec:
    """Where a base model comes from; ``kind`` is demo, sd15-random, single_file, diffusers or hub."""

    kind: str
    location: str
    allow_pickle: bool = False

    @property
    def display_name(self) -> str:
        """The name recorded in LoRA metadata (``ss_sd_model_name``) and shown in the UI."""
        return Path(self.location).name if self.kind in ("single_file", "diffusers") else self.location


def resolve_base(spec: str, allow_pickle: bool = False, search_dirs: tuple[Path, ...] = ()) -> BaseModelSpec:
    """Turn what a user typed (demo, a path, a file name in a models folder, a hub id) into a spec, or explain."""
    spec = spec.strip()
    if spec in (DEMO, RANDOM_SD15):
        return BaseModelSpec(spec, spec)
    candidates = [Path(spec).expanduser()] + [d / spec for d in search_dirs]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        if REPO_ID.match(spec) and not spec.endswith((".safetensors", *PICKLE_SUFFIXES)):
            return BaseModelSpec("hub", spec)
        raise UserError(
            f"Base model '{spec}' not found: it is not an existing file or folder, nor a Hugging Face repo id "
            "(owner/name). Check the path, or put the checkpoint in models/checkpoints."
        )
    path = path.resolve()
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(
                f"Folder '{path}' is not a diffusers model: it has no model_index.json. "
                "Point to a single .safetensors checkpoint or a diffusers folder."
            )
        return BaseModelSpec("diffusers", str(path))
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(
            f"'{path.name}' is a pickle checkpoint, and pickle files can run code when opened. "
            "Use a .safetensors version of this model, or allow pickle explicitly (--allow-pickle) if you trust it."
        )
    return BaseModelSpec("single_file", str(path), allow_pickle=allow_pickle)


def describe_checkpoint(keys: dict[str, tuple[int, ...]], cross_attention_dim: int = 768) -> str | None:
    """Name what a checkpoint holds when it is not a loadable SD1.x model, from its tensor names and shapes."""
    names = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in names)

    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in names):
        return "a LoRA file, not a base model (put it in models/loras and use it in the Test tab)"
    if has("conditioner.embedders.") or "model.diffusion_model.label_emb.0.0.weight" in keys:
        return "an SDXL checkpoint"
    if has("cond_stage_model.model."):
        return "an SD2.x checkpoint (OpenCLIP text encoder)"
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return "a Flux checkpoint"
    if has("model.diffusion_model.joint_blocks.") or has("text_encoders."):
        return "an SD3 checkpoint"
    if not has("model.diffusion_model."):
        if has("encoder.") or has("decoder.") or has("first_stage_model."):
            return "a VAE on its own"
        return f"no Stable Diffusion weights (its {len(names)} tensors have unknown names)"
    if not has("cond_stage_model.transformer."):
        return "a UNet without its text encoder (an incomplete SD checkpoint)"
    if not has("first_stage_model."):
        return "an SD1.x checkpoint without its VAE (an incomplete checkpoint)"
    in_channels = keys.get("model.diffusion_model.input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        return f"an SD1.x inpainting or special checkpoint ({in_channels} input channels, not 4)"
    context = keys.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context[1] != cross_attention_dim:
        return f"a model with {context[1]}-wide text conditioning, not the {cross_attention_dim} of SD1.x"
    return None


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a .safetensors header, without reading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise UserError(
            f"'{Path(path).name}' is not a readable .safetensors file ({exc}). "
            "It may be truncated or not a model at all: download it again."
        ) from exc


def check_single_file(path: Path, config_dir: Path = SD15_CONFIG_DIR) -> None:
    """Refuse a non-SD1.x .safetensors file before any weights load, naming what it is instead."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        return
    unet_config = json.loads((Path(config_dir) / "unet" / "config.json").read_text())
    found = describe_checkpoint(read_safetensors_shapes(path), unet_config["cross_attention_dim"])
    if found:
        raise UserError(
            f"'{Path(path).name}' is {found}. lora-gradio trains on SD1.x base checkpoints "
            "(SD1.5 and its fine-tunes such as DreamShaper 8 or Realistic Vision) in .safetensors format."
        )


def is_demo_checkpoint(path: Path) -> bool:
    """Whether a single-file checkpoint has the demo model's shapes (its UNet's first block is the demo's width)."""
    if path.suffix.lower() != ".safetensors":
        return False
    shapes = read_safetensors_shapes(path)
    return shapes.get("model.diffusion_model.input_blocks.0.0.weight", (0,))[0] == DEMO_UNET["block_out_channels"][0]


@cache
def demo_config_dir() -> Path:
    """The demo model's component configs beside SD1.5's tokenizer and scheduler, as diffusers' single-file loader
    reads them: written once per process into a private temporary folder."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lora-gradio-demo-config-"))
    shutil.copytree(SD15_CONFIG_DIR, folder, dirs_exist_ok=True)
    skeleton = sd15_skeleton(demo=True)
    skeleton.unet.save_config(folder / "unet")
    skeleton.vae.save_config(folder / "vae")
    skeleton.text_encoder.config.save_pretrained(folder / "text_encoder")
    return folder


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers quickly; without this check a download retries for minutes."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def from_hub(load: Callable[[bool], T], repo_id: str, marker: str, remedy: str) -> T:
    """Load from the local cache when ``marker`` (a file every copy has) is there; download only when the hub is
    reachable, else explain how to get the files. A damaged cached copy is named as such, not as missing."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, marker), str):
        try:
            return load(True)
        except (OSError, ValueError) as exc:
            raise UserError(f"The downloaded copy of '{repo_id}' on this machine is damaged or incomplete ({exc}). "
                            "Delete its folder under the Hugging Face cache (~/.cache/huggingface/hub/models--"
                            f"{repo_id.replace('/', '--')}) and load it again.") from exc
    if not hub_reachable():
        raise UserError(f"'{repo_id}' is not on this machine and the Hugging Face Hub cannot be reached "
                        f"(offline, or HF_HUB_OFFLINE is set). {remedy}")
    return load(False)


def from_folder_or_hub(load: Callable[[bool], T], source: str, model: str, folder: str, remedy: str) -> T:
    """A model (``model``: "a BLIP captioning model") from a local folder, never downloaded, or from a hub id as
    :func:`from_hub` does; a wrong or missing folder (``folder``: "BLIP folder") is named as such."""
    if Path(source).expanduser().is_dir():
        try:
            return load(True)
        except (OSError, ValueError) as exc:
            raise UserError(f"'{source}' does not hold {model} ({exc}). Choose the folder that contains its "
                            "config.json, weights and processor files.") from exc
    if Path(source).is_absolute() or source.startswith((".", "~")):
        raise UserError(f"{folder} '{source}' does not exist.")
    return from_hub(load, source, "config.json", remedy)


def build_pipeline(unet: dict[str, Any], vae: dict[str, Any], text_encoder: dict[str, Any],
                   seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD pipeline from component configs, with the bundled CLIP tokenizer and SD1.5 scheduler."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_model = UNet2DConditionModel(**unet)
        vae_model = AutoencoderKL(**vae)
        te_model = CLIPTextModel(CLIPTextConfig(**text_encoder))
    return StableDiffusionPipeline(
        vae=vae_model,
        text_encoder=te_model,
        tokenizer=CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer"),
        unet=unet_model,
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd15_component_configs() -> tuple[dict, dict, dict]:
    """The bundled SD1.5 configs, stripped of the bookkeeping keys the classes do not take."""
    loaded = []
    for sub in ("unet", "vae", "text_encoder"):
        cfg = json.loads((SD15_CONFIG_DIR / sub / "config.json").read_text())
        loaded.append({k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures",
                                                                                           "torch_dtype")})
    return tuple(loaded)


def default_side(spec: BaseModelSpec) -> int:
    """The image side a base model renders when none is asked for: the demo's small one, SD1.5's 512 px."""
    if spec.kind == DEMO or (spec.kind == "single_file" and is_demo_checkpoint(Path(spec.location))):
        return DEMO_UNET["sample_size"] * 2 ** (len(DEMO_VAE["block_out_channels"]) - 1)
    return 512


def sd15_skeleton(demo: bool = False) -> StableDiffusionPipeline:
    """The full SD1.5 architecture (or, with ``demo``, the demo model's) on the meta device: its real module names
    and shapes, without memory or files."""
    import torch

    quiet_libraries()  # the pipeline's imports warn about optional image backends the skeleton never uses
    with torch.device("meta"):
        return build_pipeline(DEMO_UNET, DEMO_VAE, DEMO_TEXT_ENCODER) if demo else \
            build_pipeline(*_sd15_component_configs())


def quiet_libraries() -> None:
    """Keep transformers' and diffusers' info chatter (optional backends, missing keys of fresh LoRAs) off the log."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import diffusers

    diffusers.logging.set_verbosity_error()


def load_pipeline(spec: BaseModelSpec, config_dir: Path = SD15_CONFIG_DIR) -> StableDiffusionPipeline:
    """Load a base model in fp32 on the CPU; callers move and cast it. Hub access happens only for hub ids."""
    quiet_libraries()

    if spec.kind == DEMO:
        return load_demo_weights(build_pipeline(DEMO_UNET, DEMO_VAE, DEMO_TEXT_ENCODER))
    if spec.kind == RANDOM_SD15:
        return build_pipeline(*_sd15_component_configs())
    try:
        pipe = _load_from_files(spec, config_dir)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(_load_failure(spec, exc)) from exc
    check_finite_weights(pipe, spec.display_name)
    return pipe


def _load_from_files(spec: BaseModelSpec, config_dir: Path) -> StableDiffusionPipeline:
    """A checkpoint file, a diffusers folder or a hub id, through diffusers' own loaders."""
    from diffusers import StableDiffusionPipeline

    if spec.kind == "single_file":
        if Path(spec.location).suffix.lower() in PICKLE_SUFFIXES and not spec.allow_pickle:
            raise UserError(f"'{spec.display_name}' is a pickle checkpoint, and pickle files can run code when "
                            "opened. Use a .safetensors version of this model.")
        if config_dir == SD15_CONFIG_DIR and is_demo_checkpoint(Path(spec.location)):
            config_dir = demo_config_dir()  # the demo with a LoRA baked in, say
        check_single_file(Path(spec.location), config_dir)
        return StableDiffusionPipeline.from_single_file(
            spec.location, config=str(config_dir), local_files_only=True, safety_checker=None,
            requires_safety_checker=False,
        )
    if spec.kind == "diffusers":
        return StableDiffusionPipeline.from_pretrained(
            spec.location, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    return from_hub(lambda local_only: StableDiffusionPipeline.from_pretrained(
        spec.location, safety_checker=None, requires_safety_checker=False, local_files_only=local_only),
        spec.location, "model_index.json",
        "Download the model once on a machine with internet and point to its folder, or use a local .safetensors "
        "checkpoint.")


def _load_failure(spec: BaseModelSpec, exc: Exception) -> str:
    """What went wrong when diffusers could not load a base model, and what to do about it."""
    name = spec.display_name
    if spec.allow_pickle and "Unable to load weights from checkpoint file" in str(exc):
        return (f"'{name}' is a pickle checkpoint that diffusers refuses to unpickle: besides the weights it holds "
                "Python objects, which could run code. Get the .safetensors version of this model, or convert the "
                "file to .safetensors with a tool you trust.")
    if "meta tensor" in str(exc):
        return (f"'{name}' lacks weights an SD1.x model needs ({exc}): it is incomplete or another kind of model. "
                "Download it again, or pick an SD1.x checkpoint.")
    if spec.kind == "hub":
        return (f"Could not load base model '{name}': {exc}. The first use of a hub id needs internet (and "
                "HF_HUB_OFFLINE unset); otherwise download the model and point to the local file or folder.")
    return (f"Could not load base model '{name}': {exc}. Check that the file is a complete SD1.x checkpoint; "
            "download it again if it may be damaged.")


def check_finite_weights(pipe: StableDiffusionPipeline, name: str) -> None:
    """Refuse a base model with NaN or infinite weights: it trains to NaN losses and renders black images."""
    import torch

    for component in ("unet", "vae", "text_encoder"):
        broken = [key for key, weight in getattr(pipe, component).named_parameters()
                  if not torch.isfinite(weight).all()]
        if broken:
            raise UserError(f"'{name}' holds NaN or infinite weights in {len(broken)} tensors of its {component} "
                            f"(first: {broken[0]}): the file is damaged or was saved from a training run that "
                            "diverged. Download it again, or pick another checkpoint.")


def load_demo_weights(pipe: StableDiffusionPipeline, path: Path = DEMO_WEIGHTS) -> StableDiffusionPipeline:
    """Fill a freshly built demo pipeline with the weights ``python -m lora_gradio.demo build-base`` trained."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name in ("unet", "vae", "text_encoder"):
        part = {k[len(name) + 1:]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
        found = getattr(pipe, name).load_state_dict(part, strict=False)
        lacking = [k for k in found.missing_keys if not k.endswith("position_ids")]  # an integer buffer, rebuilt
        if lacking or found.unexpected_keys:
            raise ValueError(f"{path} does not fit the demo's {name}: missing {lacking[:3]}, "
                             f"unexpected {found.unexpected_keys[:3]}")
    return pipe
