"""The Train tab as a person meets it: refused settings, a reload mid-run, Stop, Resume, the chart, the log,
the list of runs, and the Test tab opening on what was just trained."""

import re
from pathlib import Path

from bad_files import photo_bytes
from browser import browser_page, screenshot, wait_for
from gradio_client import Client
from test_ui_dataset_caption import type_into
from test_ui_journey import choose, set_number

from lora_gradio.demo.shapes import make_demo_dataset

GALLERY = Path(__file__).parent / "kohya_configs"
LAST_LINE_IN_VIEW = """box => {
    const range = document.createRange();
    range.selectNodeContents(box.querySelector('pre'));
    const lines = range.getClientRects(), last = lines[lines.length - 1], frame = box.getBoundingClientRect();
    return last.top >= frame.top - 1 && last.bottom <= frame.bottom + 1;
}"""


def progress(page):
    return page.locator("#training-progress-text").inner_text()


def plotted(page):
    """The loss points drawn in the chart, read from the page: (step, loss) of each circle."""
    return [(int(step), float(loss)) for step, loss in page.locator("#loss-chart circle.loss-point").evaluate_all(
        "points => points.map(p => [p.dataset.step, p.dataset.loss])")]


def saved_files(page):
    """The names in the download list, which shows each name's suffix on a line of its own."""
    return page.locator("#saved-files").inner_text().replace("\n", "")


def no_error_pill(page):
    """Gradio's red 'Error' badge over a widget, which hides it until someone finds its ×."""
    pills = page.get_by_text("Error", exact=True)
    return all(not pills.nth(i).is_visible() for i in range(pills.count()))


def open_train(page, url, dataset):
    page.goto(url)
    choose(page, "#dataset-picker", dataset)
    page.get_by_role("tab", name="Train").click()


