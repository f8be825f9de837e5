"""Florence-2 and a WD tagger beside BLIP, on tiny random models: the whole path from pictures to the captions on
disk, with the trigger first, Florence-2's detail, the tagger's thresholds, ratings, underscores and blacklist."""

import pytest
from bad_files import photo_bytes
from tiny_captioners import FLORENCE_WORDS, WD_TAGS, save_tiny_florence, save_tiny_wd_tagger

from lora_gradio.cache import ModelCache
from lora_gradio.captioners import FLORENCE_MODELS, WD_MODELS, family, load_captioner
from lora_gradio.captioning import CaptionOptions, caption_dataset
from lora_gradio.cli import main
from lora_gradio.dataset import read_caption
from lora_gradio.errors import UserError

# each picture's probability of every tag of WD_TAGS: ratings general .2, sensitive .7, questionable .1, explicit
# .05; then 1girl .99, long_hair .5, red_circle .36, blue_sky .34, ^_^ .8, simple_background .6, solo .95, and the
# characters hatsune_miku .9, kirby .8
PROBABILITIES = [0.2, 0.7, 0.1, 0.05, 0.99, 0.5, 0.36, 0.34, 0.8, 0.6, 0.95, 0.9, 0.8]


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return str(save_tiny_florence(tmp_path_factory.mktemp("florence")))


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return str(save_tiny_wd_tagger(tmp_path_factory.mktemp("wd"), PROBABILITIES))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        (folder / f"img{index}.png").write_bytes(photo_bytes(index, (96, 64)))
    return folder


def captions(folder):
    return [read_caption(folder / f"img{index}.png") for index in range(3)]


def test_florence_writes_its_own_words_after_the_trigger_at_the_detail_asked(florence, images):
    cache = ModelCache()
    with cache.use(("captioner", florence), lambda: load_captioner(florence), "a look") as captioner:
        generate, asked = captioner.model.generate, []

        def watched(**inputs):  # what the model is asked, as the tokenizer reads it back
            asked.extend(captioner.processor.batch_decode(inputs["input_ids"], skip_special_tokens=True))
            return generate(**inputs)

        captioner.model.generate = watched
    result = caption_dataset(cache, florence, images, CaptionOptions("ohwx", suffix="soft light", max_length=5,
                                                                       detail="paragraph", batch_size=2))
    assert len(result.written) == 3 and cache.loads == 1
    assert asked == ["Describe with a paragraph what is shown in the image."] * 3  # <MORE_DETAILED_CAPTION>
    for caption in captions(images):
        assert caption.startswith("ohwx, ") and caption.endswith(", soft light")
        words = caption.removeprefix("ohwx, ").removesuffix(", soft light").split()
        assert 0 < len(words) <= 5 and set(words) <= set(FLORENCE_WORDS)


def test_the_tagger_keeps_tags_over_their_thresholds_most_confident_first(tagger, images):
    cache = ModelCache()
    caption_dataset(cache, tagger, images, CaptionOptions("ohwx", style="tags"))
    assert captions(images) == ["ohwx, 1girl, solo, hatsune miku, ^_^, simple background, long hair, red circle"] * 3
    caption_dataset(cache, tagger, images, CaptionOptions(
        "ohwx", overwrite=True, general_threshold=0.55, character_threshold=0.95, ratings=True, underscores=True,
        blacklist="Solo, simple background"))
    assert captions(images) == ["ohwx, 1girl, ^_^, sensitive"] * 3  # kirby (.8) and hatsune_miku (.9) under .95
    assert cache.loads == 1  # one tagger, loaded once


def test_each_kind_is_known_by_its_folder_or_its_name(florence, tagger, tmp_path):
    assert (family(florence), family(tagger), family(str(tmp_path))) == ("florence2", "wd", "blip")
    assert {family(hub_id) for hub_id in FLORENCE_MODELS.values()} == {"florence2"}
    assert {family(hub_id) for hub_id in WD_MODELS.values()} == {"wd"}
    assert len(WD_TAGS) == len(PROBABILITIES)


def test_a_broken_tagger_folder_and_an_offline_download_say_what_to_do(tmp_path, tagger):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "selected_tags.csv").write_text("tag_id,name,category,count\n1,solo,0,5\n")
    (broken / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"does not hold a WD tagger .*model.onnx cannot be read"):
        load_captioner(str(broken))
    for hub_id, remedy in ((WD_MODELS["WD ViT tagger v3 (booru tags)"], "model.onnx selected_tags.csv"),
                           (FLORENCE_MODELS["Florence-2 base (0.23 B parameters)"], "--local-dir florence-2")):
        with pytest.raises(UserError, match="internet for the first use") as info:
            load_captioner(hub_id)
        assert f"huggingface-cli download {hub_id} {remedy}" in str(info.value)


@pytest.mark.parametrize(("changes", "message"), [
    ({"general_threshold": float("nan")}, "general threshold nan"), ({"character_threshold": 1.5}, "character"),
    ({"detail": "huge"}, "detail 'huge'"), ({"blacklist": "x" * 6000}, "blacklist"),
])
def test_silly_tagger_and_florence_options_are_refused_by_name(changes, message):
    with pytest.raises(UserError, match=message):
        CaptionOptions(**changes)


def test_the_command_line_captions_with_either(tagger, florence, images, capsys):
    assert main(["caption", str(images), "--model", tagger, "--trigger", "ohwx", "--general-threshold", "0.9",
                 "--character-threshold", "0.85"]) == 0
    assert captions(images) == ["ohwx, 1girl, solo, hatsune miku"] * 3
    assert capsys.readouterr().out.strip() == "Captioned 3 images; kept 0 existing captions."
    assert main(["caption", str(images), "--model", florence, "--trigger", "ohwx", "--detail", "paragraph"]) == 0
    assert capsys.readouterr().out.strip() == "Captioned 0 images; kept 3 existing captions."
    assert main(["caption", str(images), "--model", tagger, "--general-threshold", "2"]) == 2
    assert "general threshold 2.0: use 0 to 1" in capsys.readouterr().err


def test_the_tagger_reads_pictures_as_wd_models_take_them(tagger):
    from PIL import Image

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels = load_captioner(tagger).pixels(wide)
    assert pixels.shape == (32, 32, 3) and pixels.dtype.name == "float32"
    assert list(pixels[0, 16]) == [255, 255, 255]  # padded to a square with white
    assert list(pixels[16, 16]) == [0, 0, 255]  # red, in BGR order, 0–255
