"""Train tab: Start, Stop and live progress on top, then base model, preset and settings, then the loss chart,
samples, saved files and the log, and the list of runs with Resume and Delete.

Each section has its own builder, and every handler reads and returns its values keyed by component."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import wraps
from typing import Any

import gradio as gr

from ..errors import UserError
from ..studio import DEMO, DEMO_NOTE, TrainingPlan, lora_name
from ..training.config import SettingsError, TrainConfig
from .base_picker import base_name, base_picker
from .common import PRIVATE, AppContext, user_errors
from .kohya_import import wire_kohya_import
from .train_form import ADVANCED, MAIN, SEPARATE, SettingsForm, preview_samples, settings_form
from .train_live import LiveView, follow_losses, live_view
from .train_queue import QueuePanel, queue_panel, wire_queue

__all__ = ["ADVANCED", "MAIN", "SEPARATE", "TITLE", "build", "default_preset", "follow_losses"]
TITLE = "Train"
RUN_COLUMNS = ["run", "status", "date", "steps", "recent loss", "best validation loss", "recommended"]
QUIET = {"show_progress": "hidden", **PRIVATE}


def default_preset(base: str | None) -> str:
    """The demo base trains with the demo preset; real models start from the recommended one."""
    return "demo" if base == DEMO else "seed-recommended"


def dataset_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """'none', then every dataset: a second dataset a run may take class images or validation images from."""
    return [("none", ""), *((name, name) for name in ctx.workspace.list_datasets())]


@dataclass
class RunControls:
    """Start, Stop, Estimate and Prepare again, the progress bar, the estimate and the running job's line."""

    start: gr.Button
    stop: gr.Button
    check: gr.Button
    prepare_again: gr.Button
    progress: gr.HTML
    plan: gr.Markdown
    job_line: gr.Markdown


def run_controls(limits: str) -> RunControls:
    """The buttons in one row, then the progress bar, the estimate (the server's limits until one is made) and the
    line that names a run already training."""
    with gr.Row(equal_height=True):
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=2)
        stop = gr.Button("Stop & save", variant="stop", elem_id="train-stop", scale=1, interactive=False)
        check = gr.Button("Estimate", scale=1, elem_id="train-check")
        prepare_again = gr.Button("Prepare again", visible=False, elem_id="train-prepare-again", scale=1)
    return RunControls(start, stop, check, prepare_again, gr.HTML(elem_id="train-progress"),
                       gr.Markdown(limits, elem_id="train-estimate"), gr.Markdown(elem_id="train-job"))


@dataclass
class BaseAndPreset:
    """The base model (a local choice or a hub id), the preset list and the preset's description."""

    choice: gr.Dropdown
    repo: gr.Textbox
    presets: gr.Dropdown
    kohya: gr.UploadButton
    description: gr.Markdown
    kohya_note: gr.Markdown

    def base(self, values: dict) -> str:
        """The base model the handler's values name."""
        return base_name(values[self.choice], values[self.repo])


def base_and_preset(ctx: AppContext, description: str) -> BaseAndPreset:
    """The base picker, the preset list and the kohya import in one row, the preset's description under them."""
    with gr.Row(equal_height=True):
        choice, repo = base_picker(ctx)
        presets = gr.Dropdown(list(ctx.studio.presets()), value=default_preset(DEMO), label="Preset", scale=2,
                              elem_id="preset")
        kohya = gr.UploadButton("Import a kohya config", file_types=[".json", ".toml"], file_count="multiple",
                                scale=1, elem_id="kohya-import")
    return BaseAndPreset(choice, repo, presets, kohya, gr.Markdown(description, elem_id="preset-description"),
                         gr.Markdown(elem_id="kohya-note"))


@dataclass
class RunsPanel:
    """The runs table, Resume for an interrupted run, and Delete with its confirmation."""

    panel: gr.Accordion
    table: gr.Dataframe
    interrupted: gr.Dropdown
    resume: gr.Button
    doomed: gr.Dropdown
    delete: gr.Button
    confirm_row: gr.Row
    confirm_text: gr.Markdown
    confirm: gr.Button
    cancel: gr.Button
    note: gr.Markdown

    def refreshed(self, ctx: AppContext) -> dict:
        """The lists as they are now, and the panel opened while some run waits to be resumed."""
        interrupted, listed = ctx.studio.interrupted_runs(), ctx.studio.runs()
        shows = {self.interrupted: gr.update(choices=interrupted, value=None),
                 self.doomed: gr.update(choices=[row[0] for row in listed], value=None), self.table: listed}
        return {**shows, self.panel: gr.update(open=True)} if interrupted else shows