def test_stop_reload_resume_and_test_what_was_trained(app, tmp_path):
    url, workspace = app
    make_demo_dataset(workspace / "datasets" / "flow" / "images", count=8)
    photo = tmp_path / "photo.png"
    photo.write_bytes(photo_bytes(1))
    api = Client(url, verbose=False)
    with browser_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Dataset").click()
        page.locator("#upload input[type=file]").set_input_files([str(photo)])  # no dataset chosen yet
        wait_for(lambda: "Choose or create a dataset" in page.locator(".toast-body").first.inner_text(), 30,
                 "the refusal")
        wait_for(lambda: page.locator("#upload input[type=file]").count() == 1, 30, "the drop zone, empty again")
        assert page.locator("#upload").get_by_text("Drop File Here").is_visible() and no_error_pill(page)
        choose(page, "#dataset-picker", "flow")
        page.get_by_role("tab", name="Train").click()
        assert progress(page) == "Nothing running yet."
        assert page.locator("#train-stop").is_disabled() and page.locator("#train-start").is_enabled()
        for widget in ("#train-start", "#train-progress"):  # the controls that matter, without scrolling
            box = page.locator(widget).bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= 768, widget
        assert page.locator("#preset").get_by_role("combobox").input_value() == "demo"  # it follows the demo base

        rank = page.locator("#field-rank input")
        type_into(rank, "0")
        page.locator("#train-start").click()
        wait_for(lambda: "rank = 0" in page.locator("#field-rank").inner_text(), 30, "the mark beside the field")
        assert "invalid-field" in page.locator("#field-rank").get_attribute("class")
        assert "Invalid settings: rank = 0" in page.locator(".toast-body").first.inner_text()
        page.wait_for_timeout(1500)  # a second toast for the same click would have come by now
        assert page.locator(".toast-body", has_text="Invalid settings").count() <= 1  # one, or gone by now
        assert no_error_pill(page) and progress(page) == "Nothing running yet."
        type_into(rank, "4")
        type_into(page.locator("#field-trigger_word").get_by_role("textbox"), "flowword")
        set_number(page, "#field-epochs", 15)
        set_number(page, "#field-batch_size", 2)
        page.get_by_text("Advanced settings").click()
        set_number(page, "#field-save_every_n_epochs", 5)  # the preset saves every 20 of its 100 epochs
        page.locator("#train-start").click()
        wait_for(lambda: "rank = 0" not in page.locator("#field-rank").inner_text(), 30, "the mark to go")
        wait_for(lambda: re.search(r"running: step [1-9]\d*/60", progress(page)), 90, "training to run")
        assert page.locator("#train-stop").is_enabled()
        assert page.locator("#train-start").inner_text() == "Add to the queue"  # a second Start waits its turn

        page.reload()  # the form, the dataset and the running job's settings come back, on the Train tab
        wait_for(lambda: page.locator("#train-start").is_visible(), 30, "the Train tab, opened by itself")
        assert page.get_by_role("tab", name="Train").get_attribute("aria-selected") == "true"
        wait_for(lambda: "Training now: run flow-" in page.locator("#train-job").inner_text(), 30, "the job line")
        assert "dataset flow" in page.locator("#train-job").inner_text()
        assert page.locator("#dataset-picker").get_by_role("combobox").input_value() == "flow"
        assert page.locator("#field-epochs input").input_value() == "15"
        assert page.locator("#field-trigger_word").get_by_role("textbox").input_value() == "flowword"
        wait_for(lambda: re.search(r"running: step ([5-9]|\d\d)/60", progress(page)), 90, "a few steps")
        page.locator("#train-stop").click()
        wait_for(lambda: progress(page).startswith("stopped"), 60, "the stop")
        wait_for(lambda: "Training now" not in page.locator("#train-job").inner_text(), 30, "the job line to go")
        state = api.predict(api_name="/job_status")
        assert plotted(page) == [(step, loss) for step, loss, _ in state["losses"]]  # every point, as recorded
        sizes = page.locator("#loss-chart text").evaluate_all(
            "labels => labels.map(t => parseFloat(getComputedStyle(t).fontSize) * Math.hypot(t.getScreenCTM().a, "
            "t.getScreenCTM().b))")  # the scale of each label as drawn, the turned axis title too
        assert sizes and min(sizes) >= 11  # the chart's words as large on screen as the page's small text
        saved = saved_files(page)
        assert f"flow-step{state['step']:08d}.safetensors" in saved and "flow.safetensors" not in saved
        log = page.locator("#train-log-box")
        assert log.inner_text().strip().endswith(state["log"][-1]) and log.evaluate(LAST_LINE_IN_VIEW)
        run = state["run_dir"].rsplit("/", 1)[-1]

        page.reload()  # the stopped run waits under Interrupted runs, and the form is as it was
        page.get_by_role("tab", name="Train").click()
        wait_for(lambda: page.locator("#field-epochs input").input_value() == "15", 30, "the form as it was")
        assert page.locator("#train-job [data-testid='markdown']").inner_text().strip() == ""  # nothing runs now
        wait_for(lambda: page.locator("#train-runs").is_visible(), 30, "the runs, opened for the interrupted one")
        choose(page, "#train-runs", run)
        before = len(plotted(page))
        page.locator("#train-resume").click()
        wait_for(lambda: re.search(r"running: step \d+/60", progress(page)), 60, "the resumed run")
        wait_for(lambda: len(plotted(page)) > before, 60, "new points after the old ones")
        assert plotted(page)[0][0] == 1  # the curve from before the stop is still there
        wait_for(lambda: "flow-000005.safetensors" in saved_files(page), 120, "the epoch-5 file")  # every 5 epochs
        assert "epoch 0 · prompt 1" in page.locator("#train-samples").inner_text()  # numbered, the prompts above
        assert page.locator("#sample-legend li").all_inner_texts() == [  # the demo preset's, with the trigger word
            "flowword, a blue flowword on a yellow background", "flowword, a white flowword on a red background"]
        wait_for(lambda: progress(page).startswith("done: step 60/60"), 300, "the run to finish")
        wait_for(lambda: len(plotted(page)) == 60, 30, "the whole curve")
        assert page.locator("#loss-chart .epoch-mark").count() == 15 and page.locator("#lr-line").count() == 1
        wait_for(lambda: "all epochs × prompts" in page.locator("#train-samples").inner_text(), 30, "the grid")
        wait_for(lambda: "sample-grid.png" in saved_files(page), 30, "the grid file")
        assert log.evaluate(LAST_LINE_IN_VIEW) and "Finished after 60 steps" in log.inner_text()
        wait_for(lambda: re.search(rf"{run}\s+finished\s+\S+ \S+\s+60/60\s+\d\.\d{{4}}",
                                   page.locator("#runs-table").inner_text()), 30, "the run in the list")
        interrupted = page.locator("#train-runs").get_by_role("combobox")
        wait_for(lambda: interrupted.input_value() == "", 30, "the finished run to leave Interrupted runs")
        interrupted.click()
        assert not page.get_by_role("option", name=run, exact=True).count()  # not offered for Resume either
        interrupted.press("Escape")
        screenshot(page, "train-finished")

        page.get_by_role("tab", name="Test").click()  # ready on what was just trained
        wait_for(lambda: page.locator("#test-lora").get_by_role("combobox").input_value()
                 == f"{run}/flow.safetensors", 30, "the new LoRA in the Test tab")
        offered = page.locator("#test-prompt").get_by_role("textbox").input_value()
        assert offered == "flowword, a blue flowword on a yellow background"  # the run's first sample prompt

        page.get_by_role("tab", name="Train").click()
        if not page.locator("#runs-delete-choice").is_visible():
            page.get_by_text("Runs: resume, delete").click()
        choose(page, "#runs-delete-choice", run)
        page.locator("#runs-delete").click()
        wait_for(lambda: page.locator("#runs-confirm").is_visible(), 30, "the question")
        page.locator("#runs-delete-no").click()
        wait_for(lambda: not page.locator("#runs-confirm").is_visible(), 30, "the question to go")
        assert (workspace / "outputs" / run).is_dir()
        choose(page, "#runs-delete-choice", run)
        page.locator("#runs-delete").click()
        page.locator("#runs-delete-yes").click()
        wait_for(lambda: f"Deleted run {run}" in page.locator("#runs-note").inner_text(), 30, "the deletion")
        assert not (workspace / "outputs" / run).exists() and run not in page.locator("#runs-table").inner_text()
        assert no_error_pill(page)

        page.get_by_role("tab", name="Caption").click()  # the dataset's trigger word, kept with it
        assert page.locator("#trigger-word").get_by_role("textbox").input_value() == "flowword"


