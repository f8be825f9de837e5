"""The Train tab's settings form: one widget per config field, read and filled by component, never by position."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import gradio as gr

from ..studio import MAX_REPEATS, parse_sample_line
from ..training.config import FIELD_HELP, TrainConfig, field_is_list, field_type, make_config

MAIN = ["trigger_word", "output_name", "epochs", "batch_size", "unet_lr", "rank", "alpha", "optimizer",
        "resolution", "train_text_encoder"]
SEPARATE = {"sample_prompts"}
ADVANCED = {  # the advanced settings under headings, four to a row
    "Network": ["network_type", "conv_rank", "conv_alpha", "network_dropout", "unet_modules", "text_encoder_lr",
                "clip_skip", "scale_weight_norms", "block_dims", "block_alphas", "block_lr"],
    "Steps and schedule": ["max_train_steps", "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps",
                           "lr_cycles", "weight_decay", "max_grad_norm", "ema_decay", "seed"],
    "Noise and loss": ["min_snr_gamma", "noise_offset", "multires_noise_iterations", "multires_noise_discount",
                       "loss_type", "huber_c", "huber_schedule", "debiased_estimation", "prior_loss_weight"],
    "Images and captions": ["enable_buckets", "flip_augment", "masked_loss", "caption_dropout", "shuffle_caption",
                            "keep_tokens"],
    "Speed and memory": ["mixed_precision", "gradient_checkpointing", "sdpa", "cache_latents_to_disk",
                         "compile_unet"],
    "Saving and samples": ["save_every_n_epochs", "save_dtype", "log_with", "sample_every_n_steps", "sample_steps",
                           "sample_negative_prompt", "sample_cfg", "sample_scheduler", "sample_width", "sample_height"],
    "Validation (held-out images)": ["validation_images", "validation_every_n_steps", "early_stopping_patience",
                                     "scorer"],
}
DEFAULT_PROMPTS = ["{trigger}, portrait photo", "{trigger} in a park"]


def field_widget(name: str, value: Any) -> gr.components.Component:
    """A widget matching the field's type, with its plain label and an info line saying what it does."""
    hint = field_type(name)
    label, info = FIELD_HELP[name]
    common = {"value": value, "label": label, "info": info, "elem_id": f"field-{name}"}
    if hint is bool:
        return gr.Checkbox(**common)
    if typing.get_origin(hint) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(hint)), **common)
    if field_is_list(name):
        return gr.Textbox(**{**common, "label": f"{label} (comma-separated)"})
    if hint in (int, float):
        return gr.Number(precision=0 if hint is int else None, **common)
    return gr.Textbox(**common)


