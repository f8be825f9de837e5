"""Test tab: any trained epoch or SD1.5 LoRA at ComfyUI strengths on the cached base model, and comparison grids."""

from __future__ import annotations

import math

import gradio as gr

from ..access import Visitor
from ..errors import UserError
from ..jobs import JobState
from ..request import SAMPLERS, GenerateRequest, random_seed
from ..studio import NO_LORA
from . import lora_tools
from .base_picker import base_name, base_picker
from .common import MODEL, PRIVATE, AppContext, job_panel, public_text, shown, user_errors

TITLE = "Test"
KEEP_IMAGES = 48  # images the gallery keeps, newest first
SHOW_RESULTS = "() => document.querySelector('#test-gallery')?.scrollIntoView({block: 'nearest'})"
# runs in the page once the workflow's link is shown: follows it (a link with a download name saves, not opens)
DOWNLOAD_WORKFLOW = """() => {
  let tries = 0;
  const follow = () => {
    const link = document.querySelector('#test-workflow-file a[download]');
    if (link) link.click(); else if (++tries < 30) setTimeout(follow, 100);
  };
  setTimeout(follow, 100);
}"""


def build(ctx: AppContext) -> None:
    """Widgets and events of the Test tab."""
    def lora_choices() -> list[str]:
        return [NO_LORA, *ctx.workspace.lora_files()]

    with gr.Row():
        base_choice, base_repo = base_picker(ctx)
        lora = gr.Dropdown(lora_choices(), value=NO_LORA, label="LoRA (run/epoch file, or models/loras)", scale=3,
                           elem_id="test-lora", allow_custom_value=True)  # new runs appear after start-up
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(label="Prompt", lines=2, scale=3, elem_id="test-prompt")
        negative = gr.Textbox(label="Negative prompt", lines=2, scale=2)
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id="test-generate")
            workflow = gr.Button("Download ComfyUI workflow", size="sm", elem_id="test-workflow")
    with gr.Row():
        strength_model = gr.Slider(-2, 2, value=1, step=0.05, label="strength_model (UNet)",
                                   elem_id="strength-model")
        strength_clip = gr.Slider(-2, 2, value=1, step=0.05, label="strength_clip (text encoder)",
                                  elem_id="strength-clip")
    gallery = gr.Gallery(label="Results (newest first; parameters in each PNG)", columns=4, height=300,
                         elem_id="test-gallery")
    with gr.Row(equal_height=True):
        applied = gr.Markdown(elem_id="test-lora-report")
        cleared = gr.Markdown(elem_id="test-cleared")
        clear = gr.Button("Delete all test images", variant="stop", size="sm", scale=0, elem_id="test-clear")
    with gr.Row(equal_height=True):
        seed = gr.Number(label="Seed", value=1, precision=0, minimum=0, elem_id="test-seed", scale=2)
        dice = gr.Button("🎲 random seed", scale=1, size="sm")
        steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="test-steps", scale=2)
        cfg = gr.Slider(0, 20, value=7, step=0.5, label="CFG", scale=2)
    with gr.Row():
        width = gr.Number(label="Width (0 = model default)", value=0, precision=0, minimum=0)
        height = gr.Number(label="Height (0 = model default)", value=0, precision=0, minimum=0)
        scheduler = gr.Dropdown(list(SAMPLERS), value="Euler", label="Scheduler")
        clip_skip = gr.Radio([1, 2], value=1, label="CLIP skip", elem_id="test-clip-skip",
                             info="Set from the LoRA when you pick one; 2 for anime models.")
    workflow_file = gr.File(label="ComfyUI workflow: drop it onto the ComfyUI page, or open it with Load",
                            visible=False, interactive=False, elem_id="test-workflow-file")
    gr.Markdown(ctx.studio.limits.describe(), elem_id="test-limits")
    with gr.Accordion("Use it in ComfyUI, inspect the LoRA", open=False):
        with gr.Row():
            send = gr.Button("Send the LoRA to ComfyUI", elem_id="comfy-send")
            replace = gr.Checkbox(label="Replace a different file of the same name", value=False,
                                  elem_id="comfy-replace")
            link = gr.Button("Link the base model into ComfyUI", elem_id="comfy-link")
            queue = gr.Button(f"Queue in ComfyUI ({ctx.studio.comfyui_url})", elem_id="comfy-queue")
            inspect = gr.Button("Inspect the LoRA", elem_id="lora-inspect")
        handed = gr.Markdown(elem_id="comfy-result")
        inspection = gr.Textbox(label="LoRA inspector", lines=14, max_lines=40, interactive=False,
                                elem_id="lora-inspection")
    lora_tools.build(ctx, lora, base_choice, base_repo)
    with gr.Accordion("Compare grid: epochs × strengths", open=True):
        with gr.Row():
            grid_loras = gr.Dropdown(lora_choices()[1:], multiselect=True, label="LoRA files (rows)", scale=3,
                                     elem_id="grid-loras", allow_custom_value=True)
            strengths = gr.Textbox(value="0, 0.25, 0.5, 0.75, 1", label="Strengths (columns)", scale=2,
                                   info="Each sets strength_model and strength_clip alike.", elem_id="grid-strengths")
            grid_button = gr.Button("Make grid", scale=1, elem_id="grid-run")
        grid = gr.Image(label="Grid", type="filepath", elem_id="grid-image", interactive=False)

        def grid_done(state: JobState) -> dict:
            return {grid: shown(state.result.path)} if state.status == "done" else {}

        grid_job = job_panel(ctx, "grid", grid_done, [grid])
    history = ctx.remembered("test-images", [])  # [file name, parameters] of this browser's images, newest first
    picked = ctx.remembered("test-grid-loras", [])  # the grid's rows as this browser left them
    newest = gr.State("")  # the newest trained LoRA this page has offered

    def gallery_of(kept: list, visitor: Visitor) -> list:
        """The remembered images that are still this visitor's test images; the browser's list is only a hint."""
        items = []
        for entry in kept if isinstance(kept, list) else []:
            if isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(v, str) for v in entry):
                path = ctx.studio.test_image(entry[0], visitor)
                if path is not None:
                    items.append((shown(path), entry[1]))
        return items[:KEEP_IMAGES]

    fields = {prompt, negative, seed, steps, cfg, width, height, scheduler, lora, strength_model, strength_clip,
              clip_skip, base_choice, base_repo}  # every handler below reads them by component, never by position

    def request_from(values: dict) -> GenerateRequest:
        return GenerateRequest.checked(values[prompt], values[negative], values[seed] or 0, values[steps],
                                       values[cfg], values[width] or None, values[height] or None, values[scheduler],
                                       ctx.studio.lora(values[lora]), values[strength_model], values[strength_clip],
                                       values[clip_skip])

    def base_of(values: dict) -> str:
        return base_name(values[base_choice], values[base_repo])

    @user_errors
    def on_generate(values: dict, page: gr.Request, progress: gr.Progress = gr.Progress()) -> dict:
        visitor = ctx.visitor(page)
        made = ctx.studio.generate(base_of(values), request_from(values),
                                   on_wait=lambda text: progress(0, desc=text), visitor=visitor)
        past = values[history] if isinstance(values[history], list) else []
        kept = [[made.path.name, made.parameters], *past][:KEEP_IMAGES]
        return {gallery: gallery_of(kept, visitor), history: kept, applied: made.lora}

    @user_errors
    def on_grid(values: dict, page: gr.Request) -> str:
        return ctx.studio.start_grid(base_of(values), request_from(values), list(values[grid_loras] or []),
                                     parse_strengths(values[strengths]), ctx.visitor(page))

    def on_workflow(values: dict, page: gr.Request) -> dict:
        """Write the workflow; a refusal also takes the last file's link away, so no stale file is downloaded."""
        try:
            path = ctx.studio.workflow(base_of(values), request_from(values), visitor=ctx.visitor(page))
        except UserError as exc:
            gr.Warning(public_text(str(exc)))
            return gr.update(value=None, visible=False)
        return gr.update(value=shown(path), visible=True)

    @user_errors
    def on_send(choice: str, repo: str, lora_label: str, overwrite: bool, page: gr.Request) -> str:
        return ctx.studio.send_to_comfyui(lora_label, base_name(choice, repo), bool(overwrite), ctx.visitor(page))

    @user_errors
    def on_link(choice: str, repo: str) -> str:
        return ctx.studio.link_base_into_comfyui(base_name(choice, repo))

    @user_errors
    def on_queue(values: dict) -> str:
        return ctx.studio.queue_in_comfyui(base_of(values), request_from(values))

    generate.click(on_generate, fields | {history}, [gallery, history, applied], **PRIVATE,
                   **MODEL).then(None, js=SHOW_RESULTS, **PRIVATE)  # the new image in view, wherever one scrolled
    workflow.click(on_workflow, fields, workflow_file, **PRIVATE).then(
        None, js=DOWNLOAD_WORKFLOW, **PRIVATE)  # one click: the browser saves the file as soon as it is written
    send.click(on_send, [base_choice, base_repo, lora, replace], handed, **PRIVATE)
    link.click(on_link, [base_choice, base_repo], handed, **PRIVATE)
    queue.click(on_queue, fields, handed, **PRIVATE)
    inspect.click(user_errors(ctx.studio.inspect), lora, inspection, **PRIVATE)
    grid_button.click(on_grid, fields | {grid_loras, strengths}, grid_job, **PRIVATE)
    dice.click(random_seed, None, seed, **PRIVATE)

    def ready(values: dict) -> dict:
        """Open on the newest trained LoRA with a prompt holding its trigger word, once per new LoRA; a choice
        the visitor made stays until something newer is trained."""
        label, offered = ctx.studio.newest_lora(), values[newest]
        choices = lora_choices()
        lists = {grid_loras: gr.update(choices=choices[1:]), newest: label}
        if label == offered:
            return {**lists, lora: gr.update(choices=choices, value=values[lora] if values[lora] in choices
                                             else NO_LORA)}
        suggested = ctx.studio.lora_prompt(label)
        keep = values[prompt] and values[prompt] != ctx.studio.lora_prompt(offered)  # a prompt written stays
        offer = {} if keep or not suggested else {prompt: suggested}
        return {**lists, lora: gr.update(choices=choices, value=label), **offer}

    def on_clear(page: gr.Request) -> dict:
        return {cleared: ctx.studio.clear_test_images(ctx.visitor(page)), gallery: [], history: []}

    def on_lora(label: str | None) -> int | dict:
        """The CLIP skip the chosen LoRA was trained with."""
        try:
            return ctx.studio.lora_clip_skip(label)
        except UserError:  # not a readable LoRA: the choice stays, and Generate says what is wrong
            return gr.skip()

    lora.focus(lambda: gr.update(choices=lora_choices()), None, lora, **PRIVATE)
    grid_loras.focus(lambda: gr.update(choices=lora_choices()[1:]), None, grid_loras, **PRIVATE)
    for event in (ctx.app.load, ctx.tab.select):
        event(ready, {lora, prompt, newest}, [lora, prompt, grid_loras, newest], **PRIVATE)
    clear.click(on_clear, None, [cleared, gallery, history], **PRIVATE)

    def restore(values: dict, page: gr.Request) -> dict:
        """A reload shows this browser's images and grid rows again, as far as they still exist."""
        labels, rows = set(lora_choices()[1:]), values[picked]
        rows = [row for row in rows if isinstance(row, str) and row in labels] if isinstance(rows, list) else []
        return {gallery: gallery_of(values[history], ctx.visitor(page)), **({grid_loras: rows} if rows else {})}

    ctx.app.load(restore, {history, picked}, [gallery, grid_loras], **PRIVATE)

    @user_errors
    def on_handoff(values: dict, page: gr.Request) -> dict:
        """Open what the Train tab's recommendation card sent: its file at its strength with its prompt, on the
        run's base; for a grid, the neighbouring epochs × strengths, started at once."""
        plan = values[ctx.handoff]
        if not isinstance(plan, dict) or not plan.get("lora"):
            return {}
        choices = lora_choices()
        picked = {lora: plan["lora"], strength_model: plan["strength"], strength_clip: plan["strength"],
                  prompt: plan["prompt"] or values[prompt],
                  **({base_choice: plan["base"], base_repo: ""} if plan.get("base") else {})}
        # the tab opens with these values in place, and counts the newest LoRA as offered: opening it keeps them
        shows = {**picked, lora: gr.update(choices=choices, value=plan["lora"]), newest: ctx.studio.newest_lora(),
                 ctx.tabs: gr.Tabs(selected=TITLE.lower())}
        if not plan.get("grid"):
            return shows
        chosen = {**values, **picked}  # the grid is rendered with what the tab now shows
        columns = parse_strengths(", ".join(str(value) for value in plan.get("strengths") or []))
        job = ctx.studio.start_grid(base_of(chosen), request_from(chosen), list(plan.get("rows") or []), columns,
                                    ctx.visitor(page))
        return {**shows, grid_loras: gr.update(choices=choices[1:], value=plan["rows"]), grid_job: job,
                strengths: ", ".join(f"{value:g}" for value in columns)}

    ctx.handoff.change(on_handoff, fields | {ctx.handoff}, [lora, strength_model, strength_clip, prompt, base_choice,
                                                            base_repo, grid_loras, grid_job, strengths, newest,
                                                            ctx.tabs], **PRIVATE)
    grid_loras.change(lambda rows: rows or [], grid_loras, picked, show_progress="hidden", **PRIVATE)
    lora.change(on_lora, lora, clip_skip, **PRIVATE)


def parse_strengths(text: str) -> list[float]:
    """'0, 0.5; 1' as numbers, refusing anything that is not a finite number."""
    try:
        values = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError as exc:
        raise UserError(f"Strengths must be numbers separated by commas, like 0, 0.5, 1 ({exc}).") from exc
    if not all(math.isfinite(v) for v in values):
        raise UserError("Strengths must be finite numbers from -2 to 2.")
    return values
