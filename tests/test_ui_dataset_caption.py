"""The Dataset and Caption tabs in a real browser against the real app."""

import io
import json
import re

from bad_files import photo_bytes, png_bomb, truncated_jpeg, zip_bomb, zip_slip
from browser import browser_page, screenshot, shown_text, wait_for
from PIL import Image, ImageStat
from tiny_blip import save_tiny_blip
from tiny_captioners import FLORENCE_WORDS, save_tiny_florence, save_tiny_wd_tagger

from lora_gradio.dataset import read_caption, to_rgb


def create_dataset(page, url, name):
    page.goto(url)
    page.locator("#new-dataset").get_by_role("textbox").fill(name)
    page.locator("#create-dataset").click()
    wait_for(lambda: page.locator("#dataset-picker").get_by_role("combobox").input_value() == name, 60,
             "the new dataset to be selected")


def import_into_new_dataset(page, url, name, folder, last_name):
    """Create a dataset, drop every file of ``folder`` on the upload box, and return the import results table."""
    create_dataset(page, url, name)
    page.locator("#upload input[type=file]").set_input_files([str(f) for f in sorted(folder.iterdir())])
    wait_for(lambda: last_name in results_text(page), what="import results")
    return results_text(page)


def type_into(box, text):
    """Replace a textbox's content by typing, as a person does (key events, not a scripted value)."""
    box.click()
    box.press("ControlOrMeta+a")
    box.press_sequentially(text)


def photos_in(folder, stem, count, seed):
    """A folder of ``count`` distinct test photos named ``stem0.png``, ``stem1.png``, …"""
    folder.mkdir()
    for index in range(count):
        (folder / f"{stem}{index}.png").write_bytes(photo_bytes(seed + index))
    return folder


def results_text(page):
    return page.locator("#import-results").inner_text()


def test_upload_report_caption_and_edit(app, tmp_path):
    app_url, workspace = app
    sources = tmp_path / "photos"
    sources.mkdir()
    for index in range(10):
        (sources / f"photo{index:02d}.png").write_bytes(photo_bytes(index))
    Image.new("RGB", (200, 260), "orange").save(sources / "tiny.png")
    truncated_jpeg(sources / "corrupt.jpg")
    blip = save_tiny_blip(workspace / "models" / "blip")  # a local model folder must be inside the workspace
    originals = {p.name: p.read_bytes() for p in sources.iterdir()}

    with browser_page() as page:
        table = import_into_new_dataset(page, app_url, "journey", sources, "corrupt.jpg")
        assert re.search(r"skipped\s+corrupt\.jpg\s+corrupt or truncated", table)
        assert re.search(r"warning\s+tiny\.png\s+small \(200×260\)", table)
        report = page.locator("#quality-report")
        wait_for(lambda: "11 images" in report.inner_text(), what="the quality report")
        assert "1 image under 512 px on the short side: tiny.png" in report.inner_text()
        screenshot(page, "dataset-tab")

        page.get_by_role("tab", name="Caption").click()
        page.get_by_label("Captioning model").click()
        page.get_by_role("option", name="Local folder…").click()
        page.locator("#blip-folder").get_by_role("textbox").fill(str(blip))
        page.locator("#trigger-word").get_by_role("textbox").fill("ohwx")
        page.locator("#caption-run").click()
        wait_for(lambda: "Captioned 11 images" in shown_text(page, "#caption-status"), timeout=60,
                 what="captioning to finish")
        edited = page.get_by_label("photo03.png")
        wait_for(lambda: edited.input_value().startswith("ohwx, "), what="captions in the editor")
        type_into(edited, "ohwx, a portrait edited in the page")
        folder = workspace / "datasets" / "journey" / "images"
        wait_for(lambda: read_caption(folder / "photo03.png") == "ohwx, a portrait edited in the page",
                 what="the edited caption on disk")
        screenshot(page, "caption-tab")

        type_into(page.locator("#trigger-word").get_by_role("textbox"), "lgnew")  # a new word, then on to Train
        page.get_by_role("tab", name="Train").click()
        train_word = page.locator("#field-trigger_word").get_by_role("textbox")
        wait_for(lambda: train_word.input_value() == "lgnew", 30, "the Caption tab's word in the Train tab")
        assert json.loads((folder.parent / "dataset.json").read_text())["trigger_word"] == "lgnew"
        wait_for(lambda: "lgnew, a blue lgnew on" in page.locator("#sample-preview").inner_text(), 30, "samples")
        train_word.click()
        train_word.press("ControlOrMeta+a")
        train_word.press("Backspace")
        page.locator("#train-check").click()
        estimate = page.locator("#train-estimate")
        wait_for(lambda: "No trigger word" in estimate.inner_text(), 30, "the warning")
        train_word.press_sequentially("lgnew")
        page.locator("#train-check").click()
        wait_for(lambda: "steps" in estimate.inner_text() and "No trigger word" not in estimate.inner_text(), 30,
                 "the estimate without the warning")

    captions = sorted(folder.glob("*.txt"))
    assert [c.stem for c in captions] == [f"photo{i:02d}" for i in range(10)] + ["tiny"]
    for caption in captions:
        assert caption.read_text(encoding="utf-8").startswith("ohwx, ")
    assert {p.name: p.read_bytes() for p in sources.iterdir()} == originals
    assert (folder / "photo00.png").read_bytes() == originals["photo00.png"]


