"""The base-model chooser shared by the Train and Test tabs: the demo, models/checkpoints, or a hub id."""

from __future__ import annotations

import gradio as gr

from ..studio import DEMO
from .common import AppContext


def base_picker(ctx: AppContext) -> tuple[gr.Dropdown, gr.Textbox]:
    """A dropdown of local models (refreshed on focus) and a box for a Hugging Face repo id."""
    choice = gr.Dropdown([DEMO, *ctx.workspace.list_checkpoints()], value=DEMO, scale=2,
                         label="Base model (models/checkpoints, or the demo)", allow_custom_value=True)
    repo = gr.Textbox(label="…or a Hugging Face repo id", placeholder="stable-diffusion-v1-5/stable-diffusion-v1-5",
                      scale=2)
    choice.focus(lambda current: gr.update(choices=[DEMO, *ctx.workspace.list_checkpoints()], value=current),
                 choice, choice, api_visibility="private")
    return choice, repo


def base_name(choice: str | None, repo: str | None) -> str:
    """The repo id when one is typed, else the chosen local model (resolved by :meth:`Studio.base`)."""
    return (repo or "").strip() or choice or DEMO
