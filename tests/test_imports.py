"""Importing, checking and preparing datasets, including every kind of bad input."""

import io
from pathlib import Path

import pytest
from bad_files import photo_bytes, png_bomb, truncated_jpeg, zip_bomb, zip_slip
from PIL import Image

from lora_gradio.dataset import open_rgb, prepare_dataset, read_caption, tag_frequencies, write_caption
from lora_gradio.errors import UserError
from lora_gradio.imports import import_folder, import_sources
from lora_gradio.quality import check_dataset, list_images, remove_images
from lora_gradio.workspace import Workspace


def by_name(report):
    return {r.name: r for r in report.files}


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "sources"
    folder.mkdir()
    return folder


def import_one(path: Path, dataset: Path):
    before = path.read_bytes()
    report = import_sources([path], dataset)
    assert path.read_bytes() == before  # the original is never touched
    return report


def empty(folder):
    (folder / "empty.png").write_bytes(b"")
    return folder / "empty.png"


def text_as_png(folder):
    (folder / "notes.png").write_text("just some text")
    return folder / "notes.png"


def one_pixel(folder):
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    return folder / "dot.png"


@pytest.mark.parametrize(("make", "message"), [
    (empty, "empty file (0 bytes)"),
    (text_as_png, "not an image"),
    (lambda folder: truncated_jpeg(folder / "cut.jpg"), "corrupt or truncated"),
    (one_pixel, "too small (1×1)"),
    (lambda folder: png_bomb(folder / "bomb.png"), "400 megapixels is over 64 megapixels"),
])
def test_bad_single_files_get_a_message_and_are_not_imported(sources, tmp_path, make, message):
    path = make(sources)
    (result,) = import_one(path, tmp_path / "dataset").files
    assert result.status == "skipped" and message in result.message
    assert list_images(tmp_path / "dataset") == []


def test_zip_slip_members_are_refused_and_nothing_escapes(sources, tmp_path):
    archive = zip_slip(sources / "slip.zip", photo_bytes(1))
    results = by_name(import_one(archive, tmp_path / "ws" / "dataset"))
    assert results["ok.png"].status == "imported"
    assert "unsafe path" in results["../../escaped.png"].message
    assert "unsafe path" in results["/etc/absolute.png"].message
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "ws" / "escaped.png").exists()
    assert [p.name for p in list_images(tmp_path / "ws" / "dataset")] == ["ok.png"]


def test_zip_bomb_is_refused(sources, tmp_path):
    (result,) = import_one(zip_bomb(sources / "bomb.zip"), tmp_path / "dataset").files
    assert result.status == "skipped" and "possible zip bomb" in result.message


def test_unicode_name_with_spaces_and_long_caption(sources, tmp_path):
    image = sources / "Ünïcode name 写真 01.png"
    image.write_bytes(photo_bytes(2))
    long_caption = "ohwx, " + ", ".join(f"detail {i}" for i in range(700))[:4994]
    (sources / "Ünïcode name 写真 01.txt").write_text(long_caption, encoding="utf-8")
    results = by_name(import_sources([image, sources / "Ünïcode name 写真 01.txt"], tmp_path / "dataset"))
    assert results["Ünïcode name 写真 01.png"].status == "imported"
    stored = tmp_path / "dataset" / "Ünïcode name 写真 01.png"
    assert stored.read_bytes() == image.read_bytes()
    assert len(long_caption) == 5000 and read_caption(stored) == long_caption