def test_bad_files_each_get_a_visible_message_and_the_app_carries_on(app, tmp_path):
    app_url, workspace = app
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "readme.png").write_text("this is text, not a picture")
    truncated_jpeg(bad / "half.jpg")
    Image.new("RGB", (1, 1)).save(bad / "pixel.png")
    png_bomb(bad / "bomb.png")
    zip_slip(bad / "slip.zip", photo_bytes(20))
    zip_bomb(bad / "zipbomb.zip")
    (bad / "Ünïcode name 写真.png").write_bytes(photo_bytes(21))
    (bad / "Ünïcode name 写真.txt").write_text("ohwx, " + "very long caption " * 277, encoding="utf-8")
    originals = {p.name: p.read_bytes() for p in bad.iterdir()}

    with browser_page() as page:
        table = import_into_new_dataset(page, app_url, "hostile", bad, "Ünïcode")
        for pattern in [r"zero\.png\s+empty file", r"readme\.png\s+not an image", r"half\.jpg\s+corrupt",
                        r"pixel\.png\s+too small \(1×1\)", r"bomb\.png\s+400 megapixels is over 64 megapixels",
                        r"\.\./\.\./escaped\.png\s+unsafe path", r"huge\.png\s+.*possible zip bomb",
                        r"imported\s+ok\.png", r"imported\s+Ünïcode name 写真\.png"]:
            assert re.search(pattern, table), pattern
        screenshot(page, "dataset-bad-files")

        page.get_by_role("tab", name="Caption").click()
        long_box = page.get_by_label("Ünïcode name 写真.png")
        wait_for(lambda: long_box.input_value().startswith("ohwx, very long"), what="the long caption")
        assert "only the first 75 are used" in page.locator(".caption-box").filter(has=long_box).inner_text()
        type_into(long_box, "ohwx, shortened")
        long_box.press("Tab")  # and on to the next caption, which saves this one at the latest
        folder = workspace / "datasets" / "hostile" / "images"
        wait_for(lambda: read_caption(folder / "Ünïcode name 写真.png") == "ohwx, shortened", 60, "saved edit")

        create_dataset(page, app_url, "after")  # the app still answers
    assert {p.name: p.read_bytes() for p in bad.iterdir()} == originals
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["ok.png", "Ünïcode name 写真.png",
                                                                         "Ünïcode name 写真.txt"]
    assert not list(workspace.rglob("escaped.png"))


