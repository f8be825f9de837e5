"""The Test tab's Tools: resize, merge, bake and extract, each started as a job whose report is shown when it ends; a
new LoRA is picked in the Test tab at once, ready for Generate."""

from __future__ import annotations

import gradio as gr

from ..errors import UserError
from ..jobs import JobState
from ..studio import DTYPES, METHODS, NO_LORA, RankRule
from .base_picker import base_name
from .common import PRIVATE, AppContext, job_panel, user_errors

LORA_OUTPUT = "models/loras"


def rank_widgets(prefix: str, rank: int, rank_label: str) -> tuple[gr.Number, gr.Dropdown, gr.Number]:
    """Rank, method and value: how many ranks each module keeps (sd-scripts' sv_fro and sv_ratio)."""
    with gr.Row():
        count = gr.Number(rank, precision=0, minimum=0, maximum=1024, label=rank_label, elem_id=f"{prefix}-rank")
        method = gr.Dropdown(list(METHODS), value="fixed", label="Ranks per module", elem_id=f"{prefix}-method",
                             info="; ".join(f"{name}: {text}" for name, text in METHODS.items()))
        value = gr.Number(0.9, label="VALUE (sv_fro: share, 0–1; sv_ratio: ratio, > 1)", elem_id=f"{prefix}-value")
    return count, method, value


def rule_of(rank: float | None, method: str, value: float | None) -> RankRule:
    """The rank widgets as a checked rule; an empty box is named."""
    if rank is None:
        raise UserError("Give a rank, a whole number from 1.")
    return RankRule(int(rank) if float(rank).is_integer() else rank, method, value or 0.0).check()


def parse_weights(text: str) -> list[float]:
    """'1, 0.5' as numbers, one per file; blank: none given (each file at 1)."""
    parts = [part for part in (text or "").replace(";", ",").split(",") if part.strip()]
    try:
        return [float(part) for part in parts]
    except ValueError as exc:
        raise UserError(f"Weights must be numbers separated by commas, like 1, 0.5 ({exc}).") from exc