def runs_panel(ctx: AppContext) -> RunsPanel:
    """The runs, newest first, in a closed accordion."""
    rows = ctx.studio.runs()
    with gr.Accordion("Runs: resume, delete", open=False, elem_id="runs-panel") as panel:
        table = gr.Dataframe(rows, headers=RUN_COLUMNS, interactive=False, elem_id="runs-table",
                             label="Runs, newest first")
        with gr.Row(equal_height=True):
            interrupted = gr.Dropdown(ctx.studio.interrupted_runs(), label="Interrupted runs", scale=3,
                                      allow_custom_value=True, elem_id="train-runs")
            resume = gr.Button("Resume", scale=1, elem_id="train-resume")
            doomed = gr.Dropdown([row[0] for row in rows], label="Run to delete", scale=3,
                                 elem_id="runs-delete-choice")
            delete = gr.Button("Delete…", scale=1, variant="stop", elem_id="runs-delete")
        with gr.Row(visible=False, elem_id="runs-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Yes, delete it", variant="stop", scale=0, elem_id="runs-delete-yes")
            cancel = gr.Button("Cancel", scale=0, elem_id="runs-delete-no")
        note = gr.Markdown(elem_id="runs-note")
    return RunsPanel(panel, table, interrupted, resume, doomed, delete, confirm_row, confirm_text, confirm, cancel,
                     note)


def build(ctx: AppContext) -> None:
    """Widgets and events of the Train tab."""
    limits = ctx.studio.limits.describe_training()
    controls = run_controls(limits)
    queue = queue_panel()
    first, first_text = ctx.studio.preset(default_preset(DEMO))  # usable before the page's load event restores
    choice = base_and_preset(ctx, first_text)
    form = settings_form(first, dataset_choices(ctx))
    live = live_view(controls.progress)
    runs = runs_panel(ctx)
    wire_settings(ctx, choice, form)
    wire_kohya_import(ctx, choice.kohya, choice.presets, choice.kohya_note, form)
    train_job = wire_start(ctx, controls, choice, form, limits, queue)
    wire_runs(ctx, runs, train_job, queue)
    wire_queue(ctx, queue)
    wire_live(ctx, controls, live, runs, queue, train_job)
    wire_advice(ctx, live)
    remember_form(ctx, controls, choice, form)


