"""Caption tab: BLIP or Florence-2 captions, or a WD tagger's tags, with the trigger word first; editing beside each
thumbnail, find/replace, tag counts."""

from __future__ import annotations

import time

import gradio as gr

from ..jobs import JobState
from ..studio import CAPTION_MODELS, CAPTION_TOKENS, FLORENCE_MODELS, WD_MODELS, CaptionOptions, CaptionResult, Studio
from .common import PRIVATE, AppContext, job_panel, job_revision, shown, user_errors

TITLE = "Caption"
LOCAL = "Local folder…"
PAGE_SIZE = 24


def caption_note(studio: Studio, text: str) -> str:
    """Advice shown under a caption: CLIP reads 75 tokens, the rest is cut off in training."""
    tokens = studio.caption_tokens(text)
    if tokens > CAPTION_TOKENS:
        return f"⚠️ {tokens} tokens: only the first {CAPTION_TOKENS} are used in training; shorten it."
    return f"{tokens} tokens"


def build(ctx: AppContext) -> None:
    """Widgets and events of the Caption tab."""
    with gr.Row():
        model = gr.Dropdown(label="Captioning model", choices=[*CAPTION_MODELS, LOCAL],
                            value=next(iter(CAPTION_MODELS)), scale=2, elem_id="caption-model",
                            info="BLIP and Florence-2 write sentences (photos, styles); a WD tagger writes booru "
                                 "tags (anime and illustration models).")
        local = gr.Textbox(label="Local model folder (for 'Local folder…'): BLIP, Florence-2 or a WD tagger",
                           placeholder="/models/blip-base", scale=3, elem_id="blip-folder")
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word (always first)", placeholder="ohwx", elem_id="trigger-word")
        prefix = gr.Textbox(label="Prefix", placeholder="photo of")
        suffix = gr.Textbox(label="Suffix", placeholder="high quality")
    with gr.Row():
        style = gr.Radio(["sentence", "tags"], value="sentence", label="Style",
                         info="tags: a sentence cut into short phrases")
        mode = gr.Radio(["only images without a caption", "overwrite all"], value="only images without a caption",
                        label="Which images")
        max_length = gr.Slider(10, 75, value=40, step=1, label="Maximum length (tokens)")
        batch_size = gr.Slider(1, 32, value=8, step=1, label="Batch size")
    with gr.Row(visible=False, elem_id="florence-options") as florence_row:
        detail = gr.Radio(["short", "detailed", "paragraph"], value="detailed", label="Florence-2 caption",
                          info="<CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>", elem_id="florence-detail")
    with gr.Row(visible=False, elem_id="tagger-options") as tagger_row:
        general = gr.Slider(0, 1, value=0.35, step=0.01, label="General tags from", elem_id="tagger-general",
                            info="a tag's lowest confidence; 0.35 is usual")
        character = gr.Slider(0, 1, value=0.85, step=0.01, label="Character tags from", elem_id="tagger-character",
                              info="0.85 is usual: a wrong name teaches the wrong thing")
        ratings = gr.Checkbox(label="Rating tag (general, sensitive …)", value=False, elem_id="tagger-ratings")
        underscores = gr.Checkbox(label="Keep underscores (long_hair)", value=False, elem_id="tagger-underscores")
        blacklist = gr.Textbox(label="Never write these tags", placeholder="simple background, white background",
                               elem_id="tagger-blacklist")
    run = gr.Button("Caption images", variant="primary", elem_id="caption-run")
    status = gr.Markdown(elem_id="caption-status")
    with gr.Accordion("Find and replace, tag frequencies", open=False):
        with gr.Row():
            find = gr.Textbox(label="Find")
            replace = gr.Textbox(label="Replace with")
            apply = gr.Button("Replace in all captions")
        tags = gr.Dataframe(headers=["tag", "count"], label="Tag frequencies", interactive=False)
    page = gr.Number(label="Page", value=1, precision=0, minimum=1)
    revision = ctx.revision

    def caption_done(state: JobState) -> dict:
        """What was captioned (before a Stop, too), and a new revision: every view of the captions refreshes."""
        result = state.result
        if not isinstance(result, CaptionResult):
            return {status: f"⚠️ {state.message}", revision: job_revision(state)}
        lines = [f"{'Stopped. ' if result.stopped else ''}Captioned {len(result.written)} images; kept "
                 f"{len(result.skipped)} existing captions."]
        lines += [f"- ⚠️ {p}" for p in result.problems]
        return {status: "\n".join(lines), revision: job_revision(state)}

    caption_job = job_panel(ctx, "caption", caption_done, [status, revision])

    def on_model(choice: str) -> dict:
        """The options of the chosen kind of model (a local folder may hold any)."""
        return {florence_row: gr.update(visible=choice in FLORENCE_MODELS or choice == LOCAL),
                tagger_row: gr.update(visible=choice in WD_MODELS or choice == LOCAL)}

    @user_errors
    def on_caption(values: dict, request: gr.Request) -> str:
        choice = values[model]
        source = values[local] if choice == LOCAL else CAPTION_MODELS.get(choice, "")
        options = CaptionOptions(
            values[trigger], values[prefix], values[suffix], int(values[max_length]), values[style],
            values[mode] == "overwrite all", int(values[batch_size]), values[detail], values[general],
            values[character], bool(values[ratings]), bool(values[underscores]), str(values[blacklist] or ""))
        return ctx.studio.start_caption(values[ctx.dataset], source, options, ctx.visitor(request))

    @user_errors
    def on_replace(values: dict, request: gr.Request) -> dict:
        name = values[ctx.dataset]
        changed = ctx.studio.find_replace_captions(name, values[find], values[replace], ctx.visitor(request))
        return {status: f"Replaced in {changed} captions.", revision: time.monotonic_ns(),
                tags: ctx.studio.tag_frequencies(name)}

    model.change(on_model, model, [florence_row, tagger_row], show_progress="hidden", **PRIVATE)
    run.click(on_caption, {ctx.dataset, model, local, trigger, prefix, suffix, style, mode, max_length, batch_size,
                           detail, general, character, ratings, underscores, blacklist}, caption_job, **PRIVATE)
    apply.click(on_replace, {ctx.dataset, find, replace}, [status, revision, tags], **PRIVATE)
    revision.change(ctx.studio.tag_frequencies, ctx.dataset, tags, **PRIVATE)
    ctx.dataset.change(ctx.studio.tag_frequencies, ctx.dataset, tags, **PRIVATE)
    ctx.dataset.change(user_errors(ctx.dataset_trigger), ctx.dataset, trigger, show_progress="hidden", **PRIVATE)
    ctx.keep_trigger(trigger)

    @gr.render(inputs=[ctx.dataset, page, revision], triggers=[ctx.app.load, ctx.picked.change, page.change,
                                                                  revision.change])
    def editor(name: str | None, page_number: float, _version: int) -> None:
        if not name:
            gr.Markdown("Choose or create a dataset above.")
            return
        folder = ctx.studio.images_dir(name)
        first = (max(int(page_number or 1), 1) - 1) * PAGE_SIZE
        total, page_images = ctx.studio.captioned_images(name, first, PAGE_SIZE)
        gr.Markdown(f"Images {first + 1}–{min(first + PAGE_SIZE, total)} of {total}. Captions save as you type.")
        for path, text in page_images:
            relative = str(path.relative_to(folder))
            with gr.Row(elem_classes="caption-row"):
                gr.Image(shown(ctx.studio.thumbnail(name, relative)), show_label=False, interactive=False, scale=1,
                         buttons=["fullscreen"], height=160)
                box = gr.Textbox(text, label=relative, info=caption_note(ctx.studio, text), lines=3, scale=4,
                                 interactive=True, key=f"caption-{relative}", elem_classes="caption-box")

            @user_errors
            def save(value: str, request: gr.Request, image=relative) -> dict:  # noqa: ANN001 - bound per row
                ctx.studio.write_caption(name, image, value, ctx.visitor(request))  # another's stay as they are
                return gr.update(info=caption_note(ctx.studio, value))

            box.input(save, box, box, trigger_mode="always_last", show_progress="hidden", **PRIVATE)
            box.blur(save, box, box, show_progress="hidden", **PRIVATE)
