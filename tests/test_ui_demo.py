"""A newcomer's first session with no photos of their own: Load demo dataset gives an ordinary dataset of captioned
rings, with its trigger word in the Train tab."""

from browser import browser_page, screenshot, wait_for
from PIL import Image

from lora_gradio.demo.shapes import CONCEPT, DEMO_TRIGGER
from lora_gradio.demo.vision import read_picture


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
        page.locator("#load-demo").click()  # a second one does not touch the first
        wait_for(lambda: picker.input_value() == "demo-rings-2", 30, "a second demo dataset")
    images = sorted((workspace / "datasets" / "demo-rings" / "images").glob("*.png"))
    assert len(images) == 20 and {read_picture(Image.open(p)).shape for p in images} == {CONCEPT}
    assert all(p.with_suffix(".txt").read_text().startswith(f"{DEMO_TRIGGER}, a ") for p in images)
