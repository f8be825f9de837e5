"""Files people bring: zips from macOS and Windows, odd names and caption encodings, broken archives, links."""

import io
import os
import zipfile
from pathlib import Path

import pytest
from bad_files import photo_bytes, zip_link, zip_with_header
from PIL import Image

from lora_gradio.atomic import MAX_NAME_BYTES, disk_name
from lora_gradio.captioning import CaptionOptions
from lora_gradio.dataset import IMAGE_SUFFIXES, read_caption, scan_training_folder
from lora_gradio.errors import UserError
from lora_gradio.imports import import_folder, import_sources
from lora_gradio.quality import list_images
from lora_gradio.training.config import make_config

NFD_CAFE, NFC_CAFE = "Cafe\u0301", "Caf\u00e9"


def captions(dataset: Path) -> dict[str, str | None]:
    return {str(p.relative_to(dataset)): read_caption(p) for p in list_images(dataset)}


def rows(report):
    return {r.name: r for r in report.files}


def mac_zip(path: Path) -> Path:
    """What Finder's Compress makes: a folder entry, NFD names, AppleDouble files under __MACOSX, .DS_Store."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("photos/", b"")
        archive.writestr(f"photos/{NFC_CAFE}.jpg", jpeg(1))
        archive.writestr(f"photos/{NFD_CAFE}.txt", "ohwx, a café terrace".encode())
        archive.writestr("photos/beach.png", photo_bytes(2))
        archive.writestr("photos/beach.txt", "\ufeffohwx, on a beach\n".encode())
        archive.writestr("photos/.DS_Store", b"\x00\x00\x00\x01Bud1")
        archive.writestr(f"__MACOSX/photos/._{NFC_CAFE}.jpg", b"\x00\x05\x16\x07")
    return path


def windows_zip(path: Path) -> Path:
    """What Explorer's Send to zip makes: backslash paths, cp437 names, Notepad's UTF-16 and cp1252 captions with
    CRLF, Thumbs.db and desktop.ini, and the same file name in two folders."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder, seed, caption in (("A", 3, "ohwx, first\r\n".encode("utf-16")),
                                      ("B", 4, "ohwx, second, déjà vu\r\n".encode("cp1252"))):
            archive.writestr(f"trip\\{folder}\\IMG_0001.JPG", jpeg(seed))
            archive.writestr(f"trip\\{folder}\\img_0001.txt", caption)
        archive.writestr("trip\\Thumbs.db", b"\xd0\xcf\x11\xe0")
        archive.writestr("trip\\desktop.ini", b"[.ShellClassInfo]")
    return path


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_bytes(seed))).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_mac_zip_imports_every_caption_and_skips_junk_quietly(tmp_path):
    report = import_sources([mac_zip(tmp_path / "photos.zip")], tmp_path / "ds")
    assert captions(tmp_path / "ds") == {f"{NFC_CAFE}.jpg": "ohwx, a café terrace", "beach.png": "ohwx, on a beach"}
    assert [r.status for r in report.shown] == ["imported"] * 4  # no rows for .DS_Store or AppleDouble files
    assert report.summary() == ("2 images and 2 captions imported from photos.zip; 2 system files ignored "
                                f"(.DS_Store, ._{NFC_CAFE}.jpg).")


def test_a_windows_zip_pairs_by_full_path_and_decodes_notepad_captions(tmp_path):
    report = import_sources([windows_zip(tmp_path / "trip.zip")], tmp_path / "ds")
    assert captions(tmp_path / "ds") == {"IMG_0001 (2).jpg": "ohwx, second, déjà vu", "IMG_0001.jpg": "ohwx, first"}
    cp1252 = rows(report)["IMG_0001 (2).txt"]
    assert cp1252.status == "warning" and "not UTF-8, read as Windows-1252" in cp1252.message
    assert report.summary().startswith("2 images and 2 captions imported from trip.zip; 2 system files ignored")


