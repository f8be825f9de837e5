"""The Gradio app: one module per tab, each a ``build(ctx)`` that only wires widgets to :class:`Studio` calls."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from .. import served
from ..access import Visitor
from ..demo.shapes import DEMO_IMAGES, DEMO_TRIGGER
from ..errors import UserError
from ..estimate import format_duration
from ..jobs import JobState
from ..studio import Studio
from ..workspace import Workspace

CSS = """
.caption-row {align-items: flex-start}
.caption-row img {max-height: 160px; object-fit: contain}
.log-box {display: flex; flex-direction: column-reverse; max-height: 220px; overflow: auto}
.log-box pre {margin: 0; white-space: pre-wrap; font-size: 12px}
.invalid-field {outline: 2px solid var(--error-border-color, #ef4444); border-radius: 6px}
.job-error {color: var(--error-text-color, #b91c1c); white-space: pre-wrap}
[data-testid="block-info"] {color: #4b5563 !important}  /* help lines: 7:1 on white, not the theme's pale grey */
.dark [data-testid="block-info"] {color: #d1d5db !important}
#app-header {align-items: center}
#app-header h1 {font-size: 1.3rem; margin: 0}
#app-header p {margin: 0}
"""
PRIVATE: dict[str, Any] = {"api_visibility": "private"}  # page wiring; the public API is in api.py
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}  # events that use the model directly queue as one


@dataclass
class AppContext:
    """What every tab shares: the backend, the dataset picker, and a counter that moves whenever the dataset's files
    change, so every view of them refreshes."""

    studio: Studio
    app: gr.Blocks
    dataset: gr.Dropdown
    revision: gr.State
    prepare_job: gr.BrowserState | None = None  # the Dataset tab's Prepare job, which the Train tab can start too
    tab: gr.Tab | None = None  # the tab being built, for events on opening it
    outside_tabs: list[gr.components.Component] = field(default_factory=list)

    def remembered(self, key: str, default: Any) -> gr.BrowserState:
        """A value this browser keeps across reloads. It is placed outside the tabs, so it is read when the page
        loads, not only once its tab is first opened."""
        state = gr.BrowserState(default, storage_key=f"lora-gradio-{key}", render=False)
        self.outside_tabs.append(state)
        return state

    @property
    def workspace(self) -> Workspace:
        """The studio's workspace."""
        return self.studio.workspace

    def visitor(self, request: gr.Request) -> Visitor:
        """Who sent a page event."""
        return visitor_of(self.studio, request)

    def keep_trigger(self, box: gr.Textbox) -> None:
        """Save what is typed in a trigger-word box as the chosen dataset's word, so every tab shows the same one; in
        another user's dataset the word stays in this page's form alone."""

        def keep(name: str | None, word: str, request: gr.Request) -> None:
            if name and word.strip():
                try:
                    self.studio.set_trigger_word(name, word, self.visitor(request))
                except UserError:
                    return

        box.input(keep, [self.dataset, box], None, trigger_mode="always_last", show_progress="hidden", **PRIVATE)

    def dataset_trigger(self, name: str | None) -> dict:
        """A handler's update for a trigger-word box: the dataset's own word, when it has one."""
        word = self.workspace.trigger_word(name)
        return gr.update(value=word) if word else gr.skip()


def _on_user_error(answer: Callable[[UserError], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that turns a handler's ``UserError`` into ``answer(error)``; the signature stays the handler's,
    which Gradio reads to pass the request."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(handler)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return handler(*args, **kwargs)
            except UserError as exc:
                return answer(exc)

        return wrapped

    return decorate


def visitor_of(studio: Studio, request: gr.Request) -> Visitor:
    """Who sent an event or an API call: their login; without logins, the one local user, or on a public address
    this browser page's id."""
    return studio.access.visitor(request.username, request.session_hash)


def public_text(text: str) -> str:
    """A message as a visitor reads it: the running app's own folders shown relative to its workspace."""
    return _public[0](text)


_public: list[Callable[[str], str]] = [str]  # build_app puts its Studio's wording here, for the module's decorators


def _toast(error: UserError) -> Any:
    gr.Warning(public_text(str(error)))
    return gr.skip()  # one skip leaves every output as it was


def _raise(error: UserError) -> Any:
    raise gr.Error(public_text(str(error)), print_exception=False) from error


# a page handler's refusal is a toast, its widgets left as they were (a raised error would cover them with Gradio's
# error pill until someone finds its ×); an API endpoint's is the error its client receives
user_errors = _on_user_error(_toast)
api_errors = _on_user_error(_raise)


def shown(path: Path | str) -> str:
    """A workspace file the page shows (thumbnail, sample, test image), linked into Gradio's upload folder.

    Gradio serves that folder and nothing else of the workspace: settings, job files and originals stay private.
    """
    return str(served.show(Path(get_upload_folder()), path))


def progress_html(state: JobState) -> str:
    """A job's progress bar with its counts and ETA, readable by people and by tests; the message is escaped."""
    if state.status == "idle":
        return f'<div id="{state.kind or "job"}-progress-text">Nothing running yet.</div>'
    if state.status == "error":  # no bar: nothing was counted, and the reason is what matters
        return (f'<div id="{state.kind or "job"}-progress-text">error: {html.escape(state.title)}</div>'
                f'<div class="job-error">⚠️ {html.escape(public_text(state.message))}</div>')
    fraction = state.step / state.total_steps if state.total_steps else 0.0
    eta = f" · ETA {format_duration(state.eta_s)}" if state.eta_s is not None and state.active else ""
    speed = f" · {state.it_per_s:.2f} it/s" if state.it_per_s else ""
    counts = (f"step {state.step}/{state.total_steps} · epoch {state.epoch}/{state.total_epochs}"
              if state.kind == "training" else f"{state.step}/{state.total_steps}")
    if state.kind == "training" and not state.active and state.run_dir:  # an earlier run: say which
        counts += f" · run {Path(state.run_dir).name}"
    if state.active and not state.step:  # loading the model, caching latents: nothing counted yet
        counts = f"getting ready · {state.total_steps} steps planned" if state.total_steps else "getting ready"
    return (f'<div id="{state.kind or "job"}-progress-text">{state.status}: {counts}{speed}{eta}</div>'
            f'<progress value="{fraction:.4f}" max="1" style="width:100%;height:18px"></progress>'
            f'<div>{html.escape(public_text(state.message))}</div>')


def stop_handler(ctx: AppContext) -> Callable[[str, gr.Request], None]:
    """A Stop button's handler: this page's job id, stopped for whoever started it or the operator."""

    @user_errors
    def stop_job(job_id: str, request: gr.Request) -> None:
        ctx.studio.jobs.stop(job_id, ctx.visitor(request))

    return stop_job


def job_panel(ctx: AppContext, kind: str, finish: Callable[[JobState], list], outputs: list) -> gr.BrowserState:
    """Progress and Stop for this page's latest ``kind`` job, and ``finish(state)`` for ``outputs`` once it ends.

    The job's id lives in the browser, so a reload finds the job again; the returned state is where a start
    handler puts the id.
    """
    job_id = ctx.remembered(f"{kind}-job", "")
    finished = gr.State("")
    with gr.Row(equal_height=True):
        progress = gr.HTML(elem_id=f"{kind}-progress")
        stop = gr.Button("Stop", variant="stop", scale=0, elem_id=f"{kind}-stop", interactive=False)
    stop.click(stop_handler(ctx), job_id, None, **PRIVATE)
    skips = [gr.skip()] * len(outputs)

    def tick(current: str, done: str) -> list:
        if not current:
            return [gr.skip(), done, gr.update(interactive=False), *skips]
        try:
            state = ctx.studio.jobs.view(current)
        except UserError:  # the server restarted since: that job is gone
            return ["", "", gr.update(interactive=False), *skips]
        running = gr.update(interactive=state.active)  # Stop only while there is something to stop
        if state.active or done == current:
            return [progress_html(state), done, running, *skips]
        return [progress_html(state), current, running, *finish(state)]

    shows = [progress, finished, stop, *outputs]
    gr.Timer(1.0).tick(tick, [job_id, finished], shows, show_progress="hidden", **PRIVATE)
    ctx.app.load(tick, [job_id, finished], shows, show_progress="hidden", **PRIVATE)
    return job_id


def build_app(studio: Studio) -> gr.Blocks:
    """The whole app over one studio: its workspace, model cache, jobs, limits and operator."""
    from . import api, caption_tab, dataset_tab, test_tab, train_tab

    workspace = studio.workspace
    _public[0] = studio.public
    studio.housekeeping()
    with gr.Blocks(title="lora-gradio") as app:
        api.register(studio)  # first, so the public names are theirs
        with gr.Row(equal_height=True, elem_id="app-header"):
            gr.Markdown("# lora-gradio\nPhotos in, an SD1.5 LoRA out, for ComfyUI, A1111/Forge and diffusers.",
                        container=False)
            cache_status = gr.Markdown(elem_id="cache-status", container=False)
        with gr.Row(equal_height=True):
            dataset = gr.Dropdown(label="Dataset", choices=workspace.list_datasets(), value=None, scale=3,
                                  elem_id="dataset-picker", allow_custom_value=True)  # other tabs may add some
            new_name = gr.Textbox(label="New dataset", placeholder="name, e.g. anna", scale=2, elem_id="new-dataset")
            create = gr.Button("Create", scale=1, elem_id="create-dataset")
            demo = gr.Button("Load demo dataset", scale=1, elem_id="load-demo")
        ctx = AppContext(studio, app, dataset, gr.State(0))
        chosen = ctx.remembered("dataset", "")  # the dataset this browser worked on

        @user_errors
        def create_dataset(name: str, request: gr.Request) -> tuple[dict, str]:
            created = studio.create_dataset(name, ctx.visitor(request))
            return gr.update(choices=workspace.list_datasets(), value=created), ""

        @user_errors
        def load_demo(request: gr.Request) -> dict:
            created = studio.load_demo_dataset(ctx.visitor(request))
            gr.Info(f"Dataset {created}: {DEMO_IMAGES} rings captioned '{DEMO_TRIGGER}, a … {DEMO_TRIGGER} on a … "
                    "background'. The demo base has never seen a ring: train it with the demo preset, then test "
                    f"'{DEMO_TRIGGER}, a blue {DEMO_TRIGGER} on a yellow background'.")
            return gr.update(choices=workspace.list_datasets(), value=created)

        create.click(create_dataset, new_name, [dataset, new_name], **PRIVATE)
        demo.click(load_demo, None, dataset, **PRIVATE)
        new_name.submit(create_dataset, new_name, [dataset, new_name], **PRIVATE)

        def restore_dataset(remembered: str) -> dict:
            names = workspace.list_datasets()
            return gr.update(choices=names, value=remembered if remembered in names else None)

        app.load(restore_dataset, chosen, dataset, **PRIVATE)
        dataset.change(lambda name: name or "", dataset, chosen, show_progress="hidden", **PRIVATE)

        with gr.Accordion("Workspace settings", open=False):
            gr.Markdown(f"Workspace: `{workspace.root.name}`. Point `models/` at a ComfyUI install to share its "
                        "checkpoints and LoRAs instead of copying them; leave empty for the workspace's own. The "
                        "folder must be inside the workspace, or one the server's operator allowed (--allow-dir). "
                        "Only the operator changes these settings.\n\n" + studio.access.describe(),
                        elem_id="workspace-access")
            with gr.Row(equal_height=True):
                models_dir = gr.Textbox(label="ComfyUI models folder", placeholder="/path/to/ComfyUI/models",
                                        scale=4, elem_id="models-dir")
                save_models = gr.Button("Save", scale=1)
            models_note = gr.Markdown()

        @user_errors
        def save_models_dir(folder: str, request: gr.Request) -> str:
            return studio.set_models_dir(folder, ctx.visitor(request))

        save_models.click(save_models_dir, models_dir, models_note, **PRIVATE)

        def current_models_dir(request: gr.Request) -> str:
            """The operator sees the folder they set; the server's layout stays hidden from everyone else."""
            folder = str(workspace.settings.get("models_dir", ""))
            return folder if ctx.visitor(request).operator or not folder else "(set by the operator)"

        app.load(current_models_dir, None, models_dir, **PRIVATE)

        def describe_cache() -> str:
            return studio.public(studio.cache.describe())

        gr.Timer(1.0).tick(describe_cache, None, cache_status, show_progress="hidden", **PRIVATE)
        app.load(describe_cache, None, cache_status, **PRIVATE)

        with gr.Tabs() as tabs:
            for tab in (dataset_tab, caption_tab, train_tab, test_tab):
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower(), elem_id=f"tab-{tab.TITLE.lower()}") as ctx.tab:
                    tab.build(ctx)
        # a page opened or reloaded while a run trains opens where the run is
        app.load(lambda: gr.Tabs(selected=train_tab.TITLE.lower()) if studio.training_run() else gr.skip(), None,
                 tabs, **PRIVATE)
        for state in ctx.outside_tabs:
            state.render()
    return app
