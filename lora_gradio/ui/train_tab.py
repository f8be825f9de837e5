"""Train tab: Start, Stop and live progress on top, then base model, preset and settings, then the loss chart,
samples, saved files and the log, and the list of runs with Resume and Delete."""

from __future__ import annotations

import html
import re
import typing
from functools import wraps
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import UserError
from ..jobs import JobRunner, JobState
from ..studio import DEMO, DEMO_NOTE, MAX_REPEATS, SAMPLE_GRID, TrainingPlan, lora_name
from ..training.config import FIELD_HELP, SettingsError, TrainConfig, field_is_list, field_type, make_config
from .charts import loss_chart
from .common import PRIVATE, AppContext, progress_html, public_text, shown, stop_handler, user_errors

TITLE = "Train"
MAIN = ["trigger_word", "output_name", "epochs", "batch_size", "unet_lr", "rank", "alpha", "optimizer",
        "resolution", "train_text_encoder"]
SEPARATE = {"sample_prompts"}
ADVANCED = {  # the advanced settings under headings, four to a row
    "Network": ["network_type", "conv_rank", "conv_alpha", "network_dropout", "unet_modules", "text_encoder_lr",
                "clip_skip", "scale_weight_norms"],
    "Steps and schedule": ["max_train_steps", "gradient_accumulation_steps", "lr_scheduler", "lr_warmup_steps",
                           "lr_cycles", "weight_decay", "max_grad_norm", "seed"],
    "Noise and loss": ["min_snr_gamma", "noise_offset", "prior_loss_weight"],
    "Images and captions": ["enable_buckets", "flip_augment", "caption_dropout", "shuffle_caption", "keep_tokens"],
    "Speed and memory": ["mixed_precision", "gradient_checkpointing", "sdpa", "cache_latents_to_disk",
                         "compile_unet"],
    "Saving and samples": ["save_every_n_epochs", "save_dtype", "sample_every_n_steps", "sample_steps",
                           "sample_negative_prompt", "sample_cfg", "sample_scheduler", "sample_width", "sample_height"],
}
DEFAULT_PROMPTS = ["{trigger}, portrait photo", "{trigger} in a park"]
RUN_COLUMNS = ["run", "status", "date", "steps", "recent loss"]


def default_preset(base: str | None) -> str:
    """The demo base trains with the demo preset; real models start from the recommended one."""
    return "demo" if base == DEMO else "seed-recommended"


def regularization_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """'none', then every dataset: the second dataset a run may take its class images from."""
    return [("none", ""), *((name, name) for name in ctx.workspace.list_datasets())]


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
    return ", ".join(value) if field_is_list(name) else value


def from_widget(name: str, value: Any) -> Any:
    """A widget value back as the config field expects it."""
    if name in SEPARATE:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if field_is_list(name):
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if field_type(name) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def marks(names: list[str], problems: dict[str, str]) -> list[dict]:
    """Every field's widget update: a problem shown beside its field in place of the usual info line."""
    return [gr.update(info=f"⚠️ {problems[name]}", elem_classes=["invalid-field"]) if name in problems
            else gr.update(info=FIELD_HELP[name][1], elem_classes=[]) for name in names]


def preview_samples(prompts: str, trigger: str) -> str:
    """The prompts as the samples will use them; the box keeps {trigger}, so any retyping stays right."""
    lines = [line.replace("{trigger}", (trigger or "").strip()) for line in (prompts or "").splitlines()
             if line.strip()]
    return "Samples will use: " + " · ".join(f"`{line}`" for line in lines) if lines else "No sample images."


def log_html(lines: list[str]) -> str:
    """The job's log, newest line at the bottom and in view: a reversed flex column starts scrolled to its end."""
    body = html.escape(public_text("\n".join(lines))) or "The log of the current run appears here."
    return (f'<div id="train-log-box" class="log-box"><pre id="train-log-lines">{body}</pre></div>')