def wire_settings(ctx: AppContext, choice: BaseAndPreset, form: SettingsForm) -> None:
    """Presets fill the form, the demo base picks the demo preset, the samples' preview follows the prompts, the
    dataset brings its repeats, trigger word and LoRA name, and Save keeps the form as a preset."""
    fields = form.fields

    def preset_form(label: str, trigger: str) -> dict:
        config, text = ctx.studio.preset(label if label in ctx.studio.presets() else default_preset(DEMO))
        return {choice.description: text or "", **form.show(config, trigger)}

    @user_errors
    def on_preset(values: dict) -> dict:
        """The chosen preset's values, keeping the trigger word typed."""
        return preset_form(values[choice.presets], values[fields["trigger_word"]])

    @user_errors
    def on_base(values: dict) -> dict:
        """The demo base picks the demo preset; a real base leaves the demo preset for the recommended one."""
        wanted, current = default_preset(values[choice.choice]), values[choice.presets]
        if wanted == current or (values[choice.choice] != DEMO and current != "demo"):
            return gr.skip()
        return {choice.presets: wanted, **preset_form(wanted, values[fields["trigger_word"]])}

    @user_errors
    def on_save(values: dict, request: gr.Request) -> dict:
        label = ctx.studio.save_preset(values[form.preset_name], form.config(values), ctx.visitor(request))
        return {choice.presets: gr.update(choices=list(ctx.studio.presets()), value=label), form.preset_name: ""}

    def name_after(values: dict) -> dict:
        """Name the LoRA after the dataset, unless someone typed a name of their own."""
        dataset, datasets = values[ctx.dataset], ctx.workspace.list_datasets()
        automatic = {TrainConfig().output_name, "", *map(lora_name, datasets)}
        if dataset not in datasets:
            return gr.skip()
        named = {fields["output_name"]: lora_name(dataset)} \
            if (values[fields["output_name"]] or "").strip() in automatic else {}
        return {form.repeats: ctx.workspace.repeats(dataset), **named}

    preset_inputs = {choice.presets, choice.choice, fields["trigger_word"]}
    preset_outputs = [choice.presets, choice.description, *form.widgets, form.sample_preview]
    choice.presets.input(on_preset, preset_inputs, preset_outputs, **PRIVATE)
    choice.choice.input(on_base, preset_inputs, preset_outputs, **PRIVATE)
    for box in (fields["trigger_word"], fields["sample_prompts"]):
        box.change(lambda values: preview_samples(values[fields["sample_prompts"]], values[fields["trigger_word"]]),
                   {fields["sample_prompts"], fields["trigger_word"]}, form.sample_preview, **QUIET)
    form.save.click(on_save, form.widgets | {form.preset_name}, [choice.presets, form.preset_name], **PRIVATE)
    for other in (form.regularization, form.validation):
        other.focus(lambda: gr.update(choices=dataset_choices(ctx)), None, other, **PRIVATE)
    ctx.dataset.change(name_after, {ctx.dataset, fields["output_name"]}, [form.repeats, fields["output_name"]],
                       **PRIVATE)
    for event in (ctx.dataset.input, ctx.tab.select):  # the word typed in the Caption tab, here on arrival
        event(user_errors(ctx.dataset_trigger), ctx.dataset, fields["trigger_word"], **PRIVATE)
    ctx.keep_trigger(fields["trigger_word"])


def with_marks(form: SettingsForm, handler: Callable[..., dict]) -> Callable[..., dict]:
    """Run a Start/Estimate handler; invalid settings are marked beside their fields, and a toast sums up. Any other
    refusal is a toast alone (``user_errors``)."""

    @user_errors
    @wraps(handler)  # gradio reads the handler's signature to pass the request
    def wrapped(*args: Any) -> dict:
        try:
            return {**handler(*args), **form.marks({})}
        except SettingsError as exc:
            gr.Warning(str(exc))
            return form.marks(exc.problems)

    return wrapped


def wire_start(ctx: AppContext, controls: RunControls, choice: BaseAndPreset, form: SettingsForm,
               limits: str, queue: QueuePanel) -> gr.BrowserState:
    """Estimate and Start check the whole form; Start queues the run (it trains at once on a free device) and keeps
    the job's id in this browser (the key to Stop), which it returns."""
    train_job = ctx.remembered("training-job", [])  # this page's runs, waiting or training: the keys to Stop

    def plan_of(values: dict) -> TrainingPlan:
        return ctx.studio.plan_training(values[ctx.dataset], choice.base(values), form.config(values),
                                        values[form.regularization] or None, values[form.repeats],
                                        values[form.validation] or None)

    def plan_shown(plan: TrainingPlan) -> dict:
        note = f"\n\n{DEMO_NOTE}" if plan.base.kind == DEMO else ""
        if not plan.config.trigger_word:
            note += ("\n\n⚠️ No trigger word: the LoRA will have no word to call it up, and `{trigger}` in the sample "
                     "prompts stays empty. Type the word your captions start with (the Caption tab keeps it too).")
        text = f"{plan.estimate.markdown()} Training on dataset `{plan.data.images.parent.name}`.{note}\n\n{limits}"
        return {controls.plan: text, controls.prepare_again: gr.update(visible=plan.estimate.stale is not None)}

    def on_estimate(values: dict) -> dict:
        return plan_shown(plan_of(values))

    def on_start(values: dict, request: gr.Request) -> dict:
        plan = plan_of(values)
        job_id = ctx.studio.start_training(plan, ctx.visitor(request))
        return {**plan_shown(plan), train_job: page_jobs(ctx, values[train_job], job_id),
                queue.line: queued_line(ctx, job_id)}

    @user_errors
    def on_prepare_again(dataset: str | None, request: gr.Request) -> dict:
        return {ctx.prepare_job: ctx.studio.prepare_again(dataset, ctx.visitor(request)),
                controls.plan: "Preparing the training copies again; the Dataset tab shows the progress.",
                controls.prepare_again: gr.update(visible=False)}

    planned = {ctx.dataset, choice.choice, choice.repo, form.regularization, form.repeats, form.validation,
               train_job, *form.widgets}
    shown = [controls.plan, controls.prepare_again, *form.widgets]
    gr.on([controls.check.click, form.repeats.input, form.regularization.input, form.validation.input],
          with_marks(form, on_estimate),
          planned, shown, **PRIVATE)
    controls.start.click(with_marks(form, on_start), planned, [*shown, train_job, queue.line], **PRIVATE)
    controls.prepare_again.click(on_prepare_again, ctx.dataset,
                                 [ctx.prepare_job, controls.plan, controls.prepare_again], **PRIVATE)
    controls.stop.click(stop_training(ctx), train_job, None, **PRIVATE)
    return train_job


