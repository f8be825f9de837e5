"""What the Train tab shows of the running job, once a second: progress, loss chart, samples, saved files and log."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..jobs import JobRunner, JobState
from ..studio import SAMPLE_GRID, Studio
from .charts import loss_chart
from .common import progress_html, public_text, shown


def log_html(lines: list[str]) -> str:
    """The job's log, newest line at the bottom and in view: a reversed flex column starts scrolled to its end."""
    body = html.escape(public_text("\n".join(lines))) or "The log of the current run appears here."
    return (f'<div id="train-log-box" class="log-box"><pre id="train-log-lines">{body}</pre></div>')


def follow_losses(jobs: JobRunner, seen: dict, job_ids: list[str] | None = None) -> tuple[JobState, dict, bool]:
    """The training job's state with only the losses this page has not seen, the page's new record, and whether
    the curve changed (new points, or another run). The page follows its own run while it trains (of ``job_ids``;
    runs on other devices may have started since), else the newest."""
    have = seen.get("losses", [])

    def followed(since: int) -> JobState:
        for job_id in job_ids or []:
            try:
                own = jobs.view(job_id, since)
            except UserError:  # not a job of this server (it restarted since)
                continue
            if own.active:
                return own
        return jobs.latest("training", since)

    state = followed(len(have))
    if state.started != seen.get("started"):
        have, state = [], followed(0)
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
    return 2 if re.search(r"-(\d{6}|step\d+)(-ema)?\.safetensors$", name) else 0


def saved_order(paths: list[str]) -> list[str]:
    """The files a person wants first: the LoRA, the sample grid, then the epoch files, newest first."""
    return [p for _, _, p in sorted((file_rank(p), -index, p) for index, p in enumerate(paths))]


def advice_markdown(record: dict | None) -> str:
    """The recommendation card: its sentence, then every saved epoch's scores, the recommended one in bold."""
    if not record:
        return ("**Recommended epoch and strength** appear here from the first saved epoch: from the held-out "
                "loss and the samples' likeness, prompt following and health.")

    def cell(value: object, share: bool = False) -> str:
        if value is None:
            return "–"
        return f"{value:.0%}" if share else f"{value:.4f}" if isinstance(value, float) else str(value)

    shares = bool(record.get("shares"))
    rows = ["| epoch | file | validation loss | likeness | prompt following | health |", "|---|---|---|---|---|---|"]
    for row in record.get("scores", []):
        mark = "**" if row.get("file") == record.get("file") else ""
        values = [cell(row.get("epoch")), html.escape(str(row.get("file", ""))), cell(row.get("validation_loss")),
                  cell(row.get("likeness"), shares), cell(row.get("following"), shares),
                  "ok" if (row.get("health") or 0) >= 1 else html.escape(str(row.get("health_note") or "off"))]
        rows.append("| " + " | ".join(f"{mark}{value}{mark}" for value in values) + " |")
    judge = f" Samples judged by {record['scorer']}." if record.get("scorer") else " No scorer judged the samples."
    return (f"**{html.escape(public_text(str(record.get('headline', ''))))}**\n\n" + "\n".join(rows) + "\n\n" +
            judge)


@dataclass
class LiveView:
    """The widgets that follow the training job, and what this page has already been sent of it."""

    progress: gr.HTML
    curve: gr.HTML
    legend: gr.Markdown
    samples: gr.Gallery
    final: gr.DownloadButton
    saved: gr.File
    log: gr.HTML
    advice: gr.Markdown
    open_test: gr.Button
    grid_around: gr.Button
    seen: gr.State

    def update(self, studio: Studio, before: dict, job_ids: list[str]) -> tuple[dict, JobState, bool]:
        """Updates for what changed since ``before`` (of this page's run of ``job_ids`` while it trains, else of
        the newest), the job's state, and whether it started or ended since."""
        state, seen, changed = follow_losses(studio.jobs, before, job_ids)
        seen["prompts"] = before.get("prompts", [])
        if state.started != before.get("started") and state.run_dir:
            try:
                seen["prompts"] = studio.run_job(Path(state.run_dir).name).config.prompts()
            except UserError:
                seen["prompts"] = []
        seen["active"] = state.active
        seen["saved"] = saved_order([p for p in state.saved if Path(p).exists()])
        seen["samples"] = [list(item) for item in sample_items(state, seen["prompts"])]
        seen["progress"], seen["log"] = progress_html(state), log_html(state.log)
        shows = {self.seen: seen, **{widget: seen[key] for widget, key in ((self.progress, "progress"),
                                                                           (self.log, "log"))
                                     if seen[key] != before.get(key)}}
        if seen["saved"] != before.get("saved"):
            shows[self.saved] = [shown(p) for p in seen["saved"]] or None
            lora = next((p for p in seen["saved"] if p.endswith(".safetensors")), None)  # final, else newest
            shows[self.final] = gr.update(value=shown(lora), label=f"⬇ Download {Path(lora).name}", visible=True) \
                if lora else gr.update(value=None, visible=False)
        if seen["samples"] != before.get("samples"):  # sent again only when it changed
            shows[self.samples] = [(shown(path), caption) for path, caption in seen["samples"]]
        if seen["prompts"] != before.get("prompts"):
            shows[self.legend] = sample_legend(seen["prompts"])
        seen["advice"] = state.recommendation
        if seen["advice"] != before.get("advice") or "advice" not in before:
            shows[self.advice] = advice_markdown(state.recommendation)
            for button in (self.open_test, self.grid_around):
                shows[button] = gr.update(visible=bool(state.recommendation))
        seen["validation"] = [list(score) for score in state.validation]
        if changed or seen["validation"] != before.get("validation"):
            per_epoch = state.total_steps // state.total_epochs if state.total_epochs else 0
            shows[self.curve] = loss_chart([tuple(p) for p in seen["losses"]], per_epoch, state.validation)
        return shows, state, before.get("active") != state.active or "active" not in before


def live_view(progress: gr.HTML) -> LiveView:
    """The loss chart beside the samples, the recommendation card, then the download, the saved files and the log;
    ``progress`` is the bar on top of the tab."""
    with gr.Row():
        curve = gr.HTML(loss_chart([]), elem_id="loss-curve", label="Loss")
        with gr.Column():
            legend = gr.Markdown(sample_legend([]), elem_id="sample-legend")
            samples = gr.Gallery(show_label=False, columns=4, height=300, elem_id="train-samples")
    with gr.Group(elem_id="recommendation-card"):
        advice = gr.Markdown(advice_markdown(None), elem_id="recommendation", padding=True)
        with gr.Row():
            open_test = gr.Button("Open in Test", visible=False, variant="primary", scale=0,
                                  elem_id="recommendation-open")
            grid_around = gr.Button("Grid around it", visible=False, scale=0, elem_id="recommendation-grid")
    with gr.Row():
        with gr.Column():
            final = gr.DownloadButton("Download the LoRA", visible=False, variant="primary", elem_id="final-lora")
            saved = gr.File(label="Every saved file: the LoRA, the sample grid, then each epoch's file, newest "
                                  "first (click a name to download it)", file_count="multiple", height=300,
                            interactive=False, elem_id="saved-files")
        log = gr.HTML(log_html([]), elem_id="train-log")
    return LiveView(progress, curve, legend, samples, final, saved, log, advice, open_test, grid_around,
                    gr.State({}))
