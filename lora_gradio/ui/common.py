"""What every tab and the API share: the studio and dataset picker, event settings, and the edges where a
:class:`UserError` becomes a toast or a message."""

from __future__ import annotations

import html
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from .. import served
from ..access import Visitor
from ..errors import UserError
from ..jobs import DEFAULT_DEVICE, JobState
from ..studio import Studio, Workspace, format_duration

Ticker = Callable[[dict, gr.Request], dict]  # what a panel shows once a second: updates for what changed
PRIVATE: dict[str, Any] = {"api_visibility": "private"}  # page wiring; the public API is in api.py
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}  # events that use the model directly queue as one


@dataclass
class AppContext:
    """What every tab shares: the backend, the dataset picker, the dataset it shows (``picked``: it changes only when
    the choice does, while the picker may report the same choice again), and a counter that moves whenever the
    dataset's files change, so every view of them refreshes."""

    studio: Studio
    app: gr.Blocks
    dataset: gr.Dropdown
    revision: gr.State
    picked: gr.State
    prepare_job: gr.BrowserState | None = None  # the Dataset tab's Prepare job, which the Train tab can start too
    tab: gr.Tab | None = None  # the tab being built, for events on opening it
    tabs: gr.Tabs | None = None  # to open another tab
    handoff: gr.State | None = None  # what the Train tab asks the Test tab to open (a TestPlan's fields)
    outside_tabs: list[gr.components.Component] = field(default_factory=list)
    trigger_boxes: list[gr.Textbox] = field(default_factory=list)  # every tab's trigger-word box
    tickers: list[tuple[Ticker, set, list]] = field(default_factory=list)

    def every_second(self, ticker: Ticker, inputs: set, outputs: list) -> None:
        """Call ``ticker`` once a second (its values keyed by ``inputs``, and the request); it returns updates for
        some of ``outputs``, only what changed. Every ticker of the page shares one timer."""
        self.tickers.append((ticker, set(inputs), list(outputs)))

    def start_ticking(self) -> None:
        """One timer for all the page's tickers: one request a second, where a timer each kept the browser busy
        redrawing (0.7 of a core on an idle page with six, against 0.2 at a fifth of the rate)."""
        inputs = set().union(*(wanted for _, wanted, _ in self.tickers))
        outputs = list(dict.fromkeys(output for _, _, shown in self.tickers for output in shown))

        def tick(values: dict, request: gr.Request) -> dict:
            shows: dict = {}
            for ticker, wanted, _ in self.tickers:
                shows |= ticker({component: values[component] for component in wanted}, request)
            return shows

        gr.Timer(1.0).tick(tick, inputs, outputs, show_progress="hidden", concurrency_limit=None,  # reads: no wait
                           **PRIVATE)

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
        """A tab's trigger-word box, which :meth:`link_triggers` ties to the others once every tab is built."""
        self.trigger_boxes.append(box)

    def link_triggers(self) -> None:
        """Save what is typed in any trigger-word box as the chosen dataset's word, and show it in the page's other
        boxes in the same event, so a tab opened right after typing never shows the word before; in another user's
        dataset the word stays in this page's form alone."""
        for box in self.trigger_boxes:
            others = [other for other in self.trigger_boxes if other is not box]

            def keep(name: str | None, word: str, request: gr.Request, others: list = others) -> dict:
                if name and word.strip():
                    with suppress(UserError):  # another's dataset: the word stays in this page
                        self.studio.set_trigger_word(name, word, self.visitor(request))
                return dict.fromkeys(others, word)

            box.input(keep, [self.dataset, box], others, trigger_mode="always_last", show_progress="hidden",
                      **PRIVATE)

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


def word_messages_for(studio: Studio) -> None:
    """Show messages in this studio's wording from now on (build_app calls it once)."""
    _public[0] = studio.public


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


def uploaded(files: Any) -> list[Path]:
    """The files a visitor uploaded, as Gradio keeps them; any other path is refused, since Gradio hands an
    endpoint whatever path a request names as a file, and the links of shown/ are the workspace's, not uploads."""
    root = Path(get_upload_folder()).resolve()
    paths = []
    for item in files if isinstance(files, list) else [files] if files else []:
        named = item.get("path") if isinstance(item, dict) else getattr(item, "path", getattr(item, "name", item))
        path = Path(str(named)).resolve()
        if not path.is_relative_to(root) or path.is_relative_to(root / served.SHOWN):
            raise UserError(f"'{Path(str(named)).name}' was not uploaded to this app: send the file itself (in the "
                            "page, or with gradio_client's handle_file), not a path on the server.")
        paths.append(path)
    return paths


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
              if state.total_epochs else f"{state.step}/{state.total_steps}")
    if state.run_dir and not state.active:  # an earlier run: say which
        counts += f" · run {Path(state.run_dir).name}"
    if state.device not in ("", DEFAULT_DEVICE):  # one of several GPUs
        counts += f" · on {state.device}"
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


def job_revision(state: JobState) -> int:
    """The dataset revision a finished job's changes bring: the same number from every tick that reports the end
    (two can be queued at once), so each view of the files refreshes once, not under someone typing."""
    return round(state.started * 1e6)


def job_panel(ctx: AppContext, kind: str, finish: Callable[[JobState], dict], outputs: list) -> gr.BrowserState:
    """Progress and Stop for this page's latest ``kind`` job, and ``finish(state)``, updates keyed by some of
    ``outputs``, once it ends.

    The job's id lives in the browser, so a reload finds the job again; the returned state is where a start
    handler puts the id.
    """
    job_id = ctx.remembered(f"{kind}-job", "")
    seen = gr.State({})  # what the page shows of the job: its bar, whether Stop is on, and whose end it showed
    with gr.Row(equal_height=True):
        progress = gr.HTML(elem_id=f"{kind}-progress")
        stop = gr.Button("Stop", variant="stop", scale=0, elem_id=f"{kind}-stop", interactive=False)
    stop.click(stop_handler(ctx), job_id, None, **PRIVATE)

    def tick(values: dict, request: gr.Request | None = None) -> dict:
        """The job's bar and Stop where they changed; the outputs only once, when the job has just ended."""
        current, before = values[job_id], values[seen]
        try:
            state = ctx.studio.jobs.view(current) if current else None
        except UserError:  # the server restarted since: that job is gone
            state = None
        now = {"progress": progress_html(state) if state else "", "active": bool(state and state.active),
               "ended": before.get("ended", "")}
        shows = {}
        if now["progress"] != before.get("progress"):
            shows[progress] = now["progress"]
        if now["active"] != before.get("active"):
            shows[stop] = gr.update(interactive=now["active"])  # Stop while it runs
        if state is not None and not state.active and before.get("ended") != current:
            now["ended"] = current
            shows |= finish(state)
        return {**shows, seen: now} if now != before else shows

    shows = [progress, seen, stop, *outputs]
    ctx.every_second(tick, {job_id, seen}, shows)
    ctx.app.load(tick, {job_id, seen}, shows, show_progress="hidden", **PRIVATE)
    return job_id