def page_jobs(ctx: AppContext, kept: Any, new: str = "") -> list[str]:
    """This page's training jobs that still wait or train, and ``new``: the keys to their Stop."""
    def current(job_id: Any) -> bool:
        try:
            state = ctx.studio.jobs.view(job_id)
        except UserError:
            return False
        return state.active or state.status == "queued"

    kept = kept if isinstance(kept, list) else [kept]  # one id, as pages kept it before the queue
    return [job_id for job_id in kept if isinstance(job_id, str) and job_id and current(job_id)][-20:] + \
        ([new] if new else [])


def stop_training(ctx: AppContext) -> Callable[[Any, gr.Request], None]:
    """Stop & save: the page's run that trains now (a waiting one leaves the queue with Leave the queue)."""

    @user_errors
    def stop(kept: Any, request: gr.Request) -> None:
        ids = page_jobs(ctx, kept)
        training = [job_id for job_id in ids if ctx.studio.jobs.view(job_id).active]
        if not training and ids:
            raise UserError("Nothing this page started trains now: its run waits in the queue. Take it out with "
                            "Leave the queue, below the buttons.")
        ctx.studio.jobs.stop(training[0] if training else "", ctx.visitor(request))

    return stop


def queued_line(ctx: AppContext, job_id: str) -> str:
    """The line under Start for a run that had to queue ("" when it trains at once)."""
    state = ctx.studio.jobs.view(job_id)
    return ctx.studio.queue_line(state) if state.status == "queued" else ""


def wire_runs(ctx: AppContext, runs: RunsPanel, train_job: gr.BrowserState, queue: QueuePanel) -> None:
    """Resume an interrupted run (through the queue, as a new run); Delete asks first."""

    @user_errors
    def on_resume(values: dict, request: gr.Request) -> dict:
        job_id = ctx.studio.resume_training(values[runs.interrupted], ctx.visitor(request))
        return {train_job: page_jobs(ctx, values[train_job], job_id), queue.line: queued_line(ctx, job_id)}

    @user_errors
    def on_ask_delete(run: str | None) -> dict:
        folder = ctx.studio.run_folder(run, "delete")
        return {runs.confirm_row: gr.update(visible=True),
                runs.confirm_text: f"Delete run **{folder.path.name}** with all its LoRA files and samples?"}

    @user_errors
    def on_delete(run: str | None, request: gr.Request) -> dict:
        note = ctx.studio.delete_run(run, ctx.visitor(request))
        return {runs.note: note, runs.confirm_row: gr.update(visible=False), **runs.refreshed(ctx)}

    runs.resume.click(on_resume, {runs.interrupted, train_job}, [train_job, queue.line], **PRIVATE)
    runs.delete.click(on_ask_delete, runs.doomed, [runs.confirm_row, runs.confirm_text], **PRIVATE)
    runs.cancel.click(lambda: gr.update(visible=False), None, runs.confirm_row, **PRIVATE)
    runs.confirm.click(on_delete, runs.doomed, [runs.note, runs.confirm_row, runs.interrupted, runs.doomed,
                                                runs.table, runs.panel], **PRIVATE)