def test_normalisation_on_import(sources, tmp_path):
    cmyk = sources / "print.jpg"
    Image.new("CMYK", (600, 600), (0, 255, 255, 0)).save(cmyk)
    rgba = sources / "cutout.png"
    Image.new("RGBA", (600, 600), (0, 0, 255, 0)).save(rgba)
    rotated = sources / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("RGB", (800, 600), "green").save(rotated, exif=exif)
    animated = sources / "anim.gif"
    frames = [Image.new("P", (600, 600), i) for i in (3, 9)]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    results = by_name(import_sources([cmyk, rgba, rotated, animated], tmp_path / "dataset"))
    assert "CMYK converted to RGB" in results["print.png"].message
    with Image.open(tmp_path / "dataset" / "cutout.png") as img:
        assert img.mode == "RGBA" and img.getpixel((0, 0)) == (0, 0, 255, 0)  # transparency kept: a loss mask
    assert open_rgb(tmp_path / "dataset" / "cutout.png").getpixel((0, 0)) == (255, 255, 255)  # trained over white
    assert "transparency kept" in results["cutout.png"].message
    with Image.open(tmp_path / "dataset" / "phone.png") as img:
        assert img.size == (600, 800)
    assert "first frame" in results["anim.png"].message


def test_kohya_folder_import_keeps_repeats_and_captions(tmp_path):
    source = tmp_path / "kohya" / "10_ohwx woman"
    source.mkdir(parents=True)
    (source / "a.png").write_bytes(photo_bytes(3))
    (source / "a.txt").write_text("ohwx woman, smiling")
    report = import_folder(tmp_path / "kohya", tmp_path / "dataset")
    assert {r.status for r in report.files} == {"imported"}
    assert report.summary() == "1 image and 1 caption imported from kohya."
    assert read_caption(tmp_path / "dataset" / "10_ohwx woman" / "a.png") == "ohwx woman, smiling"


