"""A newcomer's first session with no photos of their own: Load demo dataset gives an ordinary dataset of captioned
rings, with its trigger word in the Train tab; Start with the demo preset teaches the ring (the page, left while it
trains and opened again, shows the finished run), and the Test tab draws it at strength 1 and not at strength 0."""

import re

from browser import browser_page, screenshot, shown_text, wait_for
from PIL import Image
from test_ui_journey import newest_test_images, progress_text, set_number

from lora_gradio.demo.shapes import CONCEPT, DEMO_TRIGGER
from lora_gradio.demo.vision import read_picture
from lora_gradio.training.run_folder import RunFolder


def test_load_demo_dataset_gives_captioned_rings_and_their_trigger_word(app):
    url, workspace = app
    with browser_page() as page:
        page.goto(url)
        page.locator("#load-demo").click()
        picker = page.locator("#dataset-picker").get_by_role("combobox")
        wait_for(lambda: picker.input_value() == "demo-rings", 30, "the demo dataset, chosen")
        assert "The demo base has never seen a ring" in page.locator(".toast-body").first.inner_text()
        wait_for(lambda: page.locator("#gallery img").count() == 20, 30, "its 20 pictures")
        assert "20 images" in page.locator("#quality-report").inner_text()
        screenshot(page, "demo-dataset")
        page.get_by_role("tab", name="Train").click()
        trigger = page.locator("#field-trigger_word").get_by_role("textbox")
        wait_for(lambda: trigger.input_value() == DEMO_TRIGGER, 30, "the dataset's trigger word")
        wait_for(lambda: f"{DEMO_TRIGGER}, " in page.locator("#sample-preview").inner_text(), 30, "the samples")
        page.locator("#train-start").click()  # the demo preset, chosen for the demo base, as it comes
        wait_for(lambda: re.search(r"running: step \d+/300", progress_text(page)), 120, "training to run")
        page.goto("about:blank")  # they look elsewhere while it trains, and come back to the finished run
        run = RunFolder(next((workspace / "outputs").glob("demo-rings-*")))
        wait_for(run.recommended, 400, "the run to finish and recommend a file")
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        wait_for(lambda: progress_text(page).startswith("done: step 300/300"), 60, "the finished run, shown again")
        wait_for(lambda: shown_text(page, "#recommendation").startswith("Recommended: epoch"), 60, "the final card")
        assert page.locator("#train-samples img").count() >= 12  # epochs 0, 20, … 100, two prompts each
        page.locator("#recommendation-open").click()
        wait_for(lambda: page.locator("#tab-test").is_visible(), 30, "the Test tab")
        prompt = page.locator("#test-prompt").get_by_role("textbox")
        prompt.click()
        prompt.press("Control+a")
        prompt.press_sequentially(f"{DEMO_TRIGGER}, a blue {DEMO_TRIGGER} on a yellow background", delay=10)
        set_number(page, "#test-seed", 1)
        readings = []
        for count, strength in enumerate((1, 0), start=1):
            set_number(page, "#strength-model", strength)
            set_number(page, "#strength-clip", strength)
            page.locator("#test-generate").click()
            wait_for(lambda count=count: len(newest_test_images(workspace, 2)) == count, 60,
                     f"the image at strength {strength}")
            wait_for(lambda strength=strength: f"strength_model: {strength:.1f}, strength_clip: {strength:.1f}"
                     in page.locator("#test-gallery").inner_text(), 30, "the parameters under the image")
            readings.append(read_picture(Image.open(newest_test_images(workspace, 1)[0])))
        screenshot(page, "demo-test-tab")
        page.locator("#load-demo").click()  # a second one does not touch the first
        wait_for(lambda: picker.input_value() == "demo-rings-2", 30, "a second demo dataset")
    learnt, untouched = readings  # what a newcomer sees: the ring at strength 1, the base's own shape at 0
    assert (learnt.shape, learnt.colour, learnt.background) == (CONCEPT, "blue", "yellow"), learnt
    assert untouched.shape != CONCEPT and untouched.background == "yellow", untouched  # the shape in blue or purple
    images = sorted((workspace / "datasets" / "demo-rings" / "images").glob("*.png"))
    assert len(images) == 20 and {read_picture(Image.open(p)).shape for p in images} == {CONCEPT}
    assert all(p.with_suffix(".txt").read_text().startswith(f"{DEMO_TRIGGER}, a ") for p in images)
