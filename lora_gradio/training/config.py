"""``TrainConfig``: every training setting in one validated dataclass, plus the preset files that fill it."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from ..atomic import write_text_atomic
from ..dataset import invisible_characters
from ..errors import UserError

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UnetModule = Literal["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
Rate = Annotated[float, Field(gt=0, le=10)]
SamplePrompt = Annotated[str, Field(min_length=1, max_length=1000)]  # CLIP reads ~75 tokens, about 300 characters


def check_visible(text: str, what: str) -> str:
    """Refuse invisible characters (a zero-width space pasted with a word): the tokenizer sees another word."""
    hidden = invisible_characters(text)
    if hidden:
        raise ValueError(f"{what} holds invisible characters ({', '.join(hidden)}); retype it")
    return text


@dataclass(config=ConfigDict(extra="forbid", validate_assignment=True))
class TrainConfig:
    """All hyperparameters of one LoRA training run, with kohya's meanings (scale = alpha / rank)."""

    output_name: Annotated[str, Field(pattern=r"^\w[\w.-]{0,99}$")] = "lora"  # a file name, never '..' or hidden
    trigger_word: Annotated[str, Field(max_length=100)] = ""
    resolution: Annotated[int, Field(ge=64, le=2048, multiple_of=64)] = 512
    enable_buckets: bool = True
    flip_augment: bool = False
    rank: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[float, Field(gt=0, le=4096)] = 8.0
    unet_modules: Annotated[list[UnetModule], Field(min_length=1)] = dataclasses.field(
        default_factory=lambda: list(UNET_ATTENTION))
    train_text_encoder: bool = False
    unet_lr: Rate = 1e-4
    text_encoder_lr: Rate = 5e-5
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = "adamw"
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_grad_norm: Annotated[float, Field(ge=0, le=100)] = 1.0
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"] = "constant"
    lr_warmup_steps: Annotated[int, Field(ge=0, le=100_000)] = 0
    lr_cycles: Annotated[int, Field(ge=1, le=100)] = 1
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 10
    batch_size: Annotated[int, Field(ge=1, le=64)] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=256)] = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False
    sdpa: bool = True
    min_snr_gamma: Annotated[float, Field(ge=0, le=100)] = 5.0
    noise_offset: Annotated[float, Field(ge=0, le=1)] = 0.0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    caption_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    shuffle_caption: bool = False
    keep_tokens: Annotated[int, Field(ge=0, le=75)] = 0
    save_every_n_epochs: Annotated[int, Field(ge=0, le=10_000)] = 1
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    sample_prompts: Annotated[list[SamplePrompt], Field(max_length=8)] = dataclasses.field(default_factory=list)
    sample_steps: Annotated[int, Field(ge=1, le=150)] = 20

    @field_validator("unet_modules")
    @classmethod
    def _no_repeats(cls, modules: list[str]) -> list[str]:
        if len(set(modules)) != len(modules):
            raise ValueError("lists a module twice")
        return modules

    @field_validator("trigger_word")
    @classmethod
    def _visible(cls, word: str) -> str:
        return check_visible(word, "the trigger word")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for metadata and preset files."""
        return dataclasses.asdict(self)


PATTERN_HINTS = {"output_name": "use a file name of letters, digits, '-', '_' and '.', starting with a letter or digit"}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_type(name: str) -> Any:
    """A field's type without its validation constraints: int, float, bool, str, a Literal or a list."""
    hint = typing.get_type_hints(TrainConfig, include_extras=True)[name]
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def field_is_list(name: str) -> bool:
    """Whether a field takes a list (the CLI splits such values on commas)."""
    return typing.get_origin(field_type(name)) is list


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as 'field = value: what is allowed'."""
    name = ".".join(str(p) for p in error["loc"]) or "?"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        close = difflib.get_close_matches(name, FIELDS, n=1)
        return f"unknown setting '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    limits = {k: v for k, v in (error.get("ctx") or {}).items() if k in ("ge", "gt", "le", "lt", "multiple_of",
                                                                        "pattern")}
    allowed = ", ".join(f"{k} {v}" for k, v in limits.items())
    value = repr(error.get("input"))
    if len(value) > 60:
        value = f"{value[:40]}… ({len(str(error.get('input')))} characters)"
    if error["type"] == "string_pattern_mismatch" and name in PATTERN_HINTS:
        return f"{name} = {value}: {PATTERN_HINTS[name]}"
    message = error["msg"][:1].lower() + error["msg"][1:]
    return f"{name} = {value}: {message}" + (f" ({allowed})" if allowed else "")


def make_config(values: dict[str, Any], source: str = "settings") -> TrainConfig:
    """Build and validate a config; every problem is named with its field, value and allowed range."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise UserError(f"Invalid {source}: {problems}.") from exc


def list_presets(presets_dir: Path = PRESETS_DIR) -> list[str]:
    """Preset names, from the TOML files in ``presets/``."""
    return sorted(p.stem for p in Path(presets_dir).glob("*.toml"))


def load_preset(name_or_path: str, presets_dir: Path = PRESETS_DIR) -> tuple[TrainConfig, str]:
    """A preset as a validated config and its description; a path to any .toml file works too."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(presets_dir) / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"Preset '{name_or_path}' not found. Available: {', '.join(list_presets(presets_dir))}.")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Preset '{path.name}' is not valid TOML: {exc}.") from exc
    description = str(values.pop("description", ""))
    return make_config(values, f"preset '{path.name}'"), description


def save_preset(config: TrainConfig, path: Path, description: str = "") -> Path:
    """Write the fields that differ from the defaults as a readable TOML preset."""
    import tomli_w

    defaults = TrainConfig().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    text = tomli_w.dumps({"description": description, **changed} if description else changed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(path), "# Saved from lora-gradio. Unlisted settings keep their defaults.\n" + text)
    return Path(path)


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A copy of ``config`` with some fields changed, validated as a whole."""
    return make_config({**config.to_dict(), **overrides}, "setting")