def test_report_flags_count_size_duplicates_and_corrupt_files(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    for index in range(5):
        (dataset / f"p{index}.png").write_bytes(photo_bytes(index))
    (dataset / "copy.png").write_bytes(photo_bytes(0))
    Image.new("RGB", (300, 200), "gray").save(dataset / "small.png")
    (dataset / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    write_caption(dataset / "p0.png", "ohwx, a red hat")
    report = check_dataset(dataset)
    text = report.markdown()
    assert "8 images" in text and "under 15" in text
    assert "1 corrupt file" in text and "broken.png" in text
    assert "1 image under 512 px" in text and "small.png" in text
    assert "**1 near-duplicate pair**: copy.png ≈ p0.png" in text
    assert "7 images without a caption" in text
    assert report.per_image["small.png"] == ["small: 300×200", "one flat colour (blank): there is nothing to learn "
                                                               "from it; remove it"]
    assert "**1 image with little to learn (blank or extreme shape)**: small.png" in text


def test_prepare_writes_bucketed_copies_and_leaves_originals(tmp_path):
    dataset = tmp_path / "images"
    dataset.mkdir()
    (dataset / "wide.png").write_bytes(photo_bytes(1, (1200, 800)))
    (dataset / "tall.png").write_bytes(photo_bytes(2, (700, 1000)))
    write_caption(dataset / "wide.png", "ohwx, wide")
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}
    done, skipped = (result := prepare_dataset(dataset, tmp_path / "prepared", 512)).done, result.skipped
    assert (done, skipped) == (2, [])
    with Image.open(tmp_path / "prepared" / "wide.png") as wide, Image.open(tmp_path / "prepared" / "tall.png") as tall:
        assert wide.width > wide.height and tall.height > tall.width
        assert wide.width * wide.height <= 512 * 512
    assert read_caption(tmp_path / "prepared" / "wide.png") is None  # pixels only: captions stay with the originals
    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before
    prepare_dataset(dataset, tmp_path / "prepared", 256, center_crop=True)
    with Image.open(tmp_path / "prepared" / "wide.png") as img:
        assert img.size == (256, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "prepared"]  # no staging left behind


def test_remove_images_only_inside_the_dataset(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "a.png").write_bytes(photo_bytes(1))
    write_caption(dataset / "a.png", "x")
    (tmp_path / "outside.png").write_bytes(b"keep")
    assert remove_images(dataset, ["a.png", "../outside.png"]) == ["a.png"]
    assert not (dataset / "a.txt").exists() and (tmp_path / "outside.png").exists()


def test_tag_frequencies(tmp_path):
    for index, caption in enumerate(["ohwx, red hat", "ohwx, blue hat", "ohwx, red hat, smiling"]):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{index}.png")
        write_caption(tmp_path / f"{index}.png", caption)
    assert tag_frequencies(tmp_path)[:2] == [("ohwx", 3), ("red hat", 2)]


def test_workspace_layout_and_dataset_names(tmp_path):
    workspace = Workspace.open(tmp_path / "ws", allowed_dirs=(tmp_path / "ComfyUI",))
    for folder in ("datasets", "models/checkpoints", "models/loras", "outputs"):
        assert (tmp_path / "ws" / folder).is_dir()
    workspace.dataset_dir("anna 2", create=True)
    assert workspace.list_datasets() == ["anna 2"]
    with pytest.raises(UserError, match="not a usable dataset name"):
        workspace.dataset_dir("../escape", create=True)
    comfy = tmp_path / "ComfyUI" / "models"
    (comfy / "checkpoints").mkdir(parents=True)
    (comfy / "checkpoints" / "dreamshaper_8.safetensors").write_bytes(b"")
    workspace.use_models_dir(tmp_path / "ComfyUI")
    assert workspace.loras_dir == comfy / "loras" and workspace.list_checkpoints() == ["dreamshaper_8.safetensors"]


def test_image_bytes_of_jpeg_kept_exactly(sources, tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((600, 600), 20).convert("RGB").save(buffer, format="JPEG", quality=90)
    (sources / "photo.JPG").write_bytes(buffer.getvalue())
    (result,) = import_sources([sources / "photo.JPG"], tmp_path / "dataset").files
    assert result.status == "imported"
    assert (tmp_path / "dataset" / "photo.jpg").read_bytes() == buffer.getvalue()


def test_the_report_reads_kohya_folders_as_captions_and_repeats(tmp_path):
    dataset = tmp_path / "dataset"
    for folder, count in (("10_ohwx woman", 3), ("2_style", 2)):
        (dataset / folder).mkdir(parents=True)
        for index in range(count):
            (dataset / folder / f"{index}.png").write_bytes(photo_bytes(index + 10 * count))
    (dataset / "loose.png").write_bytes(photo_bytes(99))
    text = check_dataset(dataset).markdown()
    assert "**Repeats**: 10_ohwx woman: ×10 (3 images); 2_style: ×2 (2 images); 35 images per epoch" in text
    assert "**5 images captioned by their folder's name**: 'ohwx woman' (10_ohwx woman), 'style' (2_style)" in text
    assert "**1 image without a caption**" in text


def test_a_cut_off_zip_a_fake_zip_and_a_windows_climb_are_named(tmp_path):
    import zipfile

    from bad_files import photo_bytes

    from lora_gradio.imports import import_sources

    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as packed:
        packed.writestr("a.png", photo_bytes(1))
    (tmp_path / "cut.zip").write_bytes(whole.read_bytes()[:-30])  # an interrupted download
    (tmp_path / "fake.zip").write_bytes(b"just text")
    (tmp_path / "..\\..\\evil.png").write_bytes(photo_bytes(2))
    report = import_sources([tmp_path / "cut.zip", tmp_path / "fake.zip", tmp_path / "..\\..\\evil.png"],
                            tmp_path / "ds" / "images")
    found = {r.name: r for r in report.files}
    assert found["cut.zip"].message.startswith("the zip is cut off: its end, which lists the files, is missing")
    assert found["fake.zip"].message == "not a zip file, though its name ends in .zip"
    climb = found["..\\..\\evil.png"]
    assert climb.status == "skipped" and climb.message.startswith("unsafe path") and climb.unsafe
    assert not list((tmp_path / "ds" / "images").glob("*")) and not list(tmp_path.parent.glob("evil.png"))