def test_zips_from_a_mac_and_from_windows_show_their_captions_in_the_caption_tab(app, tmp_path):
    from test_brought_files import mac_zip, windows_zip

    app_url, workspace = app
    zips = tmp_path / "zips"
    zips.mkdir()
    mac_zip(zips / "photos.zip")
    windows_zip(zips / "trip.zip")
    with browser_page() as page:
        import_into_new_dataset(page, app_url, "zipped", zips, "IMG_0001 (2).txt")
        assert shown_text(page, "#import-summary").startswith(
            "4 images and 4 captions imported from photos.zip, trip.zip; 4 system files ignored")
        assert re.search(r"warning\s+IMG_0001 \(2\)\.txt\s+caption for IMG_0001 \(2\)\.jpg; not UTF-8",
                         results_text(page))
        page.get_by_role("tab", name="Caption").click()
        expected = {"Café.jpg": "ohwx, a café terrace", "beach.png": "ohwx, on a beach",
                    "IMG_0001.jpg": "ohwx, first", "IMG_0001 (2).jpg": "ohwx, second, déjà vu"}
        for label, caption in expected.items():
            box = page.get_by_label(label)
            wait_for(lambda box=box, caption=caption: box.input_value() == caption, what=f"the caption of {label}")
        screenshot(page, "caption-from-zips")

        page.get_by_role("tab", name="Dataset").click()
        page.locator("#dataset-delete").click()
        confirm = page.locator("#dataset-delete-confirm")
        wait_for(lambda: "Delete dataset zipped with its 4 images" in confirm.inner_text(), what="the question")
        page.locator("#dataset-delete-yes").click()
        wait_for(lambda: "Deleted dataset zipped." in shown_text(page, "#import-summary"), 60, "the deletion")
        assert not confirm.is_visible() and not (workspace / "datasets" / "zipped").exists()
        assert page.locator("#dataset-picker").get_by_role("combobox").input_value() == ""
        assert sorted(p.name for p in zips.iterdir()) == ["photos.zip", "trip.zip"]  # what was brought stays


def test_a_mixed_upload_is_counted_right(app, tmp_path):
    import zipfile

    app_url, workspace = app
    mixed = photos_in(tmp_path / "mixed", "loose", 5, 30)
    for index in range(2):
        (mixed / f"loose{index}.txt").write_text(f"ohwx, loose {index}", encoding="utf-8")
    with zipfile.ZipFile(mixed / "more.zip", "w") as packed:
        for index in range(3):
            packed.writestr(f"packed{index}.png", photo_bytes(40 + index))
    with browser_page() as page:
        import_into_new_dataset(page, app_url, "mixed", mixed, "packed2.png")
        wait_for(lambda: shown_text(page, "#import-summary").strip(), 30, "the summary")
        assert shown_text(page, "#import-summary").strip() == "8 images and 2 captions imported from 7 files, more.zip."
    images = workspace / "datasets" / "mixed" / "images"
    assert len(list(images.glob("*.png"))) == 8 and len(list(images.glob("*.txt"))) == 2


def test_remove_waits_for_a_choice_help_lines_are_readable_and_an_offline_blip_says_what_to_do(app, tmp_path):
    app_url, workspace = app
    photos = photos_in(tmp_path / "two", "pick", 2, 50)
    with browser_page() as page:
        import_into_new_dataset(page, app_url, "edges", photos, "pick1.png")
        wait_for(lambda: "2 images" in page.locator("#quality-report").inner_text(), 30, "the dataset's view")
        remove = page.locator("#remove-selected")
        assert remove.is_disabled()  # nothing chosen: nothing to remove
        page.get_by_label("Remove from the dataset").click()
        page.get_by_role("option", name="pick0.png", exact=True).click()
        page.keyboard.press("Escape")  # the list closes, the choice stays
        wait_for(lambda: remove.is_enabled(), 30, "Remove, once something is chosen")
        remove.click()
        wait_for(lambda: "1 removed" in shown_text(page, "#import-summary"), 30, "the removal")
        assert [p.name for p in (workspace / "datasets" / "edges" / "images").glob("*.png")] == ["pick1.png"]

        page.get_by_role("tab", name="Caption").click()
        page.locator("#caption-run").click()  # the hub's BLIP, which this offline machine cannot download
        progress = page.locator("#caption-progress")
        wait_for(lambda: "huggingface-cli download" in progress.inner_text(), 60, "the offline message")
        assert progress.inner_text().startswith("error: Captioning edges") and "0/0" not in progress.inner_text()
        assert not progress.locator("progress").count()  # no empty bar
        info = page.locator("[data-testid='block-info']").first
        assert info.evaluate("e => getComputedStyle(e).color") == "rgb(75, 85, 99)"  # help lines readable


