"""The over-training check on sample images: much darker or more saturated than epoch 0 gets advice."""

from PIL import Image

from lora_gradio.training.samples import overtraining_warning


def save(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_darker_and_more_saturated_samples_get_advice(tmp_path):
    first = [save(tmp_path / "e0.png", (150, 140, 130))]
    assert overtraining_warning(first, [save(tmp_path / "same.png", (148, 141, 128))], 1) is None
    dark = overtraining_warning(first, [save(tmp_path / "dark.png", (60, 55, 50))], 3)
    assert dark.startswith("Epoch 3 samples are") and "darker" in dark and "lower learning rate" in dark
    saturated = overtraining_warning(first, [save(tmp_path / "sat.png", (250, 60, 30))], 5)
    assert "more saturated" in saturated and "earlier epoch" in saturated