def build(ctx: AppContext, lora: gr.Dropdown, base_choice: gr.Dropdown, base_repo: gr.Textbox) -> None:
    """The Tools accordion under the Test tab; ``lora`` is the Test tab's LoRA picker, which a new file is put in."""
    def loras() -> list[str]:
        return list(ctx.workspace.lora_files())

    with gr.Accordion("Tools: resize, merge, bake, extract", open=False, elem_id="lora-tools"):
        gr.Markdown(f"Each tool writes a new file (never over one): LoRAs into `{LORA_OUTPUT}`, where this tab lists "
                    "them, a baked checkpoint into `models/checkpoints`. Its metadata says what was done.")
        with gr.Tab("Resize", elem_id="tool-resize-tab"):
            resize_lora = gr.Dropdown(loras(), label="LoRA to resize", elem_id="resize-lora", allow_custom_value=True)
            resize_rank = rank_widgets("resize", 8, "New rank (the most, with sv_fro or sv_ratio)")
            with gr.Row(equal_height=True):
                resize_name = gr.Textbox(label="New file name", placeholder="the LoRA's name and its new rank",
                                         elem_id="resize-name", scale=3)
                resize_go = gr.Button("Resize", variant="primary", elem_id="resize-go", scale=1)
        with gr.Tab("Merge", elem_id="tool-merge-tab"):
            merge_loras = gr.Dropdown(loras(), multiselect=True, label="LoRA files to merge", elem_id="merge-loras",
                                      allow_custom_value=True)
            merge_weights = gr.Textbox("", placeholder="1 for each file", elem_id="merge-weights",
                                       label="Weights, one per file in order (applying the merge at strength s = "
                                             "each file at s × its weight)")
            merge_rank = rank_widgets("merge", 0, "Rank (0: the ranks side by side, exact; else SVD to it)")
            with gr.Row(equal_height=True):
                merge_name = gr.Textbox(label="New file name", placeholder="merged-…", elem_id="merge-name", scale=3)
                merge_go = gr.Button("Merge", variant="primary", elem_id="merge-go", scale=1)
        with gr.Tab("Bake", elem_id="tool-bake-tab"):
            gr.Markdown("Merges a LoRA into the base model picked above, as a single-file checkpoint that ComfyUI, "
                        "A1111/Forge and this app load as a base model.")
            bake_lora = gr.Dropdown(loras(), label="LoRA to bake in", elem_id="bake-lora", allow_custom_value=True)
            with gr.Row():
                bake_model = gr.Slider(-2, 2, value=1, step=0.05, label="strength_model", elem_id="bake-model")
                bake_clip = gr.Slider(-2, 2, value=1, step=0.05, label="strength_clip", elem_id="bake-clip")
                bake_dtype = gr.Radio(list(DTYPES), value="fp16", label="Precision", elem_id="bake-dtype")
            with gr.Row(equal_height=True):
                bake_name = gr.Textbox(label="Checkpoint file name", placeholder="base-lora", elem_id="bake-name",
                                       scale=3)
                bake_go = gr.Button("Bake", variant="primary", elem_id="bake-go", scale=1)
        with gr.Tab("Extract", elem_id="tool-extract-tab"):
            gr.Markdown("Extracts a LoRA from a fine-tuned checkpoint against the base model picked above (the one "
                        "it was made from).")
            tuned = gr.Dropdown(ctx.workspace.list_checkpoints(), label="Fine-tuned checkpoint (models/checkpoints)",
                                elem_id="extract-tuned", allow_custom_value=True)
            extract_rank = rank_widgets("extract", 32, "Rank (the most, with sv_fro or sv_ratio)")
            conv_rank = gr.Number(0, precision=0, minimum=0, maximum=1024, elem_id="extract-conv-rank",
                                  label="3×3 conv rank (LoCon; 0: leave the convs out)")
            with gr.Row(equal_height=True):
                extract_name = gr.Textbox(label="New file name", placeholder="the checkpoint's name, extracted",
                                          elem_id="extract-name", scale=3)
                extract_go = gr.Button("Extract", variant="primary", elem_id="extract-go", scale=1)
        report = gr.Textbox(label="Tool report", lines=8, max_lines=30, interactive=False, elem_id="tool-report")

        def done(state: JobState) -> dict:
            if state.status != "done":
                return {}
            made = state.result
            label = ctx.studio.tool_label(made.path)
            picked = f"\n\nPicked {label} in the LoRA list above: press Generate to try it." if label else ""
            shows = {report: made.text() + picked}
            return {**shows, lora: gr.update(choices=[NO_LORA, *loras()], value=label)} if label else shows

        job = job_panel(ctx, "tool", done, [report, lora])

    def rule(values: dict, widgets: tuple) -> RankRule:
        return rule_of(*(values[widget] for widget in widgets))

    @user_errors
    def on_resize(values: dict, page: gr.Request) -> str:
        return ctx.studio.start_resize(values[resize_lora], rule(values, resize_rank), values[resize_name],
                                       ctx.visitor(page))

    @user_errors
    def on_merge(values: dict, page: gr.Request) -> str:
        picked = list(values[merge_loras] or [])
        compress = rule(values, merge_rank) if values[merge_rank[0]] else None
        return ctx.studio.start_merge(picked, parse_weights(values[merge_weights]), compress,
                                      values[merge_name], ctx.visitor(page))

    @user_errors
    def on_bake(values: dict, page: gr.Request) -> str:
        return ctx.studio.start_bake(base_name(values[base_choice], values[base_repo]), values[bake_lora],
                                     values[bake_model], values[bake_clip], values[bake_dtype], values[bake_name],
                                     ctx.visitor(page))

    @user_errors
    def on_extract(values: dict, page: gr.Request) -> str:
        _, method, value = extract_rank
        convs = rule_of(values[conv_rank], values[method], values[value]) if values[conv_rank] else None
        return ctx.studio.start_extract(base_name(values[base_choice], values[base_repo]), values[tuned],
                                        rule(values, extract_rank), convs, values[extract_name], ctx.visitor(page))

    resize_go.click(on_resize, {resize_lora, *resize_rank, resize_name}, job, **PRIVATE)
    merge_go.click(on_merge, {merge_loras, merge_weights, *merge_rank, merge_name}, job, **PRIVATE)
    bake_go.click(on_bake, {base_choice, base_repo, bake_lora, bake_model, bake_clip, bake_dtype, bake_name}, job,
                  **PRIVATE)
    extract_go.click(on_extract, {base_choice, base_repo, tuned, *extract_rank, conv_rank, extract_name}, job,
                     **PRIVATE)
    for picker in (resize_lora, merge_loras, bake_lora):  # files trained or made since the page opened
        picker.focus(lambda: gr.update(choices=loras()), None, picker, **PRIVATE)
    tuned.focus(lambda: gr.update(choices=ctx.workspace.list_checkpoints()), None, tuned, **PRIVATE)