def test_loss_masks_show_in_the_dataset_tab(app, tmp_path):
    app_url, workspace = app
    folder = tmp_path / "masked"
    folder.mkdir()
    keep = Image.new("L", (640, 768), 0)
    keep.paste(255, (320, 0, 640, 768))  # the right half is learnt
    with Image.open(io.BytesIO(photo_bytes(60))) as photo:
        cut = photo.convert("RGB")
    cut.putalpha(keep)
    cut.save(folder / "cut.png")
    (folder / "whole.png").write_bytes(photo_bytes(61))
    keep.save(folder / "whole.mask.png")
    with browser_page() as page:
        table = import_into_new_dataset(page, app_url, "masked", folder, "whole.mask.png")
        assert re.search(r"imported\s+whole\.mask\.png\s+loss mask of whole", table)
        assert re.search(r"cut\.png\s+[^\n]*transparency kept", table)
        wait_for(lambda: "Loss masks on 2 of 2 images" in page.locator("#quality-report").inner_text(), 30,
                 "the report's mask line")
        assert "1 loss mask" in shown_text(page, "#import-summary")
        thumbs = page.locator("#gallery img")
        wait_for(lambda: thumbs.count() == 2, 30, "two pictures in the gallery (the mask is not one)")
        for index, name in enumerate(["cut.png", "whole.png"]):  # the pictures the page was sent, against their own
            sent = page.request.get(thumbs.nth(index).get_attribute("src")).body()  # look (transparency on white)
            with Image.open(folder / name) as source:
                plain = to_rgb(source).convert("L").resize((213, 256))
            halves = [(0, 0, 106, 256), (107, 0, 213, 256)]
            shown_left, shown_right = (ImageStat.Stat(Image.open(io.BytesIO(sent)).convert("L").crop(box)).mean[0]
                                       for box in halves)
            plain_left, plain_right = (ImageStat.Stat(plain.crop(box)).mean[0] for box in halves)
            assert shown_left < 0.5 * plain_left and abs(shown_right - plain_right) < 10  # only what it leaves out
        assert page.locator("#gallery").inner_text().count("loss mask (darkened: left out)") == 2
        screenshot(page, "dataset-masks")
    images = workspace / "datasets" / "masked" / "images"
    assert sorted(p.name for p in images.glob("*.png")) == ["cut.png", "whole.mask.png", "whole.png"]
    with Image.open(images / "cut.png") as stored:
        assert stored.mode == "RGBA"


def test_florence_and_a_wd_tagger_caption_from_the_caption_tab(app, tmp_path):
    app_url, workspace = app
    florence = save_tiny_florence(workspace / "models" / "florence-tiny")
    tagger = save_tiny_wd_tagger(workspace / "models" / "wd-tiny", [0.2, 0.7, 0.1, 0.05, 0.99, 0.5, 0.36, 0.34, 0.8,
                                                                    0.6, 0.95, 0.9, 0.8])
    photos = photos_in(tmp_path / "three", "pic", 3, 70)
    folder = workspace / "datasets" / "tags" / "images"
    with browser_page() as page:
        import_into_new_dataset(page, app_url, "tags", photos, "pic2.png")
        page.get_by_role("tab", name="Caption").click()
        florence_options, tagger_options = page.locator("#florence-options"), page.locator("#tagger-options")
        page.get_by_label("Captioning model").click()
        page.get_by_role("option", name="Florence-2 base (0.23 B parameters)").click()
        wait_for(lambda: florence_options.is_visible() and not tagger_options.is_visible(), 30, "Florence's options")
        page.get_by_label("Captioning model").click()
        page.get_by_role("option", name="Local folder…").click()
        type_into(page.locator("#blip-folder").get_by_role("textbox"), str(florence))
        type_into(page.locator("#trigger-word").get_by_role("textbox"), "ohwx")
        page.locator("#florence-detail").get_by_text("paragraph").click()
        page.locator("#caption-run").click()
        wait_for(lambda: "Captioned 3 images" in shown_text(page, "#caption-status"), 60, "Florence-2's captions")
        edited = page.get_by_label("pic1.png")
        wait_for(lambda: edited.input_value().startswith("ohwx, "), 30, "Florence-2's caption in the editor")
        assert set(edited.input_value().removeprefix("ohwx, ").split()) <= set(FLORENCE_WORDS)

        type_into(page.locator("#blip-folder").get_by_role("textbox"), str(tagger))
        type_into(page.locator("#tagger-general").get_by_role("spinbutton"), "0.55")
        page.locator("#tagger-ratings").get_by_role("checkbox").check()
        type_into(page.locator("#tagger-blacklist").get_by_role("textbox"), "solo")
        page.get_by_text("overwrite all").click()
        page.locator("#caption-run").click()
        wanted = "ohwx, 1girl, hatsune miku, ^_^, sensitive, simple background"
        wait_for(lambda: edited.input_value() == wanted, 60, "the tagger's tags in the editor")
        screenshot(page, "caption-tagger")
    assert [read_caption(folder / f"pic{index}.png") for index in range(3)] == [wanted] * 3
