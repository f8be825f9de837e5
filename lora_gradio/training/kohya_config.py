"""Settings people bring from kohya_ss and sd-scripts (kohya_export.py writes every run back as sd-scripts takes it).

Three files are read: the kohya_ss GUI's saved JSON, an sd-scripts training TOML (``--config_file``) and a dataset
TOML (``--dataset_config``). Every key that means a setting of this app becomes that setting; every other key is
listed by name with its value, so nothing is dropped silently.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import TrainConfig, make_config
from .sample_prompts import KOHYA_SAMPLERS

OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "prodigy": "Prodigy"}
LOCON_TYPES = {"Kohya LoCon", "LyCORIS/LoCon", "LoCon"}


def number(value: Any) -> float:
    """A number as the GUI saves it: a number, or a number in a string ("1e-4", "0.0001")."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def whole(value: Any) -> int:
    """A whole number, from a number or a string ("2")."""
    result = number(value)
    if result != int(result):
        raise ValueError(f"{value!r} is not a whole number")
    return int(result)


def flag(value: Any) -> bool:
    """A true/false value, as JSON, TOML or a string says it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"{value!r} is not true or false")


def square(value: Any) -> int:
    """A training size from "512", "512,512" or 512: the larger side (buckets follow each image's own shape)."""
    sides = [whole(part) for part in str(value).replace("x", ",").split(",") if part.strip()]
    if not sides:
        raise ValueError(f"{value!r} is not a size")
    return max(sides)


def choice(table: dict[str, str]) -> Callable[[Any], str]:
    """A converter to one of ``table``'s values, by a key compared without case."""
    lowered = {key.lower(): name for key, name in table.items()}

    def convert(value: Any) -> str:
        if str(value).lower() not in lowered:
            raise ValueError(f"{value!r} has no counterpart here ({', '.join(sorted(set(table)))})")
        return lowered[str(value).lower()]

    return convert


def listed(convert: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A list (or a comma-separated string) of values, each converted."""
    return lambda value: [convert(part) for part in (value if isinstance(value, list) else str(value).split(","))]


def lr_weights(down: str, mid: str, up: str) -> list[float]:
    """kohya's down_lr_weight (12 values), mid_lr_weight and up_lr_weight as the 25 values of ``block_lr``; a side
    left out trains at 1."""
    sides = []
    for text, count in ((down, 12), (mid, 1), (up, 12)):
        values = listed(number)(text) if text else [1.0] * count
        if len(values) != count:
            raise ValueError(f"{text!r} has {len(values)} values, not {count} (a named curve such as 'sine' is not "
                             "read here: give the numbers)")
        sides += values
    return sides


def same(value: Any) -> Any:
    """A value taken as it is; the config's own validation judges it."""
    return value


# kohya key -> (our setting, converter); the GUI's and sd-scripts' names, where they differ both are here
SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "network_dim": ("rank", whole), "network_alpha": ("alpha", number), "conv_dim": ("conv_rank", whole),
    "conv_alpha": ("conv_alpha", number), "network_dropout": ("network_dropout", number),
    "unet_lr": ("unet_lr", number), "text_encoder_lr": ("text_encoder_lr", number),
    "lr_scheduler": ("lr_scheduler", choice({name: name for name in ("constant", "constant_with_warmup", "cosine",
                                                                      "cosine_with_restarts", "linear")})),
    "lr_warmup_steps": ("lr_warmup_steps", whole), "lr_scheduler_num_cycles": ("lr_cycles", whole),
    "max_train_epochs": ("epochs", whole), "epoch": ("epochs", whole), "max_train_steps": ("max_train_steps", whole),
    "train_batch_size": ("batch_size", whole), "gradient_accumulation_steps": ("gradient_accumulation_steps", whole),
    "mixed_precision": ("mixed_precision", same), "save_precision": ("save_dtype", choice(
        {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32"})),
    "gradient_checkpointing": ("gradient_checkpointing", flag), "sdpa": ("sdpa", flag),
    "cache_latents_to_disk": ("cache_latents_to_disk", flag), "min_snr_gamma": ("min_snr_gamma", number),
    "noise_offset": ("noise_offset", number), "prior_loss_weight": ("prior_loss_weight", number),
    "seed": ("seed", whole), "clip_skip": ("clip_skip", whole), "caption_dropout_rate": ("caption_dropout", number),
    "shuffle_caption": ("shuffle_caption", flag), "keep_tokens": ("keep_tokens", whole),
    "save_every_n_epochs": ("save_every_n_epochs", whole), "max_grad_norm": ("max_grad_norm", number),
    "scale_weight_norms": ("scale_weight_norms", number), "flip_aug": ("flip_augment", flag),
    "enable_bucket": ("enable_buckets", flag), "resolution": ("resolution", square),
    "max_resolution": ("resolution", square), "output_name": ("output_name", same),
    "optimizer": ("optimizer", choice({v: k for k, v in OPTIMIZERS.items()})),
    "optimizer_type": ("optimizer", choice({v: k for k, v in OPTIMIZERS.items()})),
    "log_with": ("log_with", choice({"tensorboard": "tensorboard", "wandb": "wandb"})),
    "sample_every_n_steps": ("sample_every_n_steps", whole), "sample_sampler": ("sample_scheduler",
                                                                                choice(KOHYA_SAMPLERS)),
    "multires_noise_iterations": ("multires_noise_iterations", whole),
    "multires_noise_discount": ("multires_noise_discount", number),
    "loss_type": ("loss_type", choice({name: name for name in ("l2", "huber", "smooth_l1")})),
    "huber_c": ("huber_c", number),
    "huber_schedule": ("huber_schedule", choice({name: name for name in ("snr", "exponential", "constant")})),
    "debiased_estimation_loss": ("debiased_estimation", flag),
    "masked_loss": ("masked_loss", flag), "alpha_mask": ("masked_loss", flag),  # the GUI's and a subset's name
    "block_dims": ("block_dims", listed(whole)), "block_alphas": ("block_alphas", listed(number)),
    "block_lr": ("block_lr", listed(number)),
}
LR_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")  # network_args that make block_lr
NOISE_TYPES = {"Original": ("multires_noise_iterations", "multires_noise_discount"),  # the GUI's noise type, and
               "Multires": ("noise_offset",)}  # the keys it leaves unused
AS_HERE = {("caption_extension", ".txt"), ("caption_extension", "txt"), ("cache_latents", True), ("v2", False),
           ("v_parameterization", False), ("num_repeats", 1)}  # what this app always does: nothing to set
EMPTY = ("", None, [], {})  # the GUI saves unset fields as "" (0 where 0 means off, which is read as 0)


def as_here(key: str, value: Any) -> bool:
    """Whether a key asks for what this app does anyway."""
    return isinstance(value, str | int | float) and (key, value) in AS_HERE


@dataclass
class KohyaSettings:
    """What a kohya file says, in this app's terms: settings for the Train tab, dataset options, and every key with
    no counterpart here, with its value and why where it helps."""

    kind: str
    settings: dict[str, Any] = field(default_factory=dict)
    repeats: int | None = None
    folders: dict[str, str] = field(default_factory=dict)  # data, regularization, base: paths the file names
    not_used: dict[str, str] = field(default_factory=dict)  # key -> "value" or "value (why)"

    def skip(self, key: str, value: Any, why: str = "") -> None:
        """Name a key that is not used here."""
        shown = json.dumps(value) if not isinstance(value, str) else f'"{value}"'
        self.not_used[key] = f"{shown} ({why})" if why else shown

    def summary(self) -> str:
        """What was imported, and the keys not used, each with its value."""
        taken = ", ".join(f"`{name} = {value}`" for name, value in self.settings.items()) or "none"
        lines = [f"From a {self.kind}: {len(self.settings)} settings: {taken}."]
        if self.repeats is not None:
            lines.append(f"Repeats per epoch: {self.repeats}.")
        if self.folders:
            lines.append("Folders and base it names (pick the dataset and base model here instead): "
                         + ", ".join(f"{what} = {path}" for what, path in self.folders.items()) + ".")
        if self.not_used:
            lines.append("Not used here: " + ", ".join(f"`{key} = {value}`" for key, value in self.not_used.items())
                         + ".")
        return "\n\n".join(lines)

    def path(self, what: str) -> Path | None:
        """A folder the file names (data, regularization), for the command line."""
        return Path(self.folders[what]) if what in self.folders else None

    def config(self, base: TrainConfig, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """``base`` (a preset) with these settings on top, then ``overrides`` (the CLI's --set)."""
        return make_config({**base.to_dict(), **self.settings, **(overrides or {})},
                           f"settings of the {self.kind}" if self.kind else "setting")


def read_kohya_config(text: str, name: str) -> KohyaSettings:
    """Read a kohya_ss GUI JSON, an sd-scripts training TOML or a dataset TOML (told apart by their content)."""
    try:
        if name.lower().endswith(".json") or text.lstrip().startswith("{"):
            values = json.loads(text)
            kind = "kohya_ss GUI config"
        else:
            values = tomllib.loads(text)
            kind = "sd-scripts dataset config" if "datasets" in values or "general" in values else \
                "sd-scripts training config"
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"'{name}' is neither a kohya_ss JSON config nor an sd-scripts TOML file: {exc}. Save the "
                        "config again from kohya_ss (Configuration → Save) or check the TOML.") from exc
    if not isinstance(values, dict):
        raise UserError(f"'{name}' holds no settings: a kohya config is one JSON object or a TOML table.")
    found = KohyaSettings(kind)
    if kind == "sd-scripts dataset config":
        read_dataset_config(values, found)
    else:
        read_training_keys(flatten(values), found)
    return found


MAX_CONFIG_BYTES = 1_000_000  # a kohya config is a few kilobytes


def read_kohya_files(paths: list[Path]) -> KohyaSettings:
    """One or more kohya files read together (a training TOML and its dataset TOML, say): later files' settings
    on top of earlier ones'."""
    if not paths:
        raise UserError("Give a kohya_ss .json or an sd-scripts .toml config to import.")
    merged: KohyaSettings | None = None
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"Config file '{Path(path).name}' does not exist.")
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"'{Path(path).name}' is over 1 MB: it is not a kohya config.")
        found = read_kohya_config(Path(path).read_bytes().decode("utf-8", errors="replace"), Path(path).name)
        if merged is None:
            merged = found
        else:
            merged.kind = f"{merged.kind} and {found.kind}"
            merged.settings.update(found.settings)
            merged.folders.update(found.folders)
            merged.not_used.update(found.not_used)
            merged.repeats = found.repeats if found.repeats is not None else merged.repeats
    return merged


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts reads a training TOML's sections as if their keys were at the top."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def read_training_keys(values: dict[str, Any], found: KohyaSettings) -> None:
    """Map a training config's keys onto settings; the network type, learning rates and paths need their own
    rules (see :func:`read_network` and :func:`read_rates`)."""
    values = dict(values)
    read_network(values, found)
    read_rates(values, found)
    for key, what in (("train_data_dir", "data"), ("reg_data_dir", "regularization"),
                      ("pretrained_model_name_or_path", "base"), ("output_dir", "output"), ("logging_dir", "logs")):
        if values.get(key) not in EMPTY:
            found.folders[what] = str(values.pop(key))
        else:
            values.pop(key, None)
    noise_type = values.pop("noise_offset_type", None)
    for key in NOISE_TYPES.get(str(noise_type), ()):
        if values.get(key) not in (*EMPTY, 0):
            found.skip(key, values[key], f"the file's noise type is {noise_type}, so this is off")
        values.pop(key, None)
    every = values.pop("sample_every_n_epochs", None)
    for key, value in values.items():
        if value in EMPTY or as_here(key, value):
            continue
        if key == "xformers":  # the GUI's attention choice: both kinds are this app's memory-efficient attention
            found.settings["sdpa"] = str(value).lower() in ("xformers", "sdpa", "true")
        elif key == "sample_prompts":
            read_prompts(value, found)
        elif key == "optimizer_args":
            read_optimizer_args(value, found)
        elif key in SETTINGS:
            setting(found, key, value)
        else:
            found.skip(key, value)
    if every not in (*EMPTY, 0, "0") and found.settings.get("save_every_n_epochs", every) != whole(every):
        found.skip("sample_every_n_epochs", every, "samples are rendered at every save here")


def read_prompts(value: Any, found: KohyaSettings) -> None:
    """The GUI keeps the prompts themselves, one per line; sd-scripts names a file, which the page cannot open."""
    if isinstance(value, list) or "\n" in str(value) or not str(value).lower().endswith((".txt", ".toml", ".json")):
        lines = value if isinstance(value, list) else str(value).splitlines()
        found.settings["sample_prompts"] = [str(line).strip() for line in lines if str(line).strip()]
    else:
        found.skip("sample_prompts", value, "a file of prompts: paste its lines into Sample prompts")


def setting(found: KohyaSettings, key: str, value: Any) -> None:
    """One key that maps onto a setting; a value this app cannot take is listed with why."""
    name, convert = SETTINGS[key]
    try:
        converted = convert(value)
        make_config({**TrainConfig().to_dict(), name: converted})
    except (ValueError, UserError) as exc:
        found.skip(key, value, str(exc).removeprefix("Invalid settings: ").rstrip("."))
        return
    found.settings[name] = converted


def read_network(values: dict[str, Any], found: KohyaSettings) -> None:
    """The network type from the GUI's LoRA_type, or sd-scripts' network_module and network_args."""
    args = values.pop("network_args", None) or []
    options = dict(str(item).partition("=")[::2] for item in (args if isinstance(args, list) else str(args).split()))
    for key in ("conv_dim", "conv_alpha"):
        if key in options:
            values.setdefault(key, options.pop(key))
    dora = flag(options.pop("dora_wd", values.pop("dora_wd", False)) or False)
    algo = options.pop("algo", "")
    module = values.pop("network_module", "")
    kind = values.pop("LoRA_type", "")
    if dora:
        found.settings["network_type"] = "dora"
    elif kind in LOCON_TYPES or algo in ("locon", "lora") or (module == "networks.lora" and "conv_dim" in values):
        found.settings["network_type"] = "locon" if values.get("conv_dim") not in (*EMPTY, 0, "0") else "lora"
    elif kind in ("", "Standard") and module in ("", "networks.lora"):
        found.settings["network_type"] = "lora"
    else:
        found.skip("LoRA_type" if kind else "network_module", kind or module,
                   "this app trains LoRA, LoCon and DoRA; the file trains as a plain LoRA here")
        found.settings["network_type"] = "lora"
    for key in ("block_dims", "block_alphas"):
        if key in options:
            setting(found, key, options.pop(key))
    weights = [options.pop(key, "") for key in LR_WEIGHTS]
    if any(weights):
        try:
            setting(found, "block_lr", lr_weights(*weights))
        except ValueError as exc:
            found.skip("network_args down/mid/up_lr_weight", ", ".join(filter(None, weights)), str(exc))
    for key, value in options.items():
        found.skip(f"network_args {key}", value)


def read_rates(values: dict[str, Any], found: KohyaSettings) -> None:
    """sd-scripts' learning_rate is the rate of every part without one of its own; a text-encoder rate of 0, or
    network_train_unet_only, trains the UNet alone."""
    rate = values.pop("learning_rate", None)
    unet_only = values.pop("network_train_unet_only", False)
    for key in ("unet_lr", "text_encoder_lr"):
        if values.get(key) in EMPTY and rate not in EMPTY:
            values[key] = rate
    text_rate = values.get("text_encoder_lr")
    if text_rate is None and not unet_only:
        return  # the file says nothing about the text encoder
    found.settings["train_text_encoder"] = not flag(unet_only or False) and text_rate not in (*EMPTY, 0, "0")
    if not found.settings["train_text_encoder"] and text_rate in (0, "0"):
        values.pop("text_encoder_lr")
    warmup = values.pop("lr_warmup", None)  # the GUI's warm-up is a percent of the run's steps
    if warmup not in (*EMPTY, 0, "0"):
        found.skip("lr_warmup", warmup, "a percent of the steps: set Warm-up steps to that share of the run")


def read_optimizer_args(value: Any, found: KohyaSettings) -> None:
    """weight_decay from the optimizer's arguments ("weight_decay=0.01 betas=0.9,0.99"); the rest listed."""
    items = value if isinstance(value, list) else str(value).split()
    for item in items:
        key, _, text = str(item).partition("=")
        if key.strip() == "weight_decay":
            found.settings["weight_decay"] = number(text)
        else:
            found.skip(f"optimizer_args {key.strip()}", text)


def read_dataset_config(values: dict[str, Any], found: KohyaSettings) -> None:
    """[general], [[datasets]] and [[datasets.subsets]]: one subset of images is the dataset (its folder and
    repeats), one with is_reg its regularisation images; class_tokens become the trigger word."""
    general = values.get("general", {})
    datasets = values.get("datasets", [])
    subsets = [(dataset, subset) for dataset in datasets for subset in dataset.get("subsets", [])]
    shared = {**general, **{k: v for dataset in datasets for k, v in dataset.items() if k != "subsets"}}
    for number_, (_, subset) in enumerate(subsets):
        role = "regularization" if flag(subset.get("is_reg", False)) else "data"
        if role in found.folders:
            found.skip(f"subset {number_ + 1}", subset, f"one {role} folder per run here; the first is used")
            continue
        subset = dict(subset)
        subset.pop("is_reg", None)
        if "image_dir" in subset:
            found.folders[role] = str(subset.pop("image_dir"))
        if role == "data":
            if "num_repeats" in subset:
                found.repeats = whole(subset.pop("num_repeats"))
            if subset.get("class_tokens"):
                found.settings["trigger_word"] = str(subset.pop("class_tokens"))
            shared.update(subset)
        else:
            for key, value in subset.items():
                if not as_here(key, value):
                    found.skip(f"regularization {key}", value)
    extension = shared.pop("caption_extension", ".txt")
    if extension not in (".txt", "txt"):
        found.skip("caption_extension", extension, "captions are read from .txt files: rename them")
    read_training_keys({k: v for k, v in shared.items() if k != "batch_size"} | (
        {"train_batch_size": shared["batch_size"]} if "batch_size" in shared else {}), found)
    found.settings.pop("network_type", None)  # a dataset file says nothing about the network
    found.settings.pop("train_text_encoder", None)