def test_picking_a_lora_trained_with_clip_skip_2_sets_the_test_tab_to_it(app, demo_pipe):
    """The Test tab reads ss_clip_skip from the file a person picks, and the image's parameters say it."""
    import torch
    from safetensors.torch import save_file

    url, workspace = app
    loras = workspace / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    width = demo_pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").in_features
    tensors = {f"{name}.lora_down.weight": torch.randn(4, width) * 0.1,
               f"{name}.lora_up.weight": torch.randn(width, 4) * 0.1, f"{name}.alpha": torch.tensor(4.0)}
    save_file(tensors, loras / "anime.safetensors", {"ss_clip_skip": "2"})
    save_file(tensors, loras / "photo.safetensors", {"ss_clip_skip": "None"})
    radio = "#test-clip-skip input:checked"
    with browser_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Test").click()
        for label, expected in (("loras/anime.safetensors", "2"), ("loras/photo.safetensors", "1"),
                                ("loras/anime.safetensors", "2")):
            choose(page, "#test-lora", label)
            wait_for(lambda expected=expected: page.locator(radio).input_value() == expected, 20,
                     f"CLIP skip {expected} for {label}")
        type_into(page.locator("#test-prompt textarea"), "lgdemo, a red circle")
        set_number(page, "#test-steps", 2)
        page.locator("#test-generate").click()
        wait_for(lambda: "Clip skip: 2" in page.locator("#test-gallery").inner_text(), 60, "the image's parameters")