@pytest.mark.parametrize(("data", "text", "note"), [
    ("\ufeffohwx, hat".encode(), "ohwx, hat", None),
    ("ohwx, hat".encode("utf-16-be").join([b"\xfe\xff", b""]), "ohwx, hat", None),
    ("ohwx, crème".encode("cp1252"), "ohwx, crème", "read as Windows-1252"),
    (b"ohwx,\x00 \x1b[1;31mred\x1b[0m hat\x07", "ohwx, red hat", "4 control or invisible characters removed"),
    ("ohwx, \u200bhat".encode(), "ohwx, hat", "1 control or invisible characters removed"),
    (f"ohwx, {NFD_CAFE}".encode(), f"ohwx, {NFC_CAFE}", None),
])
def test_caption_encodings_are_decoded_cleaned_and_named(tmp_path, data, text, note):
    (tmp_path / "a.png").write_bytes(photo_bytes(1))
    (tmp_path / "a.txt").write_bytes(data)
    report = import_sources([tmp_path / "a.png", tmp_path / "a.txt"], tmp_path / "ds")
    assert read_caption(tmp_path / "ds" / "a.png") == text
    assert (tmp_path / "ds" / "a.txt").read_bytes() == (text + "\n").encode()  # stored as plain UTF-8
    message = rows(report)["a.txt"].message
    assert (note in message) if note else message == "caption for a.png"


def test_a_folder_used_in_place_warns_about_its_caption_encoding(tmp_path):
    (tmp_path / "a.png").write_bytes(photo_bytes(1))
    (tmp_path / "a.txt").write_bytes("ohwx, crème".encode("cp1252"))
    scan = scan_training_folder(tmp_path)
    assert scan.images[0].caption == "ohwx, crème"
    assert scan.warnings == ["a.txt: not UTF-8, read as Windows-1252: check its accented letters."]


def test_an_invisible_character_in_the_trigger_word_is_refused_by_name():
    with pytest.raises(UserError, match=r"trigger_word.*invisible characters \(U\+200B ZERO WIDTH SPACE\)"):
        make_config({"trigger_word": "oh\u200bwx"})
    with pytest.raises(UserError, match=r"U\+00A0 NO-BREAK SPACE"):
        CaptionOptions(trigger_word="ohwx\u00a0")


def test_a_zero_repeat_kohya_folder_is_named_on_import_and_in_training(tmp_path):
    source = tmp_path / "kohya" / "0_ohwx dog"
    source.mkdir(parents=True)
    (source / "a.png").write_bytes(photo_bytes(5))
    report = import_folder(tmp_path / "kohya", tmp_path / "ds")
    assert "folder '0_ohwx dog' asks for 0 repeats, so its images train once per epoch: rename it to " \
           "'1_ohwx dog' or more" in report.summary()
    scan = scan_training_folder(tmp_path / "ds")
    assert scan.total_repeats == 1 and any("asks for 0 repeats" in w for w in scan.warnings)


def test_one_rule_names_files_within_the_byte_limit_and_reports_the_change(tmp_path):
    long_stem = "é" * 125  # 250 bytes: the file system takes it, a temporary name beside it would not
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{long_stem}.png").write_bytes(photo_bytes(6))
    (tmp_path / "src" / f"{long_stem}.txt").write_text("ohwx, long")
    (tmp_path / "src" / "two\nlines\x1b.png").write_bytes(photo_bytes(7))
    with zipfile.ZipFile(tmp_path / "long.zip", "w") as archive:
        archive.writestr("x" * 300 + ".png", photo_bytes(8))
    report = import_folder(tmp_path / "src", tmp_path / "ds")
    report_zip = import_sources([tmp_path / "long.zip"], tmp_path / "ds")
    stored = sorted(p.name for p in list_images(tmp_path / "ds"))
    assert all(len(name.encode()) <= MAX_NAME_BYTES for name in stored) and len(stored) == 3
    assert "two_lines_.png" in stored
    assert disk_name("x" * 300 + ".png") in stored and disk_name("x" * 299 + "y.png") != disk_name("x" * 300 + ".png")
    renamed = [r.message for r in report.files + report_zip.files if "stored as" in r.message]
    assert len(renamed) == 3
    assert read_caption(tmp_path / "ds" / disk_name(f"{long_stem}.png")) == "ohwx, long"
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]