def to_widget(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    if name in SEPARATE:
        return "\n".join(value or DEFAULT_PROMPTS)
    return ", ".join(f"{item:g}" if isinstance(item, float) else str(item) for item in value) \
        if field_is_list(name) else value


def from_widget(name: str, value: Any) -> Any:
    """A widget value back as the config field expects it."""
    if name in SEPARATE:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if field_is_list(name):
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if field_type(name) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def preview_samples(prompts: str, trigger: str) -> str:
    """The prompts as the samples will use them, each with what its own flags set (sd-scripts' ``--w 768`` …) and a
    line that cannot be read named; the box keeps {trigger}, so any retyping stays right."""
    shown = []
    for number, text in enumerate((line for line in (prompts or "").splitlines() if line.strip()), start=1):
        try:
            line = parse_sample_line(text)
        except ValueError as exc:
            shown.append(f"⚠️ line {number}: {exc}")
            continue
        settings = line.described()
        shown.append(f"`{line.prompt.replace('{trigger}', (trigger or '').strip())}`"
                     + (f" ({settings})" if settings else ""))
    return "Samples will use: " + " · ".join(shown) if shown else "No sample images."


@dataclass
class SettingsForm:
    """The form's widgets: the run's dataset options, one widget per config field, and the samples' preview line."""

    repeats: gr.Number
    regularization: gr.Dropdown
    validation: gr.Dropdown
    fields: dict[str, gr.components.Component]
    sample_preview: gr.Markdown
    preset_name: gr.Textbox
    save: gr.Button

    @property
    def widgets(self) -> set[gr.components.Component]:
        """Every field's widget: the inputs of a handler that reads the whole form."""
        return set(self.fields.values())

    def config(self, values: dict) -> TrainConfig:
        """The config the form's widgets hold, from a handler's values keyed by component."""
        return make_config({name: from_widget(name, values[widget]) for name, widget in self.fields.items()})

    def saved(self, values: dict) -> dict[str, Any]:
        """The fields' widget values by field name, as the browser remembers them."""
        return {name: values[widget] for name, widget in self.fields.items()}

    def filled(self, shown: dict[str, Any]) -> dict:
        """Updates that fill the form from widget values by field name, with the samples' preview to match."""
        return {**{self.fields[name]: value for name, value in shown.items()},
                self.sample_preview: preview_samples(shown["sample_prompts"], shown["trigger_word"])}

    def show(self, config: TrainConfig, trigger: str = "") -> dict:
        """Updates that fill the form with a config; a trigger word typed already stays."""
        shown = {name: to_widget(name, value) for name, value in config.to_dict().items()}
        shown["trigger_word"] = trigger or shown["trigger_word"]
        return self.filled(shown)

    def marks(self, problems: dict[str, str]) -> dict:
        """Every field's update: a problem shown beside its field in place of the usual info line."""
        return {widget: gr.update(info=f"⚠️ {problems[name]}", elem_classes=["invalid-field"]) if name in problems
                else gr.update(info=FIELD_HELP[name][1], elem_classes=[]) for name, widget in self.fields.items()}


def settings_form(config: TrainConfig, datasets: list[tuple[str, str]]) -> SettingsForm:
    """The run's other datasets (regularisation, validation) and repeats, the main settings in two rows, the sample
    prompts with their preview, and the advanced ones under headings with Save preset; ``datasets`` are the
    choices of a second dataset."""
    first = {name: to_widget(name, value) for name, value in config.to_dict().items()}
    with gr.Row():
        repeats = gr.Number(1, precision=0, minimum=1, maximum=MAX_REPEATS, label="Repeats per epoch", scale=1,
                            info="How often an epoch shows each image (kohya's N_ folder prefix); kept with the "
                                 "dataset.", elem_id="train-repeats")
        regular = gr.Dropdown(datasets, value="", scale=2, elem_id="train-regularization",
                              label="Regularisation images (optional)", allow_custom_value=True,
                              info="Another dataset of plain pictures of the class ('a photo of a woman'), "
                                   "against overfitting; weighted by 'Regularisation weight'.")
        validation = gr.Dropdown(datasets, value="", scale=2, elem_id="train-validation",
                                 label="Validation dataset (optional)", allow_custom_value=True,
                                 info="Other photos of the same subject to measure overfitting on; none: a few of "
                                      "this dataset's images are held out (Advanced → Validation).")
    fields: dict[str, gr.components.Component] = {}
    for start_at in (0, 5):
        with gr.Row():
            for name in MAIN[start_at:start_at + 5]:
                fields[name] = field_widget(name, first[name])
    with gr.Row():
        fields["sample_prompts"] = gr.Textbox(first["sample_prompts"], label="Sample prompts, one per line",
                                              info=FIELD_HELP["sample_prompts"][1], lines=2, scale=3,
                                              elem_id="field-sample_prompts")
        preview = gr.Markdown(preview_samples(first["sample_prompts"], first["trigger_word"]),
                              elem_id="sample-preview")
    with gr.Accordion("Advanced settings", open=False):
        for heading, group in ADVANCED.items():
            gr.Markdown(f"**{heading}**", elem_classes=["settings-heading"])
            for start_at in range(0, len(group), 4):
                with gr.Row():
                    for name in group[start_at:start_at + 4]:
                        fields[name] = field_widget(name, first[name])
        with gr.Row(equal_height=True):
            preset_name = gr.Textbox(label="Save these settings as a preset", placeholder="my-character", scale=3)
            save = gr.Button("Save preset", scale=1)
    return SettingsForm(repeats, regular, validation, fields, preview, preset_name, save)
