"""Dataset reading, buckets, captions and the validated config."""

import random

import pytest
from PIL import Image

from lora_gradio.buckets import fit_to_bucket, make_buckets, pick_bucket
from lora_gradio.dataset import open_rgb, scan_training_folder, with_trigger, write_caption
from lora_gradio.errors import UserError
from lora_gradio.training.config import list_presets, load_preset, make_config
from lora_gradio.training.data import plan_epoch, process_caption


def test_buckets_respect_area_and_step():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512 and min(width, height) >= 256
    assert make_buckets(512, enabled=False) == [(512, 512)]


def test_landscape_photo_gets_a_landscape_bucket_without_square_crop():
    bucket = pick_bucket((1200, 800), make_buckets(512))
    assert bucket[0] > bucket[1] and abs(bucket[0] / bucket[1] - 1.5) < 0.2
    fitted = fit_to_bucket(Image.new("RGB", (1200, 800)), bucket)
    assert fitted.size == bucket


def test_epoch_plan_groups_buckets_counts_repeats_and_is_seeded():
    from lora_gradio.training.data import CachedImage

    cached = [CachedImage([], "a", (512, 512), 3), CachedImage([], "b", (768, 320), 2),
              CachedImage([], "c", (512, 512), 1)]
    plan = plan_epoch(cached, 2, seed=1, epoch=0)
    assert sorted(i for batch in plan for i in batch) == [0, 0, 0, 1, 1, 2]
    for batch in plan:
        assert len({cached[i].bucket for i in batch}) == 1
    assert plan == plan_epoch(cached, 2, seed=1, epoch=0)
    halves = [plan_epoch(cached, 1, 1, 0, rank, 2) for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 3
    one = [CachedImage([], name, (512, 512), 1) for name in "abc"]  # one batch of 8 for two processes
    shares = [plan_epoch(one, 8, 1, 0, rank, 2) for rank in (0, 1)]
    assert [[sorted(batch) for batch in share] for share in shares] == [[[0, 1, 2]], [[0, 1, 2]]]  # each gets it


def test_caption_shuffle_keeps_first_tokens_and_dropout_empties():
    rng = random.Random(0)
    caption = "ohwx, red hat, smiling, outdoors, sunny"
    shuffled = {process_caption(caption, rng, True, 1, 0.0) for _ in range(20)}
    assert all(s.startswith("ohwx, ") for s in shuffled) and len(shuffled) > 1
    assert process_caption(caption, rng, False, 0, 0.999) == ""


def test_trigger_word_goes_first_once():
    assert with_trigger("a woman", "ohwx") == "ohwx, a woman"
    assert with_trigger("ohwx, a woman", "ohwx") == "ohwx, a woman"
    assert with_trigger("", "ohwx") == "ohwx"


def test_kohya_repeat_folders_missing_captions_and_broken_images(tmp_path):
    folder = tmp_path / "img" / "10_ohwx woman"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "a.png")
    write_caption(folder / "a.png", "a photo of a woman")
    Image.new("RGB", (64, 64), "blue").save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    scan = scan_training_folder(tmp_path / "img", trigger_word="ohwx")
    assert [(i.path.name, i.repeats, i.caption) for i in scan.images] == [
        ("a.png", 10, "ohwx, a photo of a woman"), ("b.jpg", 10, "ohwx")]
    assert scan.total_repeats == 20
    assert any("broken.png: not an image" in w for w in scan.warnings)
    assert any("b.jpg has no caption" in w for w in scan.warnings)


def test_empty_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"No usable images"):
        scan_training_folder(tmp_path)


def test_images_normalised_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (8, 8)).save(tmp_path / "cmyk.jpg")
    assert open_rgb(tmp_path / "cmyk.jpg").mode == "RGB"


def test_presets_load_and_the_seed_preset_has_the_community_values():
    assert {"seed-recommended", "character", "style", "low-vram-8gb", "demo"} <= set(list_presets())
    config, description = load_preset("seed-recommended")
    assert (config.rank, config.alpha, config.optimizer, config.unet_lr, config.batch_size, config.epochs) == (
        96, 72, "adafactor", 1e-4, 2, 10)
    assert description


@pytest.mark.parametrize(("values", "message"), [
    ({"rank": 0}, r"rank = 0: .*greater than or equal to 1"),
    ({"unet_lr": -1e-4}, r"unet_lr = -0.0001: .*greater than 0"),
    ({"epochs": 0}, r"epochs = 0"),
    ({"resolution": 500}, r"resolution = 500: .*multiple of 64"),
    ({"rnak": 8}, r"unknown setting 'rnak' \(did you mean 'rank'\?\)"),
    ({"optimizer": "sgd"}, r"optimizer = 'sgd'"),
])
def test_bad_settings_name_field_value_and_range(values, message):
    with pytest.raises(UserError, match=message):
        make_config(values)


def test_preset_with_a_wrong_field_is_refused(tmp_path):
    (tmp_path / "mine.toml").write_text('description = "x"\nlearning_rate = 1e-4\n')
    with pytest.raises(UserError, match=r"preset 'mine.toml': unknown setting 'learning_rate'"):
        load_preset(str(tmp_path / "mine.toml"))


def test_hidden_folders_such_as_thumbnails_are_not_training_data(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / ".thumbs").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / ".thumbs" / "a.jpg")
    assert [i.path.name for i in scan_training_folder(tmp_path).images] == ["a.png"]
