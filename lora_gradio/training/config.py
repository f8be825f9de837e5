"""``TrainConfig``: every training setting in one validated dataclass, plus the preset files that fill it."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from ..atomic import write_text_atomic
from ..dataset import invisible_characters
from ..errors import UserError
from ..request import SamplerName
from .sample_prompts import SampleLine, parse_sample_line

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UnetModule = Literal["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_ENCODER_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
Rate = Annotated[float, Field(gt=0, le=10)]
TRIAL_STRENGTHS = (0.6, 0.8, 1.0)  # the recommended file is tried at these at the end of a run (1: its samples)
GRID_STRENGTHS = (0.0, *TRIAL_STRENGTHS, 1.2)  # Grid around it: none at all, the trials, and past the full effect
SamplePrompt = Annotated[str, Field(min_length=1, max_length=1000)]  # CLIP reads ~75 tokens, about 300 characters
BLOCK_COUNT = 25  # kohya's UNet blocks: IN00–IN11, MID, OUT00–OUT11 (lora_gradio/blocks.py)
BlockRanks = Annotated[list[Annotated[int, Field(ge=0, le=1024)]], Field(max_length=BLOCK_COUNT)]
BlockAlphas = Annotated[list[Annotated[float, Field(gt=0, le=4096)]], Field(max_length=BLOCK_COUNT)]
BlockRates = Annotated[list[Annotated[float, Field(ge=0, le=10)]], Field(max_length=BLOCK_COUNT)]


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
    masked_loss: bool = False  # learn only where each image's mask (alpha or name.mask.png) is white
    rank: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[float, Field(gt=0, le=4096)] = 8.0
    network_type: Literal["lora", "locon", "dora"] = "lora"
    conv_rank: Annotated[int, Field(ge=1, le=1024)] = 8  # LoCon's 3×3 convolutions
    conv_alpha: Annotated[float, Field(gt=0, le=4096)] = 4.0
    block_dims: BlockRanks = dataclasses.field(default_factory=list)  # each block's rank (0: none); empty: rank
    block_alphas: BlockAlphas = dataclasses.field(default_factory=list)  # each block's alpha; empty: alpha
    block_lr: BlockRates = dataclasses.field(default_factory=list)  # each block's share of unet_lr (0: untrained)
    network_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    unet_modules: Annotated[list[UnetModule], Field(min_length=1)] = dataclasses.field(
        default_factory=lambda: list(UNET_ATTENTION))
    train_text_encoder: bool = False
    unet_lr: Rate = 1e-4
    text_encoder_lr: Rate = 5e-5
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = "adamw"
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_grad_norm: Annotated[float, Field(ge=0, le=100)] = 1.0
    scale_weight_norms: Annotated[float, Field(ge=0, le=100)] = 0.0  # kohya's max-norm regularisation; 0 = off
    ema_decay: Annotated[float, Field(ge=0, le=0.9999)] = 0.0  # an EMA of the weights saved beside them; 0 = off
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"] = "constant"
    lr_warmup_steps: Annotated[int, Field(ge=0, le=100_000)] = 0
    lr_cycles: Annotated[int, Field(ge=1, le=100)] = 1
    epochs: Annotated[int, Field(ge=1, le=10_000)] = 10
    max_train_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 0  # set: the run stops there, whatever epochs says
    batch_size: Annotated[int, Field(ge=1, le=64)] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=256)] = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False
    sdpa: bool = True
    cache_latents_to_disk: bool = False
    compile_unet: bool = False  # torch.compile, CUDA only
    min_snr_gamma: Annotated[float, Field(ge=0, le=100)] = 5.0
    noise_offset: Annotated[float, Field(ge=0, le=1)] = 0.0
    multires_noise_iterations: Annotated[int, Field(ge=0, le=20)] = 0  # kohya's multi-resolution noise; 0 = off
    multires_noise_discount: Annotated[float, Field(gt=0, le=1)] = 0.3
    loss_type: Literal["l2", "huber", "smooth_l1"] = "l2"
    huber_c: Annotated[float, Field(gt=0, le=1000)] = 0.1
    huber_schedule: Literal["snr", "exponential", "constant"] = "snr"
    debiased_estimation: bool = False
    prior_loss_weight: Annotated[float, Field(ge=0, le=10)] = 1.0  # regularisation images' share of the loss
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    clip_skip: Annotated[int, Field(ge=1, le=2)] = 1
    caption_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    shuffle_caption: bool = False
    keep_tokens: Annotated[int, Field(ge=0, le=75)] = 0
    save_every_n_epochs: Annotated[int, Field(ge=0, le=10_000)] = 1
    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    sample_prompts: Annotated[list[SamplePrompt], Field(max_length=8)] = dataclasses.field(default_factory=list)
    sample_steps: Annotated[int, Field(ge=1, le=150)] = 20
    sample_every_n_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 0  # besides every save
    sample_negative_prompt: Annotated[str, Field(max_length=1000)] = ""
    sample_cfg: Annotated[float, Field(ge=1, le=30)] = 7.0
    sample_width: Annotated[int, Field(ge=0, le=2048, multiple_of=8)] = 0  # 0: the training resolution
    sample_height: Annotated[int, Field(ge=0, le=2048, multiple_of=8)] = 0
    sample_scheduler: SamplerName = "Euler"
    validation_images: Annotated[int, Field(ge=-1, le=50)] = -1  # -1: 10% of 15 or more images, from 2 to 5
    validation_every_n_steps: Annotated[int, Field(ge=0, le=1_000_000)] = 0  # besides every save
    early_stopping_patience: Annotated[int, Field(ge=0, le=100)] = 0  # 0: off
    scorer: Annotated[str, Field(min_length=1, max_length=500)] = "auto"  # auto, off, clip, a CLIP hub id or folder
    log_with: Literal["none", "tensorboard", "wandb"] = "none"  # a log in the run folder's logs/

    @field_validator("unet_modules")
    @classmethod
    def _no_repeats(cls, modules: list[str]) -> list[str]:
        if len(set(modules)) != len(modules):
            raise ValueError("lists a module twice")
        return modules

    @field_validator("block_dims", "block_alphas", "block_lr")
    @classmethod
    def _every_block(cls, values: list[float]) -> list[float]:
        if values and len(values) != BLOCK_COUNT:
            raise ValueError(f"has {len(values)} values; give all {BLOCK_COUNT} (IN00–IN11, MID, OUT00–OUT11) or none")
        return values

    @field_validator("sample_prompts")
    @classmethod
    def _sample_flags(cls, prompts: list[str]) -> list[str]:
        for number, line in enumerate(prompts, start=1):
            try:
                parse_sample_line(line)
            except ValueError as exc:
                raise ValueError(f"sample prompt {number}: {exc}") from None
        return prompts

    @field_validator("trigger_word")
    @classmethod
    def _visible(cls, word: str) -> str:
        return check_visible(word, "the trigger word")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for metadata and preset files."""
        return dataclasses.asdict(self)

    def prompts(self) -> list[str]:
        """The sample prompts as they are rendered, without their flags: ``{trigger}`` becomes the trigger word. The
        config keeps the placeholder, so a form filled from a run's settings still follows a new trigger word."""
        return [self.sample_line(index).prompt for index in range(len(self.sample_prompts))]

    def sample_line(self, index: int) -> SampleLine:
        """Sample prompt ``index`` with its flags read (sd-scripts' ``--n``, ``--w`` … ``--cs``) and the trigger word
        in place."""
        line = parse_sample_line(self.sample_prompts[index])
        return replace(line, prompt=line.prompt.replace("{trigger}", self.trigger_word or ""))