def follow_losses(jobs: JobRunner, seen: dict) -> tuple[JobState, dict, bool]:
    """The training job's state with only the losses this page has not seen, the page's new record, and whether
    the curve changed (new points, or another run)."""
    have = seen.get("losses", [])
    state = jobs.latest("training", since=len(have))
    if state.started != seen.get("started"):
        have, state = [], jobs.latest("training")
    losses = have + [list(point) for point in state.losses]
    return state, {"started": state.started, "losses": losses}, bool(state.losses) or not seen


def sample_items(state: JobState, prompts: list[str]) -> list[tuple[str, str]]:
    """The run's samples (paths) labelled by epoch or step and prompt, newest first, and the epochs × prompts grid
    first once the run made it."""

    def when(epoch: int, path: str) -> tuple[int, int, int]:
        """Order within a run: an epoch's step samples (``step00000150-0.png``), then its end's."""
        number, _, _ = Path(path).name.removeprefix("step").partition("-")
        return (epoch, 0, int(number)) if Path(path).name.startswith("step") else (epoch, 1, 0)

    items = [(path, "all epochs × prompts") for path in state.saved if Path(path).name == SAMPLE_GRID]
    for epoch, path in sorted(state.samples, key=lambda item: when(*item), reverse=True):
        index = int(Path(path).stem.rpartition("-")[2] or 0)
        prompt = prompts[index] if index < len(prompts) else ""
        _, kind, step = when(epoch, path)
        label = f"epoch {epoch}" if kind else f"step {step}"
        items.append((path, f"{label} · prompt {index + 1}" if prompt and len(prompts) > 1 else label))
    return [item for item in items if Path(item[0]).exists()]


def sample_legend(prompts: list[str]) -> str:
    """The heading over the samples, with the prompts their labels number."""
    lines = "".join(f"\n{i}. {html.escape(p)}" for i, p in enumerate(prompts, 1)) if len(prompts) > 1 else \
        (f" · {html.escape(prompts[0])}" if prompts else "")
    return f"**Samples** by epoch or step, newest first (epoch 0 is the base model){lines}"


def file_rank(path: str) -> int:
    """0 for a run's LoRA (and other files), 1 for its sample grid, 2 for an epoch's or a stop's file."""
    name = Path(path).name
    if name == SAMPLE_GRID:
        return 1
    return 2 if re.search(r"-(\d{6}|step\d+)\.safetensors$", name) else 0


def saved_order(paths: list[str]) -> list[str]:
    """The files a person wants first: the LoRA, the sample grid, then the epoch files, newest first."""
    return [p for _, _, p in sorted((file_rank(p), -index, p) for index, p in enumerate(paths))]


