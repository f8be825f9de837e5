"""The real BLIP captioning code on a tiny random BLIP: trigger first, modes, styles, one cached captioner."""

import pytest
from bad_files import photo_bytes
from tiny_blip import WORDS, save_tiny_blip

from lora_gradio.cache import ModelCache
from lora_gradio.captioning import DEFAULT_BLIP, CaptionOptions, caption_dataset, compose, load_captioner, to_tags
from lora_gradio.dataset import read_caption, write_caption
from lora_gradio.errors import UserError


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    return str(save_tiny_blip(tmp_path_factory.mktemp("blip")))


@pytest.fixture
def images(tmp_path):
    for index in range(5):
        (tmp_path / f"img{index}.png").write_bytes(photo_bytes(index, (96, 96)))
    return tmp_path


def test_captions_start_with_trigger_and_use_the_model_vocabulary(tiny_blip, images):
    cache = ModelCache()
    progress = []
    result = caption_dataset(cache, tiny_blip, images, CaptionOptions(trigger_word="ohwx", max_length=6,
                                                                        batch_size=2),
                             emit=lambda e: e.kind == "progress" and progress.append((e.step, e.total_steps)))
    assert len(result.written) == 5 and progress == [(2, 5), (4, 5), (5, 5)]
    for index in range(5):
        caption = read_caption(images / f"img{index}.png")
        assert caption.startswith("ohwx, ")
        words = caption.removeprefix("ohwx, ").split()
        assert 0 < len(words) <= 6 and set(words) <= set(WORDS)


def test_only_missing_keeps_existing_and_overwrite_replaces(tiny_blip, images):
    cache = ModelCache()
    write_caption(images / "img0.png", "ohwx, my own words")
    result = caption_dataset(cache, tiny_blip, images, CaptionOptions(trigger_word="ohwx"))
    assert result.skipped == ["img0.png"] and read_caption(images / "img0.png") == "ohwx, my own words"
    caption_dataset(cache, tiny_blip, images, CaptionOptions(trigger_word="ohwx", overwrite=True, prefix="photo"))
    assert read_caption(images / "img0.png").startswith("ohwx, photo, ")
    assert cache.loads == 1  # loaded once, reused


def test_captioner_is_released_when_training_needs_the_memory(tiny_blip, images, demo_spec):
    cache = ModelCache()
    caption_dataset(cache, tiny_blip, images, CaptionOptions())
    assert cache.holds == ("captioner", tiny_blip)
    with cache.pipeline(demo_spec, "generation"):
        assert cache.holds == ("pipeline", demo_spec) and cache.loads == 2
        assert cache.status().alive == 1  # the captioner is gone from memory, not just from the cache


def test_tags_style_and_composition():
    assert to_tags("a woman with red hair in a park") == "woman, red hair, park"
    options = CaptionOptions(trigger_word="ohwx", prefix="photo", suffix="sharp focus", style="tags")
    assert compose("a dog on the beach", options) == "ohwx, photo, dog, beach, sharp focus"


def test_no_weights_and_no_internet_names_both_remedies():
    with pytest.raises(UserError) as info:
        load_captioner(DEFAULT_BLIP)
    message = str(info.value)
    assert "internet for the first use" in message and "local folder" in message
    assert f"huggingface-cli download {DEFAULT_BLIP} --local-dir blip-base" in message


def test_local_folder_that_is_not_blip(tmp_path):
    with pytest.raises(UserError, match="does not hold a BLIP captioning model"):
        load_captioner(str(tmp_path))


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 0}, "batch size 0"), ({"max_length": 500}, "maximum length 500"), ({"style": "poem"}, "style"),
])
def test_silly_caption_options_are_refused_by_name(changes, message):
    with pytest.raises(UserError, match=message):
        CaptionOptions(**changes)
