"""Jobs in the browser as two visitors meet them: a shared live view, a Stop only for the page that started."""

import re

from bad_files import photo_bytes
from browser import browser_pages, screenshot, shown_text, wait_for
from test_ui_dataset_caption import type_into
from test_ui_journey import choose, set_number

from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.training.run_folder import RunFolder


def progress(page, kind="training"):
    return page.locator(f"#{kind}-progress-text").inner_text()


def test_only_the_starting_page_can_stop_training_even_after_a_reload(app):
    url, workspace = app
    make_demo_dataset(workspace / "datasets" / "owners" / "images", count=8)
    with browser_pages(2) as (starter, visitor):
        for page in (starter, visitor):
            page.goto(url)
            choose(page, "#dataset-picker", "owners")
        starter.get_by_role("tab", name="Dataset").click()
        set_number(starter, "#prepare-resolution", 256)
        starter.locator("#prepare-run").click()
        wait_for(lambda: "Prepared 8 training copies" in shown_text(starter, "#prepare-result"), 60,
                 "Prepare, run as a job")
        assert re.match(r"done: 8/8", progress(starter, "prepare"))

        (workspace / "datasets" / "owners" / "images" / "late.png").write_bytes(photo_bytes(5, (96, 96)))
        starter.get_by_role("tab", name="Train").click()
        choose(starter, "#preset", "demo")
        wait_for(lambda: starter.locator("#field-rank input").input_value() == "8", what="the demo preset")
        starter.get_by_role("button", name="Estimate").click()
        wait_for(lambda: "1 image was added (late.png)" in starter.locator("#train-estimate").inner_text(), 30,
                 "the warning that the copies are stale")
        starter.locator("#train-prepare-again").click()  # offered right there
        wait_for(lambda: progress(starter, "prepare").startswith("done: 9/9"), 60, "Prepare, again")
        assert not starter.locator("#train-prepare-again").is_visible()
        set_number(starter, "#field-epochs", 500)
        trigger = starter.locator("#field-trigger_word").get_by_role("textbox")
        type_into(trigger, "sks")  # key by key, then changed: the prompts must follow every time
        type_into(trigger, "lgdemo")
        wait_for(lambda: "Samples will use: lgdemo, " in starter.locator("#sample-preview").inner_text(), 30,
                 "the sample prompts with the trigger word")
        starter.locator("#train-start").click()
        wait_for(lambda: re.search(r"running: step [1-9]\d*/1000", progress(starter)), 60, "training to run")
        run = next((workspace / "outputs").glob("owners-*"))
        config = RunFolder(run).read_job().config
        assert config.sample_prompts and all(p.startswith("{trigger}") for p in config.sample_prompts)  # kept
        assert all(p.startswith("lgdemo") and "sks" not in p for p in config.prompts())  # as rendered
        assert "Since Prepare" not in starter.locator("#train-estimate").inner_text()  # the copies are current

        visitor.get_by_role("tab", name="Train").click()
        wait_for(lambda: progress(visitor).startswith("running"), 30, "the visitor to see the same run")
        wait_for(lambda: "in use by training" in visitor.locator("#cache-status").inner_text(), 30, "the cache line")
        visitor.locator("#train-stop").click()
        toast = visitor.locator(".toast-body")
        wait_for(lambda: "Only the page or script that started a job" in toast.first.inner_text(), 30,
                 "the refusal, on screen")
        screenshot(visitor, "stop-refused")
        step = int(re.search(r"step (\d+)", progress(starter)).group(1))
        wait_for(lambda: int(re.search(r"step (\d+)", progress(starter)).group(1)) > step, 30, "training to go on")

        starter.reload()  # the page keeps the key to its own job
        starter.get_by_role("tab", name="Train").click()
        wait_for(lambda: progress(starter).startswith("running"), 30, "the live job after the reload")
        prompts_box = starter.locator("#field-sample_prompts textarea")  # the form shows the run's own settings
        wait_for(lambda: prompts_box.input_value().startswith("{trigger}"), 30, "the prompts with {trigger} kept")
        starter.locator("#train-stop").click()
        wait_for(lambda: progress(starter).startswith("stopped"), 60, "the owner's stop")
        wait_for(lambda: progress(visitor).startswith("stopped"), 30, "the visitor to see the stop")
        saved = starter.locator("#saved-files").inner_text().replace("\n", "")
        assert re.search(r"owners-step\d{8}\.safetensors", saved) and "owners.safetensors" not in saved

        for page in (visitor, starter):  # the stopped run is offered for Resume, live and after a reload
            if page is starter:
                page.reload()
                page.get_by_role("tab", name="Train").click()
            choose(page, "#train-runs", run.name)
            assert page.locator("#train-runs").get_by_role("combobox").input_value() == run.name
