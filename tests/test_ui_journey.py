"""The whole user journey in a real browser with the demo model: dataset, captions, training, testing, a grid."""

import json
import re
from pathlib import Path

import numpy as np
from bad_files import photo_bytes
from browser import browser_page, screenshot, shown_text, wait_for
from PIL import Image
from test_ui_dataset_caption import import_into_new_dataset
from tiny_blip import save_tiny_blip

from lora_gradio.comfyui import api_from_ui


def choose(page, container, option):
    """Pick an option of a Gradio dropdown, as a person does: open it, click the entry."""
    page.locator(container).get_by_role("combobox").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, container, value):
    """Type into the number box of a Gradio slider or number field and confirm it."""
    box = page.locator(f"{container} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def progress_text(page):
    return page.locator("#training-progress-text").inner_text()


def newest_test_images(workspace, count):
    folder = workspace / "outputs" / "test-images"
    singles = [p for p in folder.rglob("*.png") if not p.name.startswith("grid-")] if folder.is_dir() else []
    return sorted(singles, key=lambda p: p.stat().st_mtime)[-count:]


def test_dataset_caption_train_test_grid(app, tmp_path):
    url, workspace = app
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(8):
        (photos / f"shot{index}.png").write_bytes(photo_bytes(index, (160, 192)))
    blip = save_tiny_blip(workspace / "models" / "blip")  # a local model folder must be inside the workspace

    with browser_page() as page:
        import_into_new_dataset(page, url, "journey", photos, "shot7.png")
        page.get_by_role("tab", name="Caption").click()
        choose(page, "#caption-model", "Local folder…")
        page.locator("#blip-folder").get_by_role("textbox").fill(str(blip))
        page.locator("#trigger-word").get_by_role("textbox").fill("lgdemo")
        page.locator("#caption-run").click()
        wait_for(lambda: "Captioned 8 images" in shown_text(page, "#caption-status"), 60, "captions")
        assert str(workspace) not in page.locator("#cache-status").inner_text()  # "BLIP captioner models/blip"

        page.get_by_role("tab", name="Train").click()
        choose(page, "#preset", "demo")
        wait_for(lambda: page.locator("#field-rank input").input_value() == "8", what="the demo preset")
        wait_for(lambda: not page.locator("#field-epochs .wrap:not(.hide)").count(), what="the preset to load")
        set_number(page, "#field-epochs", 6)
        set_number(page, "#field-batch_size", 2)
        page.get_by_text("Advanced settings").click()
        set_number(page, "#field-save_every_n_epochs", 5)  # the preset saves every 20 of its 100 epochs
        set_number(page, "#field-ema_decay", 0)  # the trained files alone (the demo's tests read the averaged ones)
        page.locator("#field-trigger_word").get_by_role("textbox").fill("lgdemo")
        repeats = page.locator("#train-repeats input[type=number]")
        for typed, expected in (("2", "48 steps (8 an epoch of 16 images)"),
                                ("1", "24 steps (4 an epoch of 8 images)")):
            repeats.click()
            repeats.press("Control+a")
            repeats.press_sequentially(typed, delay=50)  # the estimate follows what is typed
            wait_for(lambda expected=expected: expected in page.locator("#train-estimate").inner_text(), 30,
                     f"the estimate for {typed} repeats")
        assert "first guess" in page.locator("#train-estimate").inner_text()  # nothing measured here yet
        page.locator("#train-start").click()
        wait_for(lambda: re.search(r"\*?\*?24 steps", page.locator("#train-estimate").inner_text()), 30, "estimate")
        wait_for(lambda: re.search(r"running: step \d+/24", progress_text(page)), 120, "training to run")

        page.reload()  # the job lives in the backend: a new page shows it live
        page.get_by_role("tab", name="Train").click()
        wait_for(lambda: re.search(r"(running|done): step \d+/24", progress_text(page)), 30, "the live job")
        wait_for(lambda: progress_text(page).startswith("done: step 24/24"), 180, "training to finish")
        wait_for(lambda: "the estimate was about" in page.locator("#train-log").inner_text(), 30, "the comparison")
        wait_for(lambda: page.locator("#train-samples img").count() >= 6, 30, "sample images")  # epochs 0, 5, 6
        wait_for(lambda: page.locator("#loss-chart circle.loss-point").count() == 24, 30, "the loss curve")
        listed = page.locator("#saved-files").inner_text().replace("\n", "")
        assert listed.index("journey.safetensors") < listed.index("journey-000005.safetensors")  # the LoRA first
        screenshot(page, "train-tab")

        run = next(p for p in (workspace / "outputs").iterdir() if p.name.startswith("journey-"))  # the dataset's
        final = page.locator("#final-lora")
        assert final.inner_text().strip() == "⬇ Download journey.safetensors"
        with page.expect_download() as download:  # the LoRA leaves the server through the page, in one click
            final.click()
        assert Path(download.value.path()).read_bytes() == (run / "journey.safetensors").read_bytes()
        wait_for(lambda: shown_text(page, "#recommendation").startswith("Recommended: epoch"), 30, "the final card")
        advice = json.loads((run / "recommendation.json").read_text(encoding="utf-8"))
        card = shown_text(page, "#recommendation")
        assert f"epoch {advice['epoch']} ({advice['file']}) at strength {advice['strength']:g}, because" in card
        assert "journey-000005.safetensors" in card and "Samples judged by the demo's image analysis" in card
        page.locator("#recommendation-open").click()  # the Test tab, on the recommended file at its strength
        wait_for(lambda: page.locator("#test-lora").get_by_role("combobox").input_value()
                 == f"{run.name}/{advice['file']}", 30, "the Test tab on the recommended file")
        assert page.locator("#tab-test").is_visible() and not page.locator("#tab-train").is_visible()
        for slider in ("#strength-model", "#strength-clip"):
            assert float(page.locator(f"{slider} input[type=number]").input_value()) == advice["strength"]
        assert page.locator("#test-prompt").get_by_role("textbox").input_value().startswith("lgdemo, ")
        choose(page, "#test-lora", "(no LoRA: the base model)")
        page.locator("#test-prompt").get_by_role("textbox").fill("lgdemo, portrait")
        set_number(page, "#test-steps", 4)
        page.locator("#test-generate").click()  # the base model, no LoRA
        wait_for(lambda: len(newest_test_images(workspace, 3)) == 1, 60, "the base image")
        choose(page, "#test-lora", f"{run.name}/journey.safetensors")
        set_number(page, "#strength-model", 0)
        set_number(page, "#strength-clip", 0)
        page.locator("#test-generate").click()
        wait_for(lambda: len(newest_test_images(workspace, 3)) == 2, 60, "the strength-0 image")
        set_number(page, "#strength-model", 1)
        set_number(page, "#strength-clip", 1)
        page.locator("#test-generate").click()
        wait_for(lambda: len(newest_test_images(workspace, 3)) == 3, 60, "the strength-1 image")
        wait_for(lambda: "strength_model: 1.0, strength_clip: 1.0" in page.locator("#test-gallery").inner_text(),
                 30, "the parameters under the image")
        assert re.fullmatch(r"All \d+ LoRA modules applied \(\d+ UNet, \d+ text encoder\)\.",
                            page.locator("#test-lora-report").inner_text().strip())
        newest = page.locator("#test-gallery img").first  # the result in view at 1024×768, without scrolling
        assert newest.evaluate("e => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.bottom <= "
                               "innerHeight && r.height > 20 }")
        with page.expect_download(timeout=30_000) as download:  # one click saves it
            page.locator("#test-workflow").click()
        assert download.value.suggested_filename == "journey.workflow.json"  # named after the LoRA it loads
        workflow = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
        prompt = api_from_ui(workflow)
        assert prompt["2"]["inputs"]["lora_name"] == "journey.safetensors"
        latent = next(node["inputs"] for node in prompt.values() if node["class_type"] == "EmptyLatentImage")
        assert (latent["width"], latent["height"]) == (64, 64)  # the size the Test tab rendered on the demo
        assert prompt["3"]["inputs"]["text"] == "lgdemo, portrait" and prompt["6"]["inputs"]["steps"] == 4

        for epoch_file in ("journey-000005.safetensors", "journey.safetensors"):
            choose(page, "#grid-loras", f"{run.name}/{epoch_file}")
        page.locator("#grid-strengths").get_by_role("textbox").fill("0, 1")
        page.locator("#grid-run").click()
        wait_for(lambda: list((workspace / "outputs" / "test-images").rglob("grid-*.png")), 120, "the grid")
        screenshot(page, "test-tab")

        page.reload()  # the Test tab comes back as it was left: its images and the grid's rows
        page.get_by_role("tab", name="Test").click()
        wait_for(lambda: page.locator("#test-gallery img").count() >= 3, 30, "the images made before the reload")
        assert "strength_model: 1.0, strength_clip: 1.0" in page.locator("#test-gallery").inner_text()
        rows = page.locator("#grid-loras").inner_text()
        assert all(f"{run.name}/{name}" in rows for name in ("journey-000005.safetensors", "journey.safetensors"))

        page.get_by_role("tab", name="Train").click()  # the neighbouring epochs × strengths, in one click
        page.locator("#recommendation-grid").click()
        wait_for(lambda: len(list((workspace / "outputs" / "test-images").rglob("grid-*.png"))) == 2, 120,
                 "the grid around the recommendation")
        assert page.locator("#grid-strengths").get_by_role("textbox").input_value() == "0, 0.6, 0.8, 1, 1.2"
        assert all(f"{run.name}/{name}" in page.locator("#grid-loras").inner_text()
                   for name in ("journey-000005.safetensors", "journey.safetensors"))

    base, zero, full = (np.asarray(Image.open(p), dtype=np.int16) for p in newest_test_images(workspace, 3))
    assert np.abs(zero - base).max() <= 2  # the same picture; the server's thread count may change the last digit
    assert np.abs(full - base).mean() > 1.0
    first_grid = min((workspace / "outputs" / "test-images").rglob("grid-*.png"), key=lambda p: p.stat().st_mtime)
    with Image.open(first_grid) as grid:
        assert grid.width > 2 * 64 and grid.height > 2 * 64
        assert grid.text["grid"].splitlines()[1:] == [  # the grid itself, row by row, not one image's settings
            f"Rows (LoRA file): epoch 5 · step 20, {run.name} = {run.name}/journey-000005.safetensors; epoch 6 · step "
            f"24, {run.name} = {run.name}/journey.safetensors", "Columns (strength_model = strength_clip): 0, 1"]
        assert "Lora:" not in grid.text["parameters"] and "lgdemo, portrait" in grid.text["parameters"]
