"""The Gradio app: one module per tab, each a ``build(ctx)`` that only wires widgets to backend calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import gradio as gr

from ..errors import UserError
from ..jobs import TrainingJobs
from ..models import ModelCache
from ..workspace import Workspace

CSS = """
.caption-row {align-items: flex-start}
.caption-row img {max-height: 160px; object-fit: contain}
"""


@dataclass
class AppContext:
    """What every tab shares: the workspace, the model cache, the dataset picker, and a counter that moves
    whenever the dataset's files change, so every view of them refreshes."""

    workspace: Workspace
    cache: ModelCache
    jobs: TrainingJobs
    app: gr.Blocks
    dataset: gr.Dropdown
    revision: gr.State


def user_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Show a ``UserError`` as a message in the page; the app carries on."""

    @wraps(handler)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from exc

    return wrapped


def build_app(workspace: Workspace, cache: ModelCache | None = None) -> gr.Blocks:
    """The whole app over one workspace and one model cache."""
    from . import caption_tab, dataset_tab, test_tab, train_tab

    with gr.Blocks(title="lora-gradio") as app:
        gr.Markdown("# lora-gradio\nFrom a folder of photos to an SD1.5 LoRA for ComfyUI, A1111/Forge and diffusers.")
        cache_status = gr.Markdown(elem_id="cache-status")
        with gr.Row(equal_height=True):
            dataset = gr.Dropdown(label="Dataset", choices=workspace.list_datasets(), value=None, scale=3,
                                  elem_id="dataset-picker", allow_custom_value=True)  # other tabs may add some
            new_name = gr.Textbox(label="New dataset", placeholder="name, e.g. anna", scale=2, elem_id="new-dataset")
            create = gr.Button("Create", scale=1, elem_id="create-dataset")
        cache = cache or ModelCache()
        ctx = AppContext(workspace, cache, TrainingJobs(cache), app, dataset, gr.State(0))

        @user_errors
        def create_dataset(name: str) -> tuple[dict, str]:
            workspace.dataset_dir(name, create=True)
            return gr.update(choices=workspace.list_datasets(), value=name.strip()), ""

        create.click(create_dataset, new_name, [dataset, new_name], api_name="create_dataset")
        new_name.submit(create_dataset, new_name, [dataset, new_name])
        app.load(lambda current: gr.update(choices=workspace.list_datasets(), value=current), dataset, dataset)

        with gr.Accordion("Workspace settings", open=False):
            gr.Markdown(f"Workspace: `{workspace.root}`. Point `models/` at a ComfyUI install to share its "
                        "checkpoints and LoRAs instead of copying them; leave empty for the workspace's own.")
            with gr.Row(equal_height=True):
                models_dir = gr.Textbox(label="ComfyUI models folder", value=str(workspace.settings.get(
                    "models_dir", "")), placeholder="/path/to/ComfyUI/models", scale=4)
                save_models = gr.Button("Save", scale=1)
            models_note = gr.Markdown()

        @user_errors
        def set_models_dir(folder: str) -> str:
            workspace.use_models_dir(folder.strip() or None)
            return f"Checkpoints: `{workspace.checkpoints_dir}`; LoRAs: `{workspace.loras_dir}`."

        save_models.click(set_models_dir, models_dir, models_note)

        gr.Timer(2.0).tick(cache.describe, None, cache_status, show_progress="hidden")
        app.load(cache.describe, None, cache_status)

        with gr.Tabs():
            for tab in (dataset_tab, caption_tab, train_tab, test_tab):
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower()):
                    tab.build(ctx)
    return app
