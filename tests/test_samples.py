"""The over-training check on sample images: much darker or more saturated than epoch 0 gets advice."""

import math
import re

from PIL import Image

from lora_gradio.training.scoring import overtraining_warning


def save(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def test_darker_and_more_saturated_samples_get_advice(tmp_path):
    first = [save(tmp_path / "e0.png", (150, 140, 130))]
    assert overtraining_warning(first, [save(tmp_path / "same.png", (148, 141, 128))], "epoch 1") is None
    dark = overtraining_warning(first, [save(tmp_path / "dark.png", (60, 55, 50))], "epoch 3")
    assert dark.startswith("The epoch 3 samples are") and "darker" in dark and "lower learning rate" in dark
    saturated = overtraining_warning(first, [save(tmp_path / "sat.png", (250, 60, 30))], "step 150")
    assert saturated.startswith("The step 150 samples") and "more saturated" in saturated
    assert "earlier epoch" in saturated


def test_grid_labels_stay_distinct_and_inside_their_own_space(tmp_path):
    import numpy as np
    from safetensors.torch import save_file
    from torch import zeros

    from lora_gradio.inference import GRID_MIN_CELL, label_grid, row_labels

    loras = []
    for run, file, epoch, steps in [("character-20261126-101500", "character-000004.safetensors", 4, 120),
                                    ("character-20261126-101500", "character.safetensors", 8, 240),
                                    ("character-20261126-113000", "character.safetensors", 8, 240),
                                    ("character-20261126-113000", "character-step00000030.safetensors", 1, 30)]:
        path = tmp_path / run / file
        path.parent.mkdir(exist_ok=True)
        save_file({"x": zeros(1)}, path, {"ss_epoch": str(epoch), "ss_steps": str(steps)})
        loras.append((f"{run}/{file}", path))
    labels = row_labels(loras)
    assert [label.splitlines()[0] for label in labels] == [
        "epoch 4 · step 120", "epoch 8 · step 240", "epoch 8 · step 240", "epoch 1 · step 30 (stopped)"]
    assert len(set(labels)) == 4 and labels[2].endswith("113000")  # the run tells equal epochs apart

    cells = [[Image.new("RGB", (64, 64), "gray") for _ in range(3)] for _ in labels]
    columns = ["0.123456789 strength of model and clip", "-1.5", "an even longer header that cannot fit its column"]
    grid = np.asarray(label_grid(cells, labels, columns).convert("L"))
    cell = 64 * math.ceil(GRID_MIN_CELL / 64)  # small images are enlarged so that labels fit
    left, top = grid.shape[1] - 3 * cell, grid.shape[0] - 4 * cell
    assert (grid[top:, left:] == 128).all()  # every image, whole, in its place
    for boundary in (left + cell - 1, left + cell, left + 2 * cell - 1, left + 2 * cell):
        assert (grid[top * 2 // 3:top, boundary] == 255).all(), boundary  # no header crosses into the next one
    assert (grid[top:, left - 4:left] == 255).all()  # no row label runs into the images
    assert (grid[:top, left:] < 128).any() and (grid[top:, :left] < 128).any()  # and there is text


def test_grid_labels_are_drawn_without_missing_glyph_boxes():
    """Arrows, '×', accents and a prompt in another script: each drawn character is a real glyph, found on the
    pixels (a missing one is the font's box, searched for in the picture itself)."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view
    from PIL import ImageDraw

    from lora_gradio.fonts import NOTDEF, has_glyph, label_font
    from lora_gradio.inference import label_grid

    cells = [[Image.new("RGB", (64, 64), "white")] * 2] * 2
    grid = np.asarray(label_grid(cells, ["epoch 1 · step 4", "café × 2"], ["lgdemo, a 写真 → test", "Ωmega"],
                                 "epoch ↓", "sample prompt →").convert("L"))
    size = 13  # the labels' size for cells of 160 px, and the titles' (two more)
    for font in (label_font(size), label_font(size + 2)):
        box = Image.new("L", (40, 40), 255)
        ImageDraw.Draw(box).text((4, 4), NOTDEF, fill=0, font=font)
        ink = np.asarray(box)
        rows, columns = np.where(ink < 255)
        template = ink[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
        windows = sliding_window_view(grid, template.shape)
        assert not (windows == template).all(axis=(2, 3)).any()  # no box anywhere in the grid
        assert all(has_glyph(font, char) for char in "epoch ↓ sample prompt → × · café Ωmega")
    assert (grid[:40] < 128).any()  # and the titles were drawn


def test_sd_scripts_flags_are_read_and_a_wrong_one_is_named():
    import pytest

    from lora_gradio.training.sample_prompts import SampleLine, parse_sample_line

    line = parse_sample_line("ohwx, portrait --n blurry, lowres --W 768 --h 512 --s 28 --l 7.5 --d 42 --ss euler_a "
                             "--cs 2")
    assert line == SampleLine("ohwx, portrait", "blurry, lowres", 768, 512, 28, 7.5, 42, "Euler a", 2)
    assert line.described() == "768×512, 28 steps, CFG 7.5, seed 42, Euler a, CLIP skip 2, negative 'blurry, lowres'"
    assert parse_sample_line("a cat -- and a dog") == SampleLine("a cat -- and a dog")  # no flag, no split
    assert parse_sample_line("a cat --ss k_euler").sampler == "Euler"
    for wrong, message in (("a --x 3", "unknown flag --x: use --n, --w"), ("a --w 500", "--w 500 is not a multiple "
                           "of 8"), ("a --s 0", "--s 0 is outside 1–150"), ("a --l nan", "--l nan is outside 1–30"),
                           ("a --d -1", "--d -1 is outside"), ("a --ss heun", "--ss heun: use one of euler"),
                           ("a --s", "--s needs a value (steps)"), ("--w 64", "no prompt before them")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_sample_line(wrong)


def test_a_runs_samples_follow_each_lines_flags(demo_spec, demo_data, quick_config, tmp_path):
    """Flags set one sample's size, seed, steps and negative prompt; the other line keeps the run's settings; both
    render in the same round, and the grid and prompts carry the prompts without their flags."""
    from lora_gradio.errors import UserError
    from lora_gradio.training.config import apply_overrides
    from lora_gradio.training.loop import train
    from lora_gradio.training.run_folder import RunFolder

    config = apply_overrides(quick_config, {"trigger_word": "lgdemo", "sample_steps": 2, "sample_prompts": [
        "{trigger}, a red circle --w 96 --h 64 --d 5 --s 3 --n blurry", "{trigger}, a blue square"]})
    train(config, demo_spec, demo_data, tmp_path / "run")
    first, second = RunFolder(tmp_path / "run").samples_of(1)
    with Image.open(first) as image:
        assert image.size == (96, 64)
        text = image.info["parameters"]
    assert text.startswith("lgdemo, a red circle\nNegative prompt: blurry\nSteps: 3,") and "Seed: 5," in text
    with Image.open(second) as image:
        assert image.size == (64, 64)
        assert "Steps: 2," in image.info["parameters"] and f"Seed: {config.seed + 1}," in image.info["parameters"]
    assert config.prompts() == ["lgdemo, a red circle", "lgdemo, a blue square"]
    try:
        apply_overrides(config, {"sample_prompts": ["fine", "{trigger} --size 3"]})
    except UserError as exc:
        assert "sample prompt 2: unknown flag --size" in str(exc)
    else:
        raise AssertionError("an unknown flag was taken")