# name -> (label, what it does and the usual value): the Train tab's labels and info lines, and the CLI's help
FIELD_HELP: dict[str, tuple[str, str]] = {
    "output_name": ("File name", "The LoRA file's name, without .safetensors. Letters, digits, '-', '_' and '.'."),
    "trigger_word": ("Trigger word", "A rare word your captions start with, e.g. 'ohwx'; put it in prompts to call "
                                     "up what was learned."),
    "resolution": ("Resolution", "Training size in pixels (multiple of 64); 512 for SD1.5."),
    "enable_buckets": ("Aspect-ratio buckets", "Train on each image's own shape instead of a square crop."),
    "flip_augment": ("Mirror images", "Also train on left-right flipped copies; off for faces and text."),
    "rank": ("Rank (network dim)", "How much the LoRA can learn; 8–32 is usual, larger files learn more."),
    "alpha": ("Alpha", "Scales the LoRA's effect as alpha / rank; half the rank is usual."),
    "network_type": ("Network type", "lora: attention layers; locon: the convolutions too, for styles and "
                                     "textures; dora: LoRA with a learned magnitude, often better at low rank."),
    "conv_rank": ("Conv rank (LoCon)", "LoCon only: the rank of the 3×3 convolutions; 4–16 is usual."),
    "conv_alpha": ("Conv alpha (LoCon)", "LoCon only: scales the convolutions' LoRA as conv alpha / conv rank."),
    "network_dropout": ("LoRA dropout", "Drops part of the LoRA's input each step against overfitting; 0–0.1, "
                                        "0 = off."),
    "unet_modules": ("UNet layers", "Which UNet layers get a LoRA; the attention layers are the usual choice."),
    "train_text_encoder": ("Train the text encoder", "Also teach CLIP the trigger word; stronger, overfits sooner."),
    "unet_lr": ("Learning rate (UNet)", "1e-4 is usual for AdamW; about 1.0 for Prodigy."),
    "text_encoder_lr": ("Learning rate (text encoder)", "Half the UNet's or less, e.g. 5e-5."),
    "optimizer": ("Optimizer", "AdamW is the default; AdamW8bit saves memory on CUDA; Prodigy finds its own rate."),
    "weight_decay": ("Weight decay", "Keeps the weights small; 0.01 is usual."),
    "max_grad_norm": ("Gradient clipping", "Caps each step's size against spikes; 1.0 is usual, 0 = off."),
    "scale_weight_norms": ("Max LoRA norm", "Scales down any LoRA layer grown stronger than this after each step, "
                                            "against overcooking; 1 is usual, 0 = off."),
    "lr_scheduler": ("LR schedule", "How the learning rate changes over the run; constant or cosine are usual."),
    "lr_warmup_steps": ("Warm-up steps", "Steps spent raising the learning rate from 0; 0–100 is usual."),
    "lr_cycles": ("Restarts", "Cosine with restarts only: how many cycles; 1 is usual."),
    "epochs": ("Epochs", "Passes over the dataset; 10–20 for 20–50 images."),
    "max_train_steps": ("Max steps", "Stop after this many steps, overriding the epochs; 0 = train the epochs."),
    "batch_size": ("Batch size", "Images per step; 1–4 on 8–12 GB cards."),
    "gradient_accumulation_steps": ("Gradient accumulation", "Batches added up per step: a larger batch for free "
                                                             "memory; 1 is usual."),
    "mixed_precision": ("Precision", "bf16 on RTX 30xx and newer; fp16 on older cards; 'no' on CPU."),
    "gradient_checkpointing": ("Gradient checkpointing", "Saves a lot of memory for about 30% more time; on for "
                                                         "8 GB cards."),
    "sdpa": ("Fast attention (SDPA)", "PyTorch's memory-efficient attention; leave on."),
    "compile_unet": ("Compile the UNet", "CUDA only: torch.compile makes each step faster after a warm-up of a "
                                         "minute or two; worth it for long runs."),
    "cache_latents_to_disk": ("Keep latents on disk", "Encode each image once and reuse it in later runs at the same "
                                                      "size; saves minutes on big datasets."),
    "masked_loss": ("Masked loss", "Learn only the parts of each image its mask keeps: its transparency, or a grey "
                                   "name.mask.png beside it (white learnt, black ignored)."),
    "block_dims": ("Ranks per block", "25 ranks for the UNet's blocks IN00–IN11, MID, OUT00–OUT11 (kohya's "
                                      "block_dims); 0 leaves a block's layers out (LoCon's 3×3 convolutions keep "
                                      "the conv rank). Empty: the rank everywhere."),
    "block_alphas": ("Alphas per block", "25 alphas in the same order (kohya's block_alphas). Empty: the alpha "
                                         "everywhere."),
    "block_lr": ("Learning rate per block", "25 multipliers of the UNet learning rate in the same order; 0 leaves "
                                            "a block out. Empty: 1 everywhere."),
    "ema_decay": ("EMA decay", "Also save an average of the weights over the last ~1/(1 − decay) steps beside each "
                               "file (name-ema); smoother, often cleaner. 0.99–0.999, 0 = off."),
    "min_snr_gamma": ("Min-SNR weighting γ", "Steadier training; 5 is usual, 0 = off."),
    "noise_offset": ("Noise offset", "Helps very dark and very bright images; 0–0.1, 0 = off."),
    "multires_noise_iterations": ("Multi-resolution noise", "Adds coarser noise in this many levels so the LoRA "
                                                            "learns overall light and colour too; 6–10, 0 = off."),
    "multires_noise_discount": ("Multi-resolution discount", "How much each coarser level counts; 0.3 is usual, "
                                                             "0.1 for small datasets."),
    "loss_type": ("Loss", "l2 is the usual squared error; huber and smooth_l1 count big errors less, which "
                          "tolerates outlier images."),
    "huber_c": ("Huber c", "Huber and smooth L1: where the error stops counting squared; 0.1 is usual."),
    "huber_schedule": ("Huber schedule", "How c changes with the noise level: snr (the usual), exponential or "
                                         "constant."),
    "debiased_estimation": ("Debiased estimation", "Weights each step by 1/√SNR so low-noise steps do not dominate; "
                                                   "an alternative to min-SNR."),
    "clip_skip": ("CLIP skip", "2 uses CLIP's second-to-last layer, as anime models (NovelAI lineage) expect; "
                               "1 for everything else."),
    "prior_loss_weight": ("Regularisation weight", "With regularisation images: how much their loss counts "
                                                    "against your images'; 1 is usual."),
    "seed": ("Seed", "The same seed and settings train the same LoRA."),
    "caption_dropout": ("Caption dropout", "Share of steps trained with an empty caption; 0–0.1."),
    "shuffle_caption": ("Shuffle tags", "Shuffle comma-separated tags each step; for tag-style captions."),
    "keep_tokens": ("Keep first tags", "Tags that stay in front when shuffling; 1 keeps the trigger word."),
    "save_every_n_epochs": ("Save every N epochs", "Also save (and sample) every N epochs to compare; 0 = final only."),
    "save_dtype": ("Saved precision", "fp16 makes the smallest file every tool reads."),
    "sample_prompts": ("Sample prompts", "Rendered at every save with a fixed seed; {trigger} is the trigger word."),
    "sample_steps": ("Sample steps", "Sampling steps for each sample image; 20 is usual."),
    "sample_every_n_steps": ("Sample every N steps", "Also render the samples every N steps; 0 = only when "
                                                     "saving."),
    "sample_negative_prompt": ("Sample negative prompt", "What the samples should avoid, e.g. 'blurry, lowres'."),
    "sample_cfg": ("Sample CFG", "How closely the samples follow their prompt; 7 is usual."),
    "sample_width": ("Sample width", "Sample image width in pixels; 0 = the training resolution."),
    "sample_height": ("Sample height", "Sample image height in pixels; 0 = the training resolution."),
    "sample_scheduler": ("Sample sampler", "The sampler for the samples; Euler is a safe default."),
    "validation_images": ("Held-out images", "Images kept out of training to measure overfitting at every save; "
                                             "-1 = 10% of 15 or more (2 to 5), 0 = none."),
    "validation_every_n_steps": ("Validate every N steps", "Also measure the held-out loss every N steps; 0 = only "
                                                           "when saving."),
    "early_stopping_patience": ("Early stopping", "Stop once the held-out loss has not improved for this many saves, "
                                                  "keeping the best epoch; 0 = off."),
    "log_with": ("Log to", "Also log the loss, learning rates, held-out loss and samples for TensorBoard (in the "
                           "run folder's logs/) or Weights & Biases (pip install wandb); none = the page only."),
    "scorer": ("Sample scorer", "What judges each saved epoch's samples for the recommended epoch and strength: "
                                "auto = the demo's own analysis on the demo base, CLIP elsewhere; off; or a CLIP "
                                "hub id or folder."),
}
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
    value = repr(error.get("input"))
    if len(value) > 60:
        value = f"{value[:40]}… ({len(str(error.get('input')))} characters)"
    if error["type"] == "string_pattern_mismatch" and name in PATTERN_HINTS:
        return f"{name} = {value}: {PATTERN_HINTS[name]}"
    message = error["msg"][:1].lower() + error["msg"][1:]  # it states the bound ("greater than or equal to 1")
    return f"{name} = {value}: {message}"


class SettingsError(UserError):
    """Invalid settings, with the problem of each field, so a form can mark every field beside itself."""

    def __init__(self, message: str, problems: dict[str, str]) -> None:
        super().__init__(message)
        self.problems = problems


def make_config(values: dict[str, Any], source: str = "settings") -> TrainConfig:
    """Build and validate a config; every problem is named with its field, value and allowed range."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = {str(e["loc"][0]) if e["loc"] else "?": _describe(e) for e in exc.errors()}
        raise SettingsError(f"Invalid {source}: {'; '.join(problems.values())}.", problems) from exc


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
