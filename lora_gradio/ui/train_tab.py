"""Train tab: base model, preset and settings, estimates, then live progress, loss curve, samples, Stop and Resume."""

from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import UserError
from ..estimate import estimate, format_duration
from ..jobs import JobState, resumable_runs
from ..models import DEMO, DEMO_NOTE
from ..training.config import (
    FIELDS,
    TrainConfig,
    field_is_list,
    field_type,
    list_presets,
    load_preset,
    make_config,
    save_preset,
)
from . import AppContext, user_errors

TITLE = "Train"
MAIN = ["trigger_word", "output_name", "rank", "alpha", "unet_lr", "text_encoder_lr", "optimizer", "epochs",
        "batch_size", "resolution", "train_text_encoder"]
SEPARATE = {"sample_prompts"}
ADVANCED = [name for name in FIELDS if name not in MAIN and name not in SEPARATE]
SMOOTHING = 0.9


def preset_choices(ctx: AppContext) -> dict[str, Path]:
    """Built-in presets, then the user's own (saved from this tab)."""
    from ..training.config import PRESETS_DIR

    choices = {name: PRESETS_DIR / f"{name}.toml" for name in list_presets()}
    if ctx.workspace.presets_dir.is_dir():
        choices.update({f"{name} (yours)": ctx.workspace.presets_dir / f"{name}.toml"
                        for name in list_presets(ctx.workspace.presets_dir)})
    return choices


def field_widget(name: str) -> gr.components.Component:
    """A widget matching the field's type: checkbox, dropdown of allowed values, number, or comma list."""
    hint = field_type(name)
    label, elem_id = name.replace("_", " "), f"field-{name}"
    if hint is bool:
        return gr.Checkbox(label=label, elem_id=elem_id)
    if typing.get_origin(hint) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(hint)), label=label, elem_id=elem_id)
    if field_is_list(name):
        return gr.Textbox(label=f"{label} (comma-separated)", elem_id=elem_id)
    if hint in (int, float):
        return gr.Number(label=label, precision=0 if hint is int else None, elem_id=elem_id)
    return gr.Textbox(label=label, elem_id=elem_id)