def build(ctx: AppContext) -> None:
    """Widgets and events of the Train tab."""
    from .base_picker import base_name, base_picker

    with gr.Row(equal_height=True):
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=2)
        stop = gr.Button("Stop & save", variant="stop", elem_id="train-stop", scale=1,
                         interactive=False)
        check = gr.Button("Estimate", scale=1, elem_id="train-check")
        prepare_again = gr.Button("Prepare again", visible=False, elem_id="train-prepare-again", scale=1)
    progress = gr.HTML(elem_id="train-progress")
    limits = ctx.studio.limits.describe_training()
    plan = gr.Markdown(limits, elem_id="train-estimate")
    job_line = gr.Markdown(elem_id="train-job")
    with gr.Row():
        base_choice, base_repo = base_picker(ctx)
        presets = gr.Dropdown(list(ctx.studio.presets()), value=default_preset(DEMO), label="Preset", scale=2,
                              elem_id="preset")
    # the page opens on the preset for the demo base, usable before its load event restores anything
    first, first_text = ctx.studio.preset(default_preset(DEMO))
    first_values = {name: to_widget(name, value) for name, value in first.to_dict().items()}
    description = gr.Markdown(first_text, elem_id="preset-description")
    with gr.Row():
        repeats = gr.Number(1, precision=0, minimum=1, maximum=MAX_REPEATS, label="Repeats per epoch", scale=1,
                            info="How often an epoch shows each image (kohya's N_ folder prefix); kept with the "
                                 "dataset.", elem_id="train-repeats")
        regularization = gr.Dropdown(regularization_choices(ctx), value="", scale=2, elem_id="train-regularization",
                                     label="Regularisation images (optional)", allow_custom_value=True,
                                     info="Another dataset of plain pictures of the class ('a photo of a woman'), "
                                          "against overfitting; weighted by 'Regularisation weight'.")
    widgets: dict[str, gr.components.Component] = {}
    for start_at in (0, 5):
        with gr.Row():
            for name in MAIN[start_at:start_at + 5]:
                widgets[name] = field_widget(name, first_values[name])
    with gr.Row():
        widgets["sample_prompts"] = gr.Textbox(first_values["sample_prompts"], label="Sample prompts, one per line",
                                               info=FIELD_HELP["sample_prompts"][1], lines=2, scale=3,
                                               elem_id="field-sample_prompts")
        sample_preview = gr.Markdown(preview_samples(first_values["sample_prompts"], first_values["trigger_word"]),
                                     elem_id="sample-preview")
    with gr.Accordion("Advanced settings", open=False):
        for heading, group in ADVANCED.items():
            gr.Markdown(f"**{heading}**", elem_classes=["settings-heading"])
            for start_at in range(0, len(group), 4):
                with gr.Row():
                    for name in group[start_at:start_at + 4]:
                        widgets[name] = field_widget(name, first_values[name])
        with gr.Row(equal_height=True):
            preset_name = gr.Textbox(label="Save these settings as a preset", placeholder="my-character", scale=3)
            save = gr.Button("Save preset", scale=1)
    names = list(widgets)
    inputs = [widgets[n] for n in names]
    train_job = ctx.remembered("training-job", "")  # this page's run: the key to Stop
    form = ctx.remembered("train-form", {})  # the form as this browser left it
    seen_losses = gr.State({})
    with gr.Row():
        curve = gr.HTML(loss_chart([]), elem_id="loss-curve", label="Loss")
        with gr.Column():
            legend = gr.Markdown(sample_legend([]), elem_id="sample-legend")
            samples = gr.Gallery(show_label=False, columns=4, height=300, elem_id="train-samples")
    with gr.Row():
        with gr.Column():
            final = gr.DownloadButton("Download the LoRA", visible=False, variant="primary", elem_id="final-lora")
            saved = gr.File(label="Every saved file: the LoRA, the sample grid, then each epoch's file, newest "
                                  "first (click a name to download it)", file_count="multiple", height=300,
                            interactive=False, elem_id="saved-files")
        log = gr.HTML(log_html([]), elem_id="train-log")
    rows = ctx.studio.runs()
    with gr.Accordion("Runs: resume, delete", open=False, elem_id="runs-panel") as runs_panel:
        run_table = gr.Dataframe(rows, headers=RUN_COLUMNS, interactive=False, elem_id="runs-table",
                                 label="Runs, newest first")
        with gr.Row(equal_height=True):
            runs = gr.Dropdown(ctx.studio.interrupted_runs(), label="Interrupted runs", scale=3,
                               allow_custom_value=True, elem_id="train-runs")
            resume = gr.Button("Resume", scale=1, elem_id="train-resume")
            doomed = gr.Dropdown([row[0] for row in rows], label="Run to delete", scale=3,
                                 elem_id="runs-delete-choice")
            delete = gr.Button("Delete…", scale=1, variant="stop", elem_id="runs-delete")
        with gr.Row(visible=False, elem_id="runs-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Yes, delete it", variant="stop", scale=0, elem_id="runs-delete-yes")
            cancel = gr.Button("Cancel", scale=0, elem_id="runs-delete-no")
        runs_note = gr.Markdown(elem_id="runs-note")

    def config_from(values: list[Any]) -> TrainConfig:
        return make_config({name: from_widget(name, value) for name, value in zip(names, values, strict=True)})

    def plan_run(dataset: str | None, choice: str, repo: str, regular: str | None, times: int | None,
                 values: list[Any]) -> TrainingPlan:
        return ctx.studio.plan_training(dataset, base_name(choice, repo), config_from(values), regular or None, times)

    def plan_text(plan: TrainingPlan) -> str:
        note = f"\n\n{DEMO_NOTE}" if plan.base.kind == DEMO else ""
        if not plan.config.trigger_word:
            note += ("\n\n⚠️ No trigger word: the LoRA will have no word to call it up, and `{trigger}` in the sample "
                     "prompts stays empty. Type the word your captions start with (the Caption tab keeps it too).")
        return f"{plan.estimate.markdown()} Training on dataset `{plan.data.images.parent.name}`.{note}\n\n{limits}"

    def form_values(config: TrainConfig) -> list:
        values = config.to_dict()
        return [to_widget(name, values[name]) for name in names]

    def preset_values(label: str) -> list:
        config, text = ctx.studio.preset(label if label in ctx.studio.presets() else default_preset(DEMO))
        return [text or "", *form_values(config)]

    def preset_form(label: str, trigger: str) -> list:
        """A preset's description, its values in the form (keeping the trigger word typed) and the sample line."""
        text, *values = preset_values(label)
        values[names.index("trigger_word")] = trigger or values[names.index("trigger_word")]
        prompts = values[names.index("sample_prompts")]
        return [text, *values, preview_samples(prompts, values[names.index("trigger_word")])]

    on_preset = user_errors(preset_form)

    @user_errors
    def on_base(choice: str, current: str, trigger: str) -> list:
        """The demo base picks the demo preset; a real base leaves the demo preset for the recommended one."""
        wanted = default_preset(choice)
        if wanted == current or (choice != DEMO and current != "demo"):
            return [gr.skip()] * (len(names) + 3)
        return [wanted, *preset_form(wanted, trigger)]

    def with_marks(handler: typing.Callable[..., list], fixed: int) -> typing.Callable[..., list]:
        """Run a Start/Estimate handler; invalid settings are marked beside their fields, and a toast sums up.
        Any other refusal is a toast alone (``user_errors``)."""
        @user_errors
        @wraps(handler)  # gradio reads the handler's signature to pass the request
        def wrapped(*args: Any) -> list:
            try:
                return [*handler(*args), *marks(names, {})]
            except SettingsError as exc:
                gr.Warning(str(exc))
                return [gr.skip()] * fixed + marks(names, exc.problems)
        return wrapped

    def on_estimate(dataset: str | None, choice: str, repo: str, regular: str | None, times: int | None,
                    *values: Any) -> list:
        plan = plan_run(dataset, choice, repo, regular, times, list(values))
        return [plan_text(plan), gr.update(visible=plan.estimate.stale is not None)]

    def on_start(request: gr.Request, dataset: str | None, choice: str, repo: str, regular: str | None,
                 times: int | None, *values: Any) -> list:
        plan = plan_run(dataset, choice, repo, regular, times, list(values))
        job_id = ctx.studio.start_training(plan, ctx.visitor(request))
        return [plan_text(plan), job_id, gr.update(visible=plan.estimate.stale is not None)]

    @user_errors
    def on_prepare_again(dataset: str | None, request: gr.Request) -> tuple[str, str, dict]:
        job_id = ctx.studio.prepare_again(dataset, ctx.visitor(request))
        return job_id, "Preparing the training copies again; the Dataset tab shows the progress.", \
            gr.update(visible=False)

    @user_errors
    def on_resume(run: str | None, request: gr.Request) -> str:
        return ctx.studio.resume_training(run, ctx.visitor(request))

    @user_errors
    def on_save(request: gr.Request, name: str, *values: Any) -> tuple[dict, str]:
        label = ctx.studio.save_preset(name, config_from(list(values)), ctx.visitor(request))
        return gr.update(choices=list(ctx.studio.presets()), value=label), ""

    @user_errors
    def on_ask_delete(run: str | None) -> tuple[dict, str]:
        folder = ctx.studio.run_folder(run, "delete")
        return gr.update(visible=True), f"Delete run **{folder.path.name}** with all its LoRA files and samples?"

    def runs_view() -> tuple[dict, dict, list, dict]:
        """The runs, and their panel opened while some run waits to be resumed."""
        interrupted, listed = ctx.studio.interrupted_runs(), ctx.studio.runs()
        return (gr.update(choices=interrupted, value=None), gr.update(choices=[row[0] for row in listed], value=None),
                listed,
                gr.update(open=True) if interrupted else gr.skip())

    @user_errors
    def on_delete(run: str | None, request: gr.Request) -> tuple:
        note = ctx.studio.delete_run(run, ctx.visitor(request))
        return note, gr.update(visible=False), *runs_view()[:3]

    def store(preset: str, choice: str, repo: str, *values: Any) -> dict:
        return {"preset": preset, "base": choice, "repo": repo, "values": dict(zip(names, values, strict=True))}

    def running_form() -> tuple[list, str] | None:
        """The form filled with the running job's own settings, and a line naming its dataset and base."""
        run = ctx.studio.training_run()
        if run is None:
            return None
        job = ctx.studio.run_job(run)
        base = job.base.display_name
        choice, repo = (DEMO, base) if job.base.kind == "hub" else (base, "")
        line = (f"Training now: run `{run}` on dataset `{job.data.images.parent.name}` with base `{base}`. The form "
                "shows that run's settings.")
        return [gr.skip(), choice, repo, "", *form_values(job.config)], line

    def on_load(saved: dict) -> list:
        """Restore what this browser's page showed: the running job's settings, else the form as it was left; all at
        once, so nothing races. A fresh page keeps what it opened with, and whatever was typed since."""
        running = running_form()
        if running is not None:
            values, line = running
        elif isinstance(saved, dict) and isinstance(saved.get("values"), dict) and \
                set(saved["values"]) == set(names) and saved.get("preset") in ctx.studio.presets():
            values, line = [saved["preset"], saved.get("base") or DEMO, saved.get("repo") or "",
                            preset_values(saved["preset"])[0], *[saved["values"][name] for name in names]], ""
        else:
            return [gr.skip()] * (len(names) + 6)
        prompts, trigger = values[4 + names.index("sample_prompts")], values[4 + names.index("trigger_word")]
        return [*values, preview_samples(prompts, trigger), line]

    def on_tick(before: dict) -> tuple:
        state, seen, changed = follow_losses(ctx.studio.jobs, before)
        if state.started != before.get("started") and state.run_dir:
            try:
                seen["prompts"] = ctx.studio.run_job(Path(state.run_dir).name).config.prompts()
            except UserError:
                seen["prompts"] = []
        else:
            seen["prompts"] = before.get("prompts", [])
        seen["active"] = state.active  # a run that starts or ends changes the runs and the buttons
        moved = before.get("active") != state.active or "active" not in before
        seen["saved"] = saved_order([p for p in state.saved if Path(p).exists()])
        files = final_lora = gr.skip()
        if seen["saved"] != before.get("saved"):
            files = [shown(p) for p in seen["saved"]] or None
            lora = next((p for p in seen["saved"] if p.endswith(".safetensors")), None)  # final, else newest
            final_lora = gr.update(value=shown(lora), label=f"⬇ Download {Path(lora).name}", visible=True) \
                if lora else gr.update(value=None, visible=False)
        seen["samples"] = [list(item) for item in sample_items(state, seen["prompts"])]
        gallery = [(shown(path), caption) for path, caption in seen["samples"]] \
            if seen["samples"] != before.get("samples") else gr.skip()  # sent again only when it changed
        prompts = sample_legend(seen["prompts"]) if seen["prompts"] != before.get("prompts") else gr.skip()
        per_epoch = state.total_steps // state.total_epochs if state.total_epochs else 0
        chart = loss_chart([tuple(p) for p in seen["losses"]], per_epoch) if changed else gr.skip()
        skip = gr.skip()
        return (progress_html(state), chart, gallery, prompts, files, final_lora, log_html(state.log), seen,
                *(runs_view() if moved else (skip, skip, skip, skip)),
                gr.update(interactive=state.active) if moved else skip,
                gr.update(interactive=not state.active) if moved else skip,
                "" if moved and not state.active else skip)  # no "Training now" line once the run ended

    marked = {"show_progress": "hidden", **PRIVATE}
    presets.input(on_preset, [presets, widgets["trigger_word"]], [description, *inputs, sample_preview], **PRIVATE)
    base_choice.input(on_base, [base_choice, presets, widgets["trigger_word"]],
                      [presets, description, *inputs, sample_preview], **PRIVATE)
    for box in (widgets["trigger_word"], widgets["sample_prompts"]):
        box.change(preview_samples, [widgets["sample_prompts"], widgets["trigger_word"]], sample_preview,
                   **marked)
    planned = [ctx.dataset, base_choice, base_repo, regularization, repeats, *inputs]
    gr.on([check.click, repeats.input, regularization.input], with_marks(on_estimate, 2), planned,
          [plan, prepare_again, *inputs], **PRIVATE)
    start.click(with_marks(on_start, 3), planned, [plan, train_job, prepare_again, *inputs], **PRIVATE)
    regularization.focus(lambda: gr.update(choices=regularization_choices(ctx)), None, regularization, **PRIVATE)
    ctx.dataset.change(lambda name: ctx.workspace.repeats(name) if name in ctx.workspace.list_datasets() else gr.skip(),
                       ctx.dataset, repeats, **PRIVATE)

    def name_after(dataset: str | None, current: str) -> Any:
        """Name the LoRA after the dataset, unless someone typed a name of their own."""
        datasets = ctx.workspace.list_datasets()
        automatic = {TrainConfig().output_name, "", *map(lora_name, datasets)}
        return lora_name(dataset) if dataset in datasets and (current or "").strip() in automatic else gr.skip()

    ctx.dataset.change(name_after, [ctx.dataset, widgets["output_name"]], widgets["output_name"], **PRIVATE)
    prepare_again.click(on_prepare_again, ctx.dataset, [ctx.prepare_job, plan, prepare_again], **PRIVATE)
    stop.click(stop_handler(ctx), train_job, None, **PRIVATE)
    resume.click(on_resume, runs, train_job, **PRIVATE)
    save.click(on_save, [preset_name, *inputs], [presets, preset_name], **PRIVATE)
    delete.click(on_ask_delete, doomed, [confirm_row, confirm_text], **PRIVATE)
    cancel.click(lambda: gr.update(visible=False), None, confirm_row, **PRIVATE)
    confirm.click(on_delete, doomed, [runs_note, confirm_row, runs, doomed, run_table], **PRIVATE)
    gr.on([w.change for w in (presets, base_choice, base_repo, *inputs)], store,
          [presets, base_choice, base_repo, *inputs], form, trigger_mode="always_last", **marked)
    for event in (ctx.dataset.input, ctx.tab.select):  # the word typed in the Caption tab, here on arrival
        event(user_errors(ctx.dataset_trigger), ctx.dataset, widgets["trigger_word"], **PRIVATE)
    ctx.keep_trigger(widgets["trigger_word"])
    live = [progress, curve, samples, legend, saved, final, log, seen_losses, runs, doomed, run_table, runs_panel,
            stop, start, job_line]
    gr.Timer(1.0).tick(on_tick, seen_losses, live, **marked)
    ctx.app.load(on_load, form, [presets, base_choice, base_repo, description, *inputs, sample_preview, job_line],
                 **marked)
    ctx.app.load(on_tick, seen_losses, live, **marked)  # a refresh, with no spinner over the widgets