def test_start_on_an_empty_dataset_says_what_to_do_and_names_the_last_run(app):
    url, workspace = app
    client = Client(url, verbose=False)
    client.predict("done-before", api_name="/create_dataset")
    make_demo_dataset(workspace / "datasets" / "done-before" / "images", count=8)
    settings = {**client.predict("demo", api_name="/preset"), "epochs": 1, "batch_size": 2, "sample_prompts": []}
    run = client.predict(dataset="done-before", settings=settings, api_name="/train_start")["run"]
    wait_for(lambda: client.predict("", 0, api_name="/job_status")["status"] == "done", 120, "the earlier run")
    with browser_page() as page:
        page.goto(url)
        new_name = page.locator("#new-dataset").get_by_role("textbox")
        new_name.press_sequentially("empty", delay=30)
        page.locator("#create-dataset").click()
        wait_for(lambda: page.locator("#dataset-picker").get_by_role("combobox").input_value() == "empty", 60,
                 "the new dataset")
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-start").click()
        toast = page.locator(".toast-body")
        wait_for(lambda: toast.count() and "Dataset 'empty' has no images yet: add photos in the Dataset tab"
                 in toast.first.inner_text(), 30, "the refusal")
        assert "--data" not in toast.first.inner_text() and str(workspace) not in toast.first.inner_text()
        assert progress(page).startswith(f"done: step 4/4 · epoch 1/1 · run {run} · ")  # the earlier run, named
    assert not (workspace / "datasets" / "empty" / "images").exists()
    assert sorted(p.name for p in (workspace / "outputs").iterdir() if p.name.startswith("done-before-"))[-1] == run


def test_a_kohya_config_fills_the_form_and_names_what_is_not_used(app):
    """Someone arriving from kohya_ss uploads their saved config: the form shows its settings, the preset's under
    them, and every key the app does not use is listed with its value."""
    url, _ = app
    with browser_page() as page:
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        with page.expect_file_chooser() as chooser:
            page.locator("#kohya-import").click()
        chooser.value.set_files(str(GALLERY / "gui-locon.json"))
        note = page.locator("#kohya-note")
        wait_for(lambda: "Not used here" in note.inner_text(), 60, "the import's list")
        for field, shown in (("rank", "32"), ("alpha", "16"), ("epochs", "12"), ("batch_size", "2"),
                             ("output_name", "ohwx-woman")):
            box = page.locator(f"#field-{field} input, #field-{field} textarea").first
            assert box.input_value() == shown, (field, box.input_value())
            assert box.is_visible()
        assert page.locator("#field-train_text_encoder input").is_checked()
        text = note.inner_text()
        assert "multires_noise_iterations = 6" in text and "lr_warmup = 10" in text and "noise_offset = 0.05" in text
        assert "data = /data/ohwx/img" in text  # the folder it names, to pick here instead
        assert "From a kohya_ss GUI config: 40 settings" in text
        preview = page.locator("#sample-preview")
        assert preview.inner_text().startswith("Samples will use: ohwx woman, portrait photo (512×768, seed 7, "
                                               "negative 'blurry') · ohwx woman at the beach")
        prompts = page.locator("#field-sample_prompts textarea")
        prompts.click()
        prompts.press("Control+End")
        prompts.press_sequentially("\nohwx woman, night --s 30 --ss ddim --q 2", delay=10)
        wait_for(lambda: "⚠️ line 3: unknown flag --q" in preview.inner_text(), 30, "the unknown flag named")
        for _ in range(5):  # take the wrong flag back, key by key
            prompts.press("Backspace")
        wait_for(lambda: preview.inner_text().endswith("ohwx woman, night (30 steps, DDIM)"), 30, "the fixed line")
        screenshot(page, "kohya-import")
