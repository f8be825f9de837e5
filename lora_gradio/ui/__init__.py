"""The Gradio app: one module per tab, each a ``build(ctx)`` that only wires widgets to :class:`Studio` calls."""

from __future__ import annotations

import gradio as gr

from ..studio import DEMO_IMAGES, DEMO_TRIGGER, Studio
from .common import PRIVATE, AppContext, user_errors, word_messages_for

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
def build_app(studio: Studio) -> gr.Blocks:
    """The whole app over one studio: its workspace, model cache, jobs, limits and operator."""
    from . import api, caption_tab, dataset_tab, test_tab, train_tab

    workspace = studio.workspace
    word_messages_for(studio)
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
        ctx = AppContext(studio, app, dataset, gr.State(0), gr.State(""))
        # a busy page can report the same choice again; the views that cost something follow real changes only
        dataset.change(lambda name: name or "", dataset, ctx.picked, show_progress="hidden", **PRIVATE)
        chosen = ctx.remembered("dataset", "")  # the dataset this browser worked on

        @user_errors
        def create_dataset(name: str, request: gr.Request) -> dict:
            created = studio.create_dataset(name, ctx.visitor(request))
            return {dataset: gr.update(choices=workspace.list_datasets(), value=created), new_name: "",
                    ctx.picked: created}

        @user_errors
        def load_demo(request: gr.Request) -> dict:
            created = studio.load_demo_dataset(ctx.visitor(request))
            gr.Info(f"Dataset {created}: {DEMO_IMAGES} rings captioned '{DEMO_TRIGGER}, a … {DEMO_TRIGGER} on a … "
                    "background'. The demo base has never seen a ring: train it with the demo preset, then test "
                    f"'{DEMO_TRIGGER}, a blue {DEMO_TRIGGER} on a yellow background'.")
            return {dataset: gr.update(choices=workspace.list_datasets(), value=created), ctx.picked: created}

        # a made dataset is picked in the same event, so that the page's restore below never undoes it
        create.click(create_dataset, new_name, [dataset, new_name, ctx.picked], **PRIVATE)
        demo.click(load_demo, None, [dataset, ctx.picked], **PRIVATE)
        new_name.submit(create_dataset, new_name, [dataset, new_name, ctx.picked], **PRIVATE)

        def restore_dataset(values: dict) -> dict:
            """The remembered dataset, unless the page already shows one: on a busy server the page's load can be
            answered after a dataset was created or picked, and must not put the picker back."""
            names, remembered = workspace.list_datasets(), values[chosen]
            if values[ctx.picked] or remembered not in names:
                return gr.update(choices=names)
            return gr.update(choices=names, value=remembered)

        app.load(restore_dataset, {chosen, ctx.picked}, dataset, **PRIVATE)
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

        cache_seen = gr.State("")

        def describe_cache(values: dict, request: gr.Request | None = None) -> dict:
            line = studio.public(studio.describe_caches())
            return {} if line == values[cache_seen] else {cache_status: line, cache_seen: line}

        ctx.every_second(describe_cache, {cache_seen}, [cache_status, cache_seen])
        app.load(describe_cache, {cache_seen}, [cache_status, cache_seen], **PRIVATE)

        ctx.handoff = gr.State({})
        with gr.Tabs() as tabs:
            ctx.tabs = tabs
            for tab in (dataset_tab, caption_tab, train_tab, test_tab):
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower(), elem_id=f"tab-{tab.TITLE.lower()}") as ctx.tab:
                    tab.build(ctx)
        # a page opened or reloaded while a run trains opens where the run is
        app.load(lambda: gr.Tabs(selected=train_tab.TITLE.lower()) if studio.training_run() else gr.skip(), None,
                 tabs, **PRIVATE)
        for state in ctx.outside_tabs:
            state.render()
        ctx.link_triggers()
        ctx.start_ticking()
    return app