def to_widget(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    return ", ".join(value) if field_is_list(name) and name not in SEPARATE else value


def from_widget(name: str, value: Any) -> Any:
    """A widget value back as the config field expects it."""
    if field_is_list(name):
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if field_type(name) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def progress_html(state: JobState) -> str:
    """A progress bar with step, epoch and ETA, readable by people and by tests."""
    fraction = state.step / state.total_steps if state.total_steps else 0.0
    eta = f" · ETA {format_duration(state.eta_s)}" if state.eta_s is not None and state.status == "running" else ""
    speed = f" · {state.it_per_s:.2f} it/s" if state.it_per_s else ""
    return (f'<div id="train-progress-text">{state.status}: step {state.step}/{state.total_steps} · epoch '
            f'{state.epoch}/{state.total_epochs}{speed}{eta}</div>'
            f'<progress value="{fraction:.4f}" max="1" style="width:100%;height:18px"></progress>'
            f'<div>{state.message}</div>')


def loss_points(state: JobState) -> list[dict]:
    """Raw and exponentially smoothed loss per step, for the line plot."""
    points, smooth = [], None
    for step, loss in state.losses:
        smooth = loss if smooth is None else SMOOTHING * smooth + (1 - SMOOTHING) * loss
        points += [{"step": step, "loss": loss, "series": "raw"}, {"step": step, "loss": smooth, "series": "smoothed"}]
    return points


def build(ctx: AppContext) -> None:
    """Widgets and events of the Train tab."""
    import pandas as pd

    from .base_picker import base_picker, picked_base

    with gr.Row():
        base_choice, base_repo = base_picker(ctx)
        presets = gr.Dropdown(list(preset_choices(ctx)), value="seed-recommended", label="Preset", scale=2,
                              elem_id="preset")
    description = gr.Markdown()
    widgets: dict[str, gr.components.Component] = {}
    with gr.Row():
        for name in MAIN[:6]:
            widgets[name] = field_widget(name)
    with gr.Row():
        for name in MAIN[6:]:
            widgets[name] = field_widget(name)
    widgets["sample_prompts"] = gr.Textbox(label="Sample prompts, one per line (rendered every saved epoch with a "
                                                 "fixed seed; the trigger word is filled in)", lines=2)
    with gr.Accordion("Advanced", open=False):
        for start in range(0, len(ADVANCED), 5):
            with gr.Row():
                for name in ADVANCED[start:start + 5]:
                    widgets[name] = field_widget(name)
        with gr.Row():
            preset_name = gr.Textbox(label="Save these settings as a preset", placeholder="my-character")
            save = gr.Button("Save preset")
    names = list(widgets)
    plan = gr.Markdown(elem_id="train-estimate")
    with gr.Row():
        check = gr.Button("Estimate")
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves what was learned)", variant="stop", elem_id="train-stop")
    with gr.Row():
        runs = gr.Dropdown(resumable_runs(ctx.workspace.outputs_dir), label="Interrupted runs", scale=3,
                           allow_custom_value=True)
        resume = gr.Button("Resume", scale=1, elem_id="train-resume")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row():
        curve = gr.LinePlot(pd.DataFrame({"step": [], "loss": [], "series": []}), x="step", y="loss",
                            color="series", title="Loss", height=280, elem_id="loss-curve")
        samples = gr.Gallery(label="Samples by epoch (epoch 0 is the base model)", columns=4, height=320,
                             elem_id="train-samples")
    with gr.Row():
        saved = gr.Dataframe(headers=["epoch file", "size"], label="Saved", interactive=False, elem_id="saved-files")
        log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="train-log")

    def config_from(values: list[Any]) -> TrainConfig:
        fields = {name: from_widget(name, value) for name, value in zip(names, values, strict=True)}
        fields["sample_prompts"] = [line.strip() for line in str(values[names.index("sample_prompts")] or "")
                                    .splitlines() if line.strip()]
        return make_config(fields)

    def plan_run(dataset: str | None, choice: str, repo: str, values: list[Any]) -> tuple:
        """The validated config (trigger word filled into the sample prompts), base model and training folder."""
        config = config_from(values)
        if not dataset:
            raise UserError("Choose a dataset above (and add images in the Dataset tab) before training.")
        config = dataclasses.replace(config, sample_prompts=[
            p.replace("{trigger}", config.trigger_word or "") for p in config.sample_prompts])
        return config, picked_base(ctx, choice, repo), ctx.workspace.training_data(dataset)

    @user_errors
    def on_preset(label: str) -> list:
        config, text = load_preset(str(preset_choices(ctx)[label]))
        values = config.to_dict()
        prompts = values["sample_prompts"] or ["{trigger}, portrait photo", "{trigger} in a park"]
        values["sample_prompts"] = "\n".join(prompts)
        return [text or "", *[to_widget(name, values[name]) for name in names]]

    def fill_trigger(prompts: str, trigger: str) -> str:
        return (prompts or "").replace("{trigger}", (trigger or "").strip() or "{trigger}")

    @user_errors
    def on_estimate(dataset: str | None, choice: str, repo: str, *values: Any) -> str:
        config, base, data = plan_run(dataset, choice, repo, list(values))
        note = f"\n\n{DEMO_NOTE}" if base.kind == DEMO else ""
        return (f"{estimate(config, data, demo=base.kind == DEMO).markdown()} Training on `{data}`." + note)

    @user_errors
    def on_start(dataset: str | None, choice: str, repo: str, *values: Any) -> tuple[str, dict]:
        config, base, data = plan_run(dataset, choice, repo, list(values))
        text = estimate(config, data, demo=base.kind == DEMO).markdown()
        run_dir = ctx.workspace.outputs_dir / f"{config.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        ctx.jobs.start(config, base, data, run_dir)
        return text, gr.update(choices=resumable_runs(ctx.workspace.outputs_dir))

    @user_errors
    def on_resume(run: str | None) -> dict:
        if not run:
            raise UserError("Pick an interrupted run to resume.")
        ctx.jobs.resume(ctx.workspace.outputs_dir / run)
        return gr.update(choices=resumable_runs(ctx.workspace.outputs_dir))

    @user_errors
    def on_save(name: str, *values: Any) -> tuple[dict, str]:
        name = name.strip()
        if not name or "/" in name or name.startswith("."):
            raise UserError("Give the preset a simple name, such as my-character.")
        save_preset(config_from(list(values)), ctx.workspace.presets_dir / f"{name}.toml", "Saved from the app.")
        return gr.update(choices=list(preset_choices(ctx)), value=f"{name} (yours)"), ""

    def on_tick() -> tuple:
        state = ctx.jobs.view()
        gallery = [(path, f"epoch {epoch}") for epoch, path in state.samples]
        files = [[Path(p).name, f"{Path(p).stat().st_size / 1e6:.1f} MB"] for p in state.saved if Path(p).exists()]
        return (progress_html(state), pd.DataFrame(loss_points(state), columns=["step", "loss", "series"]), gallery,
                files, "\n".join(state.log))

    inputs = [widgets[n] for n in names]
    presets.change(on_preset, presets, [description, *inputs], api_name="load_preset")
    widgets["trigger_word"].change(fill_trigger, [widgets["sample_prompts"], widgets["trigger_word"]],
                                   widgets["sample_prompts"])
    check.click(on_estimate, [ctx.dataset, base_choice, base_repo, *inputs], plan)
    start.click(on_start, [ctx.dataset, base_choice, base_repo, *inputs], [plan, runs], api_name="train_start")
    stop.click(ctx.jobs.stop, None, None, api_name="train_stop")
    resume.click(on_resume, runs, runs, api_name="train_resume")
    save.click(on_save, [preset_name, *inputs], [presets, preset_name])
    timer = gr.Timer(1.0)
    timer.tick(on_tick, None, [progress, curve, samples, saved, log], show_progress="hidden")
    ctx.app.load(on_preset, presets, [description, *inputs])
    ctx.app.load(on_tick, None, [progress, curve, samples, saved, log])
    def job_status() -> dict:
        """The training job's full state, for scripts."""
        return dataclasses.asdict(ctx.jobs.view())

    gr.api(job_status, api_name="job_status")
