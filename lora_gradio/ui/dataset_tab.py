"""Dataset tab: add images (drop, zip, server folder), see each file's status and the quality report, prepare copies."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..errors import UserError
from ..jobs import JobState
from ..studio import IMAGE_SUFFIXES, ImportReport
from .common import PRIVATE, AppContext, job_panel, public_text, shown, user_errors

TITLE = "Dataset"
STATUS_SYMBOL = {"imported": "✅", "warning": "⚠️", "skipped": "❌"}  # "ignored" files are only counted


def view(ctx: AppContext, name: str | None) -> tuple[list, str, dict]:
    """Gallery items, report and removable names for the dataset."""
    if not name:
        return [], "Choose or create a dataset above.", gr.update(choices=[], value=[])
    folder = ctx.studio.images_dir(name)
    names = [str(path.relative_to(folder)) for path in ctx.studio.images(name)]
    report = ctx.studio.check_dataset(name)
    gallery = []
    for relative in names:
        problems = report.per_image.get(relative, [])
        gallery.append((shown(ctx.studio.thumbnail(name, relative)),
                        f"{'⚠️ ' if problems else ''}{relative}" + (f": {'; '.join(problems)}" if problems else "")))
    return gallery, report.markdown(), gr.update(choices=names, value=[])


def results_table(report: ImportReport) -> tuple[str, list[list[str]]]:
    """The import's summary line and its per-file outcomes as table rows."""
    return (f"**{report.summary()}**", [[f"{STATUS_SYMBOL[r.status]} {r.status}", r.name, r.message]
                                        for r in report.shown])


def build(ctx: AppContext) -> None:
    """Widgets and events of the Dataset tab."""
    gr.Markdown("Drop 15–200 photos of one subject or style (40–50 is the sweet spot). Captions as same-name `.txt` "
                "files, zips and kohya folders (`10_ohwx woman/`) work too. Your original files are never changed.\n\n"
                + ctx.studio.limits.describe(), elem_id="dataset-limits")
    with gr.Row():
        upload = gr.File(label="Drop images, .txt captions or a .zip", file_count="multiple",
                         file_types=sorted(IMAGE_SUFFIXES | {".zip", ".txt"}), elem_id="upload", scale=3)
        with gr.Column(scale=2):
            folder = gr.Textbox(label="…or import a folder on this server", placeholder="/path/to/photos",
                                elem_id="import-folder")
            import_folder = gr.Button("Import folder")
    summary = gr.Markdown(elem_id="import-summary")
    results = gr.Dataframe(headers=["status", "file", "message"], label="Import results", interactive=False,
                           wrap=True, elem_id="import-results")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", show_label=False, columns=5, height="auto", object_fit="contain",
                                 elem_id="gallery")  # five whole columns fit beside the report at 1024 px
        with gr.Column(scale=2):
            report = gr.Markdown(elem_id="quality-report")
            remove_names = gr.Dropdown(label="Remove from the dataset", multiselect=True, choices=[])
            with gr.Row():
                remove = gr.Button("Remove selected", variant="stop", interactive=False, elem_id="remove-selected")
                drop = gr.Button("Delete this dataset…", elem_id="dataset-delete")
            with gr.Row(visible=False, elem_id="dataset-delete-confirm") as confirm_row:
                confirm_text = gr.Markdown()
                confirm = gr.Button("Yes, delete it", variant="stop", scale=0, elem_id="dataset-delete-yes")
                cancel = gr.Button("Cancel", scale=0)
    with gr.Row():
        resolution = gr.Number(label="Training resolution", elem_id="prepare-resolution", value=512, precision=0,
                               minimum=256, maximum=2048, step=64)
        center_crop = gr.Checkbox(label="Centre-crop to a square (otherwise aspect-ratio buckets)", value=False)
        prepare = gr.Button("Prepare training copies", variant="primary", elem_id="prepare-run")
    prepared = gr.Markdown(elem_id="prepare-result")
    outputs = [gallery, report, remove_names]  # refreshed whenever the dataset or its files change

    def on_upload(name: str | None, files: list[str] | None, version: int, request: gr.Request) -> tuple:
        """Import the dropped files; the drop zone empties either way, ready for the next try."""
        try:
            found = ctx.studio.import_uploads(name, [Path(f) for f in files or []], ctx.visitor(request))
        except UserError as exc:
            gr.Warning(public_text(str(exc)))
            return gr.skip(), gr.skip(), gr.skip(), None
        return *results_table(found), version + 1, None

    @user_errors
    def on_folder(name: str | None, path: str, version: int, request: gr.Request) -> tuple:
        return *results_table(ctx.studio.import_folder(name, path, ctx.visitor(request))), version + 1

    @user_errors
    def on_remove(name: str | None, names: list[str], version: int, request: gr.Request) -> tuple:
        gone = ctx.studio.remove_images(name, list(names or []), ctx.visitor(request))
        return f"**{len(gone)} removed.**", [["🗑 removed", n, ""] for n in gone], version + 1

    @user_errors
    def on_ask_drop(name: str | None, request: gr.Request) -> tuple[dict, str]:
        folder = ctx.studio.dataset_to_change(name, ctx.visitor(request)).parent
        count = len(ctx.studio.images(name))
        return gr.update(visible=True), (f"Delete dataset **{folder.name}** with its {count} images, their captions "
                                         "and training copies? Your original files elsewhere are not touched.")

    @user_errors
    def on_drop(name: str | None, request: gr.Request) -> tuple:
        note = ctx.studio.delete_dataset(name, ctx.visitor(request))
        return f"**{note}**", gr.update(visible=False), gr.update(choices=ctx.workspace.list_datasets(), value=None)

    def prepare_done(state: JobState) -> list:
        if state.status != "done":
            return [f"⚠️ {state.message}"]
        done, skipped = state.result
        return ["\n".join([f"Prepared {done} training copies (pixels only: captions stay with the originals)."]
                           + [f"- skipped {s}" for s in skipped])]

    prepare_job = ctx.prepare_job = job_panel(ctx, "prepare", prepare_done, [prepared])

    @user_errors
    def on_prepare(name: str | None, size: float, crop: bool, request: gr.Request) -> str:
        return ctx.studio.start_prepare(name, float(size or 512), bool(crop), ctx.visitor(request))

    upload.upload(on_upload, [ctx.dataset, upload, ctx.revision], [summary, results, ctx.revision, upload], **PRIVATE)
    remove_names.change(lambda names: gr.update(interactive=bool(names)), remove_names, remove, show_progress="hidden",
                        **PRIVATE)
    import_folder.click(on_folder, [ctx.dataset, folder, ctx.revision], [summary, results, ctx.revision], **PRIVATE)
    remove.click(on_remove, [ctx.dataset, remove_names, ctx.revision], [summary, results, ctx.revision], **PRIVATE)
    prepare.click(on_prepare, [ctx.dataset, resolution, center_crop], prepare_job, **PRIVATE)
    drop.click(on_ask_drop, ctx.dataset, [confirm_row, confirm_text], **PRIVATE)
    cancel.click(lambda: gr.update(visible=False), None, confirm_row, **PRIVATE)
    confirm.click(on_drop, ctx.dataset, [summary, confirm_row, ctx.dataset], **PRIVATE)
    ctx.revision.change(user_errors(lambda name: view(ctx, name)), ctx.dataset, outputs, **PRIVATE)
    ctx.dataset.change(user_errors(lambda name: view(ctx, name)), ctx.dataset, outputs, **PRIVATE)
