"""The Test tab's Tools in a real browser at a small laptop's size: a person resizes a demo LoRA, typing key by key,
reads the report, and tries the new file in the Test tab straight away."""

import json
import re

from browser import browser_page, screenshot, wait_for
from safetensors import safe_open
from test_network_types import trained_file
from test_ui_journey import choose, newest_test_images, set_number

from lora_gradio.lora_tools import TOOL_KEY


def test_resize_a_demo_lora_then_test_it(app, demo_pipe):
    url, workspace = app
    trained_file(demo_pipe, "lora", workspace / "models" / "loras" / "anna.safetensors")
    with browser_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Test").click()
        page.locator("#lora-tools").get_by_text("Tools: resize, merge, bake, extract").click()
        choose(page, "#resize-lora", "loras/anna.safetensors")
        rank = page.locator("#resize-rank input")
        rank.fill("")
        rank.press_sequentially("2", delay=30)
        page.locator("#resize-name textarea, #resize-name input").first.press_sequentially("anna-small", delay=30)
        page.locator("#resize-go").click()
        report = page.locator("#tool-report textarea")
        wait_for(lambda: "Wrote anna-small.safetensors" in report.input_value(), 60, "the resize report")
        text = report.input_value()
        assert re.search(r"modules at rank 2; error mean \d+\.\d+%, worst \d+\.\d+%", text), text
        assert "rank 4 → 2" in text and "Picked loras/anna-small.safetensors" in text
        progress = page.locator("#tool-progress-text").inner_text()
        assert re.fullmatch(r"done: (\d+)/\1", progress), progress  # every module, and nothing else on the line
        screenshot(page, "tools-resize-1024x768")
        written = workspace / "models" / "loras" / "anna-small.safetensors"
        with safe_open(str(written), "pt") as handle:
            assert json.loads(handle.metadata()[TOOL_KEY])["rule"]["rank"] == 2
        # the Test tab now holds the new file: try it
        assert page.locator("#test-lora").get_by_role("combobox").input_value() == "loras/anna-small.safetensors"
        page.locator("#test-prompt").get_by_role("textbox").press_sequentially("lgdemo, a red circle", delay=20)
        set_number(page, "#test-steps", 4)
        page.locator("#test-generate").click()
        wait_for(lambda: newest_test_images(workspace, 1), 60, "the image made with the resized LoRA")
        wait_for(lambda: "All" in page.locator("#test-lora-report").inner_text(), 30, "the LoRA line")
        assert re.fullmatch(r"All \d+ LoRA modules applied \(\d+ UNet, \d+ text encoder\)\.",
                            page.locator("#test-lora-report").inner_text().strip())
        assert "anna-small" in page.locator("#test-gallery").inner_text()  # the image's parameters name the file
        page.locator("#resize-go").click()  # the same name again: refused, the file kept
        wait_for(lambda: "already exists" in page.locator("body").inner_text(), 30, "the refusal")
        assert written.stat().st_size > 0
