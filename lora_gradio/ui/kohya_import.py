"""The Train tab's "Import a kohya config": a kohya_ss GUI .json or sd-scripts .toml fills the form, and the keys
with no counterpart here are listed under it with their values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from .common import PRIVATE, AppContext, uploaded, user_errors

if TYPE_CHECKING:
    from .train_form import SettingsForm


def wire_kohya_import(ctx: AppContext, upload: gr.UploadButton, presets: gr.Dropdown, note: gr.Markdown,
                      form: SettingsForm) -> None:
    """Uploaded files fill the form over the chosen preset's settings, keeping a trigger word typed already when
    the files give none; the repeats follow a dataset config's; ``note`` lists what was and was not used."""

    @user_errors
    def on_import(values: dict) -> dict:
        config, found = ctx.studio.import_kohya_config(uploaded(values[upload]), values[presets])
        typed = "" if "trigger_word" in found.settings else values[form.fields["trigger_word"]]
        shown = form.show(config, typed)
        if found.repeats is not None:
            shown[form.repeats] = found.repeats
        gr.Info(f"Imported {len(found.settings)} settings from the {found.kind}; "
                f"{len(found.not_used)} keys are not used here (listed under the preset).")
        return {**shown, note: found.summary()}

    outputs = [*form.widgets, form.sample_preview, form.repeats, note]
    upload.upload(on_import, {upload, presets, form.fields["trigger_word"]}, outputs, **PRIVATE)
