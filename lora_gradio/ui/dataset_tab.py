"""Dataset tab: add images (drop, zip, server folder), see each file's status and the quality report, prepare copies."""

from __future__ import annotations

import gradio as gr

from ..errors import UserError
from ..jobs import JobState
from ..studio import IMAGE_SUFFIXES, ImportReport
from .common import PRIVATE, AppContext, job_panel, job_revision, public_text, shown, uploaded, user_errors

TITLE = "Dataset"
STATUS_SYMBOL = {"imported": "✅", "warning": "⚠️", "skipped": "❌"}  # "ignored" files are only counted


def gallery_items(ctx: AppContext, name: str) -> tuple[list[tuple[str, str]], str, list[str]]:
    """The dataset's thumbnails captioned with their problems, its quality report, and its images' names."""
    folder = ctx.studio.images_dir(name)
    names = [str(path.relative_to(folder)) for path in ctx.studio.images(name)]
    report = ctx.studio.check_dataset(name)
    gallery = []
    for relative in names:
        problems = report.per_image.get(relative, [])
        mask = " · loss mask (darkened: left out)" if relative in report.masked else ""
        gallery.append((shown(ctx.studio.thumbnail(name, relative)), f"{'⚠️ ' if problems else ''}{relative}{mask}"
                        + (f": {'; '.join(problems)}" if problems else "")))
    return gallery, report.markdown(), names


def result_rows(report: ImportReport) -> list[list[str]]:
    """An import's per-file outcomes as table rows."""
    return [[f"{STATUS_SYMBOL[r.status]} {r.status}", r.name, r.message] for r in report.shown]


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

    def import_done(state: JobState) -> dict:
        """The import's summary and rows (what came in before a Stop, too), and a new revision of the files."""
        if not isinstance(state.result, ImportReport):
            return {summary: f"⚠️ {state.message}"}
        return {summary: f"**{state.result.summary()}**", results: result_rows(state.result),
                ctx.revision: job_revision(state)}

    import_job = job_panel(ctx, "import", import_done, [summary, results, ctx.revision])
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

    def on_upload(name: str | None, files: list[str] | None, request: gr.Request) -> dict:
        """Import the dropped files in the background; the drop zone empties either way, ready for the next try."""
        try:
            return {import_job: ctx.studio.start_import_uploads(name, uploaded(files), ctx.visitor(request)),
                    upload: None}
        except UserError as exc:
            gr.Warning(public_text(str(exc)))
            return {upload: None}

    @user_errors
    def on_folder(name: str | None, path: str, request: gr.Request) -> str:
        return ctx.studio.start_import_folder(name, path, ctx.visitor(request))

    @user_errors
    def on_remove(values: dict, request: gr.Request) -> dict:
        gone = ctx.studio.remove_images(values[ctx.dataset], list(values[remove_names] or []), ctx.visitor(request))
        return {summary: f"**{len(gone)} removed.**", results: [["🗑 removed", n, ""] for n in gone],
                ctx.revision: values[ctx.revision] + 1}

    @user_errors
    def on_ask_drop(name: str | None, request: gr.Request) -> dict:
        folder = ctx.studio.dataset_to_change(name, ctx.visitor(request)).parent
        count = len(ctx.studio.images(name))
        return {confirm_row: gr.update(visible=True),
                confirm_text: f"Delete dataset **{folder.name}** with its {count} images, their captions and training "
                              "copies? Your original files elsewhere are not touched."}

    @user_errors
    def on_drop(name: str | None, request: gr.Request) -> dict:
        note = ctx.studio.delete_dataset(name, ctx.visitor(request))
        return {summary: f"**{note}**", confirm_row: gr.update(visible=False),
                ctx.dataset: gr.update(choices=ctx.workspace.list_datasets(), value=None)}

    @user_errors
    def on_view(name: str | None) -> dict:
        """Gallery, report and removable names for the dataset."""
        if not name:
            return {gallery: [], report: "Choose or create a dataset above.",
                    remove_names: gr.update(choices=[], value=[])}
        items, text, names = gallery_items(ctx, name)
        return {gallery: items, report: text, remove_names: gr.update(choices=names, value=[])}

    def prepare_done(state: JobState) -> dict:
        if state.status != "done":
            return {prepared: f"⚠️ {state.message}"}
        lines = [f"Prepared {state.result.done} training copies (pixels only: captions stay with the originals)."]
        return {prepared: "\n".join(lines + [f"- skipped {s}" for s in state.result.skipped])}

    prepare_job = ctx.prepare_job = job_panel(ctx, "prepare", prepare_done, [prepared])

    @user_errors
    def on_prepare(name: str | None, size: float, crop: bool, request: gr.Request) -> str:
        return ctx.studio.start_prepare(name, float(size or 512), bool(crop), ctx.visitor(request))

    upload.upload(on_upload, [ctx.dataset, upload], [import_job, upload], **PRIVATE)
    remove_names.change(lambda names: gr.update(interactive=bool(names)), remove_names, remove, show_progress="hidden",
                        **PRIVATE)
    import_folder.click(on_folder, [ctx.dataset, folder], import_job, **PRIVATE)
    remove.click(on_remove, {ctx.dataset, remove_names, ctx.revision}, [summary, results, ctx.revision], **PRIVATE)
    prepare.click(on_prepare, [ctx.dataset, resolution, center_crop], prepare_job, **PRIVATE)
    drop.click(on_ask_drop, ctx.dataset, [confirm_row, confirm_text], **PRIVATE)
    cancel.click(lambda: gr.update(visible=False), None, confirm_row, **PRIVATE)
    confirm.click(on_drop, ctx.dataset, [summary, confirm_row, ctx.dataset], **PRIVATE)
    ctx.revision.change(on_view, ctx.dataset, outputs, **PRIVATE)
    ctx.picked.change(on_view, ctx.dataset, outputs, **PRIVATE)