def wire_live(ctx: AppContext, controls: RunControls, live: LiveView, runs: RunsPanel, queue: QueuePanel,
              train_job: gr.BrowserState) -> None:
    """Once a second, and on load: the job's progress and results, and the queue; when a run starts or ends, the
    runs and the buttons too (Start queues while a run trains)."""

    def on_tick(values: dict, request: gr.Request) -> dict:
        before, ids = values[live.seen], values[train_job]
        ids = ids if isinstance(ids, list) else [ids]
        shows, state, moved = live.update(ctx.studio, before, ids)
        shows |= queue.updates(ctx, shows[live.seen], before, ids, ctx.visitor(request))
        if not moved:
            return shows
        ended = {} if state.active else {controls.job_line: ""}  # no "Training now" line once the run ended
        start = "Add to the queue" if state.active else "Start training"
        return {**shows, **runs.refreshed(ctx), controls.stop: gr.update(interactive=state.active),
                controls.start: gr.update(value=start), **ended}

    shows = [controls.progress, live.curve, live.samples, live.legend, live.saved, live.final, live.log, live.seen,
             live.advice, live.open_test, live.grid_around, runs.interrupted, runs.doomed, runs.table, runs.panel,
             controls.stop, controls.start, controls.job_line, *queue.shown]
    ctx.every_second(on_tick, {live.seen, train_job}, shows)
    ctx.app.load(on_tick, {live.seen, train_job}, shows, **QUIET)  # a refresh, with no spinner over the widgets


def wire_advice(ctx: AppContext, live: LiveView) -> None:
    """The recommendation card's buttons hand the recommended file, strength and prompt to the Test tab and open
    it; Grid around it also asks for the neighbouring epochs × strengths."""

    def hand_over(grid: bool) -> Callable[[], dict]:
        @user_errors
        def handler() -> dict:
            plan = ctx.studio.recommended_test()
            return {ctx.handoff: {**asdict(plan), "grid": grid, "sent": time.time()}}  # the Test tab opens itself
        return handler

    live.open_test.click(hand_over(False), None, ctx.handoff, **PRIVATE)
    live.grid_around.click(hand_over(True), None, ctx.handoff, **PRIVATE)


def remember_form(ctx: AppContext, controls: RunControls, choice: BaseAndPreset, form: SettingsForm) -> None:
    """This browser keeps the form as it was left; a reload restores it, or shows the running job's settings."""
    kept = ctx.remembered("train-form", {})
    picked = {choice.presets, choice.choice, choice.repo}

    def store(values: dict) -> dict:
        return {"preset": values[choice.presets], "base": values[choice.choice], "repo": values[choice.repo],
                "values": form.saved(values)}

    def running_form() -> dict | None:
        """The form filled with the running job's own settings, and a line naming its dataset and base."""
        run = ctx.studio.training_run()
        if run is None:
            return None
        job = ctx.studio.run_job(run)
        base = job.base.display_name
        line = (f"Training now: run `{run}` on dataset `{job.data.images.parent.name}` with base `{base}`. The form "
                "shows that run's settings.")
        hub = job.base.kind == "hub"
        return {choice.choice: DEMO if hub else base, choice.repo: base if hub else "", choice.description: "",
                controls.job_line: line, **form.show(job.config)}

    def on_load(saved: dict) -> dict:
        """Restore what this browser's page showed, all at once, so nothing races. A fresh page keeps what it
        opened with, and whatever was typed since."""
        running = running_form()
        if running is not None:
            return running
        if not (isinstance(saved, dict) and isinstance(saved.get("values"), dict)
                and set(saved["values"]) == set(form.fields) and saved.get("preset") in ctx.studio.presets()):
            return gr.skip()
        return {choice.presets: saved["preset"], choice.choice: saved.get("base") or DEMO,
                choice.repo: saved.get("repo") or "", choice.description: ctx.studio.preset(saved["preset"])[1] or "",
                controls.job_line: "", **form.filled(saved["values"])}

    gr.on([w.change for w in (*picked, *form.widgets)], store, picked | form.widgets, kept,
          trigger_mode="always_last", **QUIET)
    ctx.app.load(on_load, kept, [*picked, choice.description, *form.widgets, form.sample_preview, controls.job_line],
                 **QUIET)
