"""Train tab: base model, preset and settings, estimates, then live progress, loss curve, samples, Stop and Resume."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from ..errors import UserError
from ..jobs import JobRunner, JobState
from ..models import DEMO, DEMO_NOTE
from ..studio import TrainingPlan
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
from ..training.run_folder import resumable_runs
from . import PRIVATE, AppContext, progress_html, shown, stop_handler, user_errors

if TYPE_CHECKING:
    import pandas as pd

TITLE = "Train"
MAIN = ["trigger_word", "output_name", "rank", "alpha", "unet_lr", "text_encoder_lr", "optimizer", "epochs",
        "batch_size", "resolution", "train_text_encoder"]
SEPARATE = {"sample_prompts"}
ADVANCED = [name for name in FIELDS if name not in MAIN and name not in SEPARATE]
SMOOTHING = 0.9
PLOT_POINTS = 500  # the curve keeps its shape; the page gets at most this many steps


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


def loss_frame(losses: list[list[float]], limit: int = PLOT_POINTS) -> pd.DataFrame:
    """Raw and exponentially smoothed loss per step for the line plot, thinned to ``limit`` steps on long runs."""
    import pandas as pd

    points, smooth = [], None
    every = max(1, math.ceil(len(losses) / limit))
    for index, (step, loss) in enumerate(losses):
        smooth = loss if smooth is None else SMOOTHING * smooth + (1 - SMOOTHING) * loss
        if index % every == 0 or index == len(losses) - 1:
            points += [{"step": step, "loss": loss, "series": "raw"},
                       {"step": step, "loss": smooth, "series": "smoothed"}]
    return pd.DataFrame(points, columns=["step", "loss", "series"])


def follow_losses(jobs: JobRunner, seen: dict) -> tuple[JobState, dict, bool]:
    """The training job's state with only the losses this page has not seen, the page's new record, and whether
    the curve changed (new points, or another run)."""
    have = seen.get("losses", [])
    state = jobs.latest("training", since=len(have))
    if state.started != seen.get("started"):
        have, state = [], jobs.latest("training")
    losses = have + [list(point) for point in state.losses]
    return state, {"started": state.started, "losses": losses}, bool(state.losses) or not seen


def build(ctx: AppContext) -> None:
    """Widgets and events of the Train tab."""
    from .base_picker import base_name, base_picker

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
                                                 "fixed seed; {trigger} stands for the trigger word)", lines=2)
    sample_preview = gr.Markdown(elem_id="sample-preview")
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
        prepare_again = gr.Button("Prepare again", visible=False, elem_id="train-prepare-again")
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves what was learned)", variant="stop", elem_id="train-stop")
    with gr.Row():
        runs = gr.Dropdown(resumable_runs(ctx.workspace.outputs_dir), label="Interrupted runs", scale=3,
                           allow_custom_value=True, elem_id="train-runs")
        resume = gr.Button("Resume", scale=1, elem_id="train-resume")
    progress = gr.HTML(elem_id="train-progress")
    train_job = gr.BrowserState("", storage_key="lora-gradio-training-job")  # this page's run: the key to Stop
    seen_losses = gr.State({})
    with gr.Row():
        curve = gr.LinePlot(loss_frame([]), x="step", y="loss",
                            color="series", title="Loss", height=280, elem_id="loss-curve")
        samples = gr.Gallery(label="Samples by epoch (epoch 0 is the base model)", columns=4, height=320,
                             elem_id="train-samples")
    with gr.Row():
        saved = gr.File(label="Saved LoRA files (click one to download it)", file_count="multiple",
                        interactive=False, elem_id="saved-files")
        log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="train-log")

    def config_from(values: list[Any]) -> TrainConfig:
        fields = {name: from_widget(name, value) for name, value in zip(names, values, strict=True)}
        fields["sample_prompts"] = [line.strip() for line in str(values[names.index("sample_prompts")] or "")
                                    .splitlines() if line.strip()]
        return make_config(fields)

    def plan_run(dataset: str | None, choice: str, repo: str, values: list[Any]) -> TrainingPlan:
        return ctx.studio.plan_training(dataset, base_name(choice, repo), config_from(values))

    @user_errors
    def on_preset(label: str) -> list:
        config, text = load_preset(str(preset_choices(ctx)[label]))
        values = config.to_dict()
        prompts = values["sample_prompts"] or ["{trigger}, portrait photo", "{trigger} in a park"]
        values["sample_prompts"] = "\n".join(prompts)
        return [text or "", *[to_widget(name, values[name]) for name in names]]

    def preview_samples(prompts: str, trigger: str) -> str:
        """The prompts as the samples will use them; the box keeps {trigger}, so any retyping stays right."""
        lines = [line.replace("{trigger}", (trigger or "").strip()) for line in (prompts or "").splitlines()
                 if line.strip()]
        return "Samples will use: " + " · ".join(f"`{line}`" for line in lines) if lines else "No sample images."

    def plan_text(plan: TrainingPlan) -> str:
        note = f"\n\n{DEMO_NOTE}" if plan.base.kind == DEMO else ""
        return f"{plan.estimate.markdown()} Training on dataset `{plan.images.parent.name}`." + note

    @user_errors
    def on_estimate(dataset: str | None, choice: str, repo: str, *values: Any) -> tuple[str, dict]:
        plan = plan_run(dataset, choice, repo, list(values))
        return plan_text(plan), gr.update(visible=plan.estimate.stale is not None)

    @user_errors
    def on_start(request: gr.Request, dataset: str | None, choice: str, repo: str, *values: Any,
                 ) -> tuple[str, dict, str, dict]:
        plan = plan_run(dataset, choice, repo, list(values))
        job_id = ctx.studio.start_training(plan, request.username)
        return (plan_text(plan), gr.update(choices=resumable_runs(ctx.workspace.outputs_dir)), job_id,
                gr.update(visible=plan.estimate.stale is not None))

    @user_errors
    def on_prepare_again(dataset: str | None, request: gr.Request) -> tuple[str, str, dict]:
        job_id = ctx.studio.prepare_again(dataset, request.username)
        return job_id, "Preparing the training copies again; the Dataset tab shows the progress.", \
            gr.update(visible=False)

    @user_errors
    def on_resume(run: str | None, request: gr.Request) -> tuple[dict, str]:
        job_id = ctx.studio.resume_training(run, request.username)
        return gr.update(choices=resumable_runs(ctx.workspace.outputs_dir)), job_id

    @user_errors
    def on_save(name: str, *values: Any) -> tuple[dict, str]:
        name = name.strip()
        if not name or "/" in name or name.startswith("."):
            raise UserError("Give the preset a simple name, such as my-character.")
        save_preset(config_from(list(values)), ctx.workspace.presets_dir / f"{name}.toml", "Saved from the app.")
        return gr.update(choices=list(preset_choices(ctx)), value=f"{name} (yours)"), ""

    def on_tick(before: dict) -> tuple:
        state, seen, changed = follow_losses(ctx.studio.jobs, before)
        seen["active"] = state.active  # a run that starts or ends changes the list of interrupted runs
        runs_now = gr.update(choices=resumable_runs(ctx.workspace.outputs_dir)) \
            if before.get("active") != state.active or "active" not in before else gr.skip()
        gallery = [(shown(path), f"epoch {epoch}") for epoch, path in state.samples if Path(path).exists()]
        seen["saved"] = [p for p in state.saved if Path(p).exists()]
        files = ([shown(p) for p in seen["saved"]] or None) if seen["saved"] != before.get("saved") else gr.skip()
        curve = loss_frame(seen["losses"]) if changed else gr.skip()
        return progress_html(state), curve, gallery, files, "\n".join(state.log), seen, runs_now

    inputs = [widgets[n] for n in names]
    presets.change(on_preset, presets, [description, *inputs], **PRIVATE)
    for box in (widgets["trigger_word"], widgets["sample_prompts"]):
        box.change(preview_samples, [widgets["sample_prompts"], widgets["trigger_word"]], sample_preview,
                   show_progress="hidden", **PRIVATE)
    check.click(on_estimate, [ctx.dataset, base_choice, base_repo, *inputs], [plan, prepare_again], **PRIVATE)
    start.click(on_start, [ctx.dataset, base_choice, base_repo, *inputs], [plan, runs, train_job, prepare_again],
                **PRIVATE)
    prepare_again.click(on_prepare_again, ctx.dataset, [ctx.prepare_job, plan, prepare_again], **PRIVATE)
    stop.click(stop_handler(ctx.studio), train_job, None, **PRIVATE)
    resume.click(on_resume, runs, [runs, train_job], **PRIVATE)
    save.click(on_save, [preset_name, *inputs], [presets, preset_name], **PRIVATE)
    live = [progress, curve, samples, saved, log, seen_losses, runs]
    gr.Timer(1.0).tick(on_tick, seen_losses, live, show_progress="hidden", **PRIVATE)
    ctx.app.load(on_preset, presets, [description, *inputs], **PRIVATE)
    ctx.app.load(on_tick, seen_losses, live, **PRIVATE)
