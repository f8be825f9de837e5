"""Every tab at a small laptop's size and a common desktop size: what matters is on screen without scrolling, and a
screenshot of each goes to test-artifacts/screenshots for people to look at."""

import pytest
from browser import browser_pages, screenshot, wait_for
from test_ui_journey import choose

from lora_gradio.demo.shapes import make_demo_dataset

# tab -> the widgets a person needs first on it, which must be inside the window when the tab opens
FIRST_THINGS = {"Dataset": ["#upload", "#dataset-limits"], "Caption": ["#caption-model", "#caption-run"],
                "Train": ["#train-start", "#train-progress", "#train-check"],
                "Test": ["#test-prompt", "#test-generate", "#strength-model", "#strength-clip"]}


@pytest.mark.parametrize("size", [(1024, 768), (1440, 900)])
def test_each_tab_shows_its_main_controls_without_scrolling(app, size):
    url, workspace = app
    if not (workspace / "datasets" / "looks").is_dir():
        make_demo_dataset(workspace / "datasets" / "looks" / "images", count=8)
    with browser_pages(size=size) as (page,):
        page.goto(url)
        choose(page, "#dataset-picker", "looks")
        wait_for(lambda: "8 images" in page.locator("#quality-report").inner_text(), 30, "the dataset's report")
        header = page.locator("#cache-status").bounding_box()
        assert header["y"] + header["height"] < 120  # a compact header: one line beside the title
        gallery = page.locator("#gallery")
        wait_for(lambda: gallery.locator("img").count() == 8, 30, "the thumbnails")
        edge = gallery.bounding_box()
        thumbnails = gallery.locator(".thumbnail-item").all()
        assert len(thumbnails) == 8
        for thumbnail in thumbnails:  # every column whole, inside the gallery
            box = thumbnail.bounding_box()
            assert box and edge["x"] <= box["x"] and box["x"] + box["width"] <= edge["x"] + edge["width"], box
        assert not gallery.locator("[data-testid='block-label']").is_visible()  # no badge over the first row
        for tab, widgets in FIRST_THINGS.items():
            page.get_by_role("tab", name=tab).click()
            for widget in widgets:
                page.locator(widget).first.wait_for(state="visible")
                box = page.locator(widget).first.bounding_box()
                assert box["y"] >= 0 and box["y"] + box["height"] <= size[1], (tab, widget, box)
                assert box["x"] >= 0 and box["x"] + box["width"] <= size[0], (tab, widget, box)
            screenshot(page, f"{tab.lower()}-tab-{size[0]}x{size[1]}")
        assert "Error" not in page.locator("body").inner_text().split()
