"""Held-out images and the validation loss: honest splits, scores that repeat, and early stopping, on the demo base."""

import json

import pytest

from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.errors import UserError
from lora_gradio.lora_map import read_metadata
from lora_gradio.training.config import apply_overrides, load_preset
from lora_gradio.training.data import TrainData, held_out_count, split_held_out
from lora_gradio.training.loop import Trainer, train
from lora_gradio.training.recommend import read_recommendation
from lora_gradio.ui.charts import loss_chart

OVERCOOKED_LR = 0.02  # the demo preset's network at this rate overfits within a few epochs
HELD = {"validation_images": -1}  # the default of every preset but the demo's, whose dataset brings its own


@pytest.fixture
def held_config(quick_config):
    """The quick demo run, holding images out as a real dataset's run does."""
    return apply_overrides(quick_config, HELD)


def test_the_default_holds_out_a_tenth_of_fifteen_or_more_from_two_to_five():
    assert [held_out_count(n, -1) for n in (8, 14, 15, 20, 30, 44, 60, 200)] == [0, 0, 2, 2, 3, 4, 5, 5]
    assert held_out_count(10, 3) == 3 and held_out_count(40, 0) == 0  # a chosen number is taken as it is
    images = list(range(20))
    train_part, held = split_held_out(images, -1, seed=42)
    assert len(held) == 2 and sorted(train_part + held) == images and not set(held) & set(train_part)
    assert split_held_out(images, -1, seed=42) == (train_part, held)  # the same run holds out the same images
    assert {tuple(split_held_out(images, -1, seed)[1]) for seed in range(10)} != {tuple(held)}
    with pytest.raises(UserError, match="leaves fewer than 5 to train on"):
        split_held_out(list(range(8)), 4, seed=1)


def unique_captions(folder, trigger="lgdemo"):
    """Give every image a caption of its own, so a batch's captions say which images it holds."""
    for index, caption in enumerate(sorted(folder.glob("*.txt"))):
        caption.write_text(f"{trigger}, picture {index}, {caption.read_text(encoding='utf-8')}", encoding="utf-8")
    return folder


def test_held_out_images_never_train_and_their_loss_repeats_exactly(demo_spec, held_config, tmp_path, monkeypatch,
                                                                     one_thread):
    data = TrainData(unique_captions(make_demo_dataset(tmp_path / "data", count=16)))
    config = apply_overrides(held_config, {"epochs": 2})
    held = {image.caption for image in data.scan(config).held}
    assert len(held) == 2
    seen, original = [], Trainer.train_step

    def recording(self, batches):
        seen.extend(self.cached[index].caption for batch in batches for index in batch)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", recording)
    first = train(config, demo_spec, data, tmp_path / "first")
    trained = set(seen)
    assert len(trained) == 14 and not trained & held  # every other image trained, no held-out one ever did
    second = train(config, demo_spec, data, tmp_path / "second")
    assert [score.loss for score in first.scores] == [score.loss for score in second.scores]  # to the last bit
    assert [(s.epoch, s.file) for s in first.scores] == [(1, "lora-000001.safetensors"), (2, "lora.safetensors")]
    metadata = read_metadata(tmp_path / "first" / "lora-000001.safetensors")
    names = json.loads(metadata["ss_validation_images"])
    assert len(names) == 2 and all(name.endswith(".png") for name in names)
    assert float(metadata["ss_validation_loss"]) == pytest.approx(first.scores[0].loss, abs=1e-6)
    progress = json.loads((tmp_path / "first" / "progress.json").read_text(encoding="utf-8"))
    assert [row[2] for row in progress["validation"]] == [score.loss for score in first.scores]
    chart = loss_chart([(step + 1, loss, None) for step, loss in enumerate(first.losses)], 4,
                       [(s.step, s.epoch, s.loss) for s in first.scores])
    assert chart.count('class="validation-point"') == 2 and "◆ validation" in chart


def test_under_fifteen_images_nothing_is_held_out_and_the_plan_says_so(demo_spec, held_config, tmp_path):
    from lora_gradio.studio import Studio
    from lora_gradio.workspace import Workspace

    studio = Studio(Workspace.open(tmp_path / "ws"))
    for name, count in (("small", 8), ("enough", 16), ("more", 6)):
        studio.create_dataset(name)
        make_demo_dataset(studio.images_dir(name), count=count)
    small = studio.plan_training("small", "demo", held_config).estimate.markdown()
    assert "No held-out images: 8 images is under 15, so every one trains" in small
    enough = studio.plan_training("enough", "demo", held_config)
    assert "Held out for validation, 2 of 16 images: " in enough.estimate.markdown()
    assert enough.estimate.images == 14  # what an epoch shows: the held-out images are not in it
    other = studio.plan_training("small", "demo", held_config, validation="more").estimate.markdown()
    assert "Validating on dataset more (6 images)" in other
    off = studio.plan_training("enough", "demo", apply_overrides(held_config, {"validation_images": 0}))
    assert "Held-out images is 0" in off.estimate.markdown() and off.estimate.images == 16
    with pytest.raises(UserError, match="validation dataset must be another dataset"):
        studio.plan_training("small", "demo", held_config, validation="small")
    demo = studio.load_demo_dataset()  # every ring trains; four rings of its own are scored
    shown = studio.plan_training(demo, "demo", load_preset("demo")[0]).estimate
    assert f"Validating on dataset {demo}/validation (4 images)" in shown.markdown() and shown.images == 20
    result = train(held_config, demo_spec, TrainData(studio.images_dir("small")), tmp_path / "run")
    assert result.scores == [] and "validation" not in result.summary()
    assert not any(key.startswith("ss_validation") for key in read_metadata(result.lora_path))


def test_early_stopping_stops_keeps_and_names_the_best_epoch(demo_spec, quick_config, tmp_path):
    config = apply_overrides(load_preset("demo")[0], {
        "epochs": 8, "batch_size": 4, "sample_prompts": [], "save_every_n_epochs": 1, "unet_lr": OVERCOOKED_LR,
        "lr_scheduler": "constant",
        "early_stopping_patience": 2, **HELD})
    said = []
    result = train(config, demo_spec, make_demo_dataset(tmp_path / "data", count=16), tmp_path / "run",
                   on_event=said.append)
    losses = [score.loss for score in result.scores]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert result.stopped_early and not result.stopped and result.epochs == best + 3 < 8  # two saves past the best
    assert all(loss >= losses[best] for loss in losses[best + 1:])
    kept = tmp_path / "run" / result.scores[best].file
    assert kept.is_file() and result.lora_path.is_file()
    note = next(event.message for event in said if event.message.startswith("Stopping early"))
    assert f"The best is epoch {best + 1} ({kept.name}" in note and "stopped early" in result.summary()
    assert 0 < result.checking_s < result.seconds  # every save's validation, in the run's own time
    assert f"took {result.checking_s:.1f} s of the run's {result.seconds:.0f} s" in result.summary()
    advice = read_recommendation(tmp_path / "run")  # kept, and recommended
    assert (advice.epoch, advice.file, advice.final) == (best + 1, kept.name, True)