def test_encrypted_and_deflate64_entries_get_a_reason_and_the_rest_is_kept(tmp_path):
    zip_with_header(tmp_path / "secret.zip", "secret.png", photo_bytes(1), flags=1)
    zip_with_header(tmp_path / "odd.zip", "odd.png", photo_bytes(2), method=9)
    with zipfile.ZipFile(tmp_path / "mixed.zip", "w") as archive:
        archive.writestr("fine.png", photo_bytes(3))
        archive.writestr(zip_link("link.png"), "../../../etc/passwd")
        archive.writestr("../up.png", photo_bytes(4))
    report = import_sources([tmp_path / n for n in ("secret.zip", "odd.zip", "mixed.zip")], tmp_path / "ds")
    found = rows(report)
    assert "encrypted (the zip has a password)" in found["secret.png"].message
    assert "compressed with Deflate64, which cannot be unpacked here" in found["odd.png"].message
    assert found["link.png"].unsafe and "a link inside the zip" in found["link.png"].message
    assert [p.name for p in list_images(tmp_path / "ds")] == ["fine.png"]
    assert report.summary() == ("1 image and 0 captions imported from secret.zip, odd.zip and 1 more; 4 skipped "
                                "(see each file's reason); mixed.zip held 2 unsafe entries (paths leading outside, "
                                "links), skipped; everything else in it was imported.")


def test_a_zip_member_that_is_damaged_is_named(tmp_path):
    with zipfile.ZipFile(tmp_path / "bad.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.png", photo_bytes(1))
    raw = bytearray((tmp_path / "bad.zip").read_bytes())
    raw[60:80] = b"\xff" * 20  # inside the compressed data
    (tmp_path / "bad.zip").write_bytes(bytes(raw))
    (result,) = import_sources([tmp_path / "bad.zip"], tmp_path / "ds").files
    assert result.status == "skipped" and result.message.startswith("damaged in the zip")


@pytest.mark.parametrize("make", ["empty zip", "empty folder", "no images"])
def test_nothing_to_import_says_so_in_one_line(tmp_path, make):
    source = tmp_path / "src"
    source.mkdir()
    if make == "empty zip":
        zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
        report = import_sources([tmp_path / "empty.zip"], tmp_path / "ds")
        origin = "empty.zip"
    else:
        if make == "no images":
            (source / ".DS_Store").write_bytes(b"x")
        report = import_folder(source, tmp_path / "ds")
        origin = "src"
    assert report.summary().startswith(f"0 images and 0 captions imported from {origin}: it holds no image files")


def test_blank_and_panorama_images_are_imported_with_a_warning(tmp_path):
    Image.new("RGB", (768, 768), (30, 30, 30)).save(tmp_path / "blank.png")
    Image.open(io.BytesIO(photo_bytes(3, (4096, 256)))).save(tmp_path / "pano.png")
    found = rows(import_sources([tmp_path / "blank.png", tmp_path / "pano.png"], tmp_path / "ds"))
    assert found["blank.png"].status == "warning" and "one flat colour (blank)" in found["blank.png"].message
    assert found["pano.png"].status == "warning" and "extreme shape (16:1)" in found["pano.png"].message


def test_a_long_caption_is_refused_as_too_long_not_as_a_bomb(tmp_path):
    (tmp_path / "a.png").write_bytes(photo_bytes(1))
    (tmp_path / "a.txt").write_text("ohwx, " + "word " * 20_000)
    found = rows(import_sources([tmp_path / "a.png", tmp_path / "a.txt"], tmp_path / "ds"))
    assert found["a.txt"].message == "caption over 64 kB: a caption is a sentence or a list of tags; shorten it"


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_phone_formats_that_pillow_reads_are_accepted(tmp_path, fmt):
    path = tmp_path / f"phone.{fmt.lower()}"
    Image.open(io.BytesIO(photo_bytes(9))).save(path, format=fmt)
    (result,) = import_sources([path], tmp_path / "ds").files
    assert result.status == "imported" and result.name == "phone.png" and f"{fmt} stored as PNG" in result.message
    assert {".avif", ".heic", ".webp", ".jpg", ".tiff"} <= IMAGE_SUFFIXES


def test_links_that_lead_out_of_an_imported_folder_are_refused_by_name(tmp_path):
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(photo_bytes(1))
    source = tmp_path / "src"
    source.mkdir()
    (source / "mine.png").write_bytes(photo_bytes(2))
    os.symlink(outside / "secret.png", source / "link.png")
    os.symlink(outside, source / "more")
    report = import_folder(source, tmp_path / "ds")
    found = rows(report)
    assert "a link to a file outside the imported folder; refused" in found["link.png"].message
    assert "a link to a folder outside the imported folder; refused" in found["more"].message
    assert [p.name for p in list_images(tmp_path / "ds")] == ["mine.png"]
    assert "src held 2 unsafe entries" in report.summary()
