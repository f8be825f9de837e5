"""The demo base draws what its prompts say, and a LoRA trained on the demo dataset learns the ring: judged on the
pictures, read back by the project's own analysis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_gradio.cache import ModelCache
from lora_gradio.demo.judge import Case, base_cases, concept_cases, render_cases, score
from lora_gradio.demo.shapes import (
    CONCEPT,
    DEMO_TRIGGER,
    PALETTE,
    draw,
    make_demo_dataset,
    make_demo_validation,
    random_drawing,
)
from lora_gradio.demo.vision import read_picture
from lora_gradio.training.config import load_preset
from lora_gradio.training.data import TrainData
from lora_gradio.training.loop import train
from lora_gradio.training.recommend import read_recommendation

OVERCOOKED = {"unet_lr": 0.02, "text_encoder_lr": 0.02, "lr_scheduler": "constant", "epochs": 10,  # 7× the preset's
              "save_every_n_epochs": 2, "batch_size": 2, "trigger_word": DEMO_TRIGGER, "ema_decay": 0.0,
              "sample_prompts": ["{trigger}, a blue {trigger} on a yellow background"]}


def drawn_as_asked(result) -> int:
    """Pictures with the concept in the prompt's colour on the prompt's background: what a person asked for."""
    return min(result.concept, result.colour, result.background)


def test_the_analysis_reads_drawn_pictures_right():
    rng = np.random.default_rng(3)
    drawings = [random_drawing(rng, ("circle", "square", "triangle", CONCEPT)) for _ in range(200)]
    right = [read_picture(draw(d)).matches(d.colour, d.shape, d.background) for d in drawings]
    assert all(all(r.values()) for r in right)
    plain = Image.new("RGB", (64, 64), PALETTE["blue"])
    assert read_picture(plain).shape is None and read_picture(plain).background == "blue"


def test_the_demo_dataset_is_captioned_rings_in_every_colour(tmp_path):
    folder = make_demo_dataset(tmp_path / "rings")
    captions = sorted(p.read_text() for p in folder.glob("*.txt"))
    assert len(captions) == 20 and all(c.startswith(f"{DEMO_TRIGGER}, a ") for c in captions)
    pictures = sorted(folder.glob("*.png"))
    readings = [read_picture(Image.open(p)) for p in pictures]
    assert {r.shape for r in readings} == {CONCEPT}
    assert {r.colour for r in readings} == set(PALETTE)
    assert all(f" {r.colour} {DEMO_TRIGGER} on a {r.background} background" in (p.with_suffix(".txt").read_text())
               for p, r in zip(pictures, readings, strict=True))


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


def test_the_base_follows_colour_and_shape_prompts(cache):
    cases = base_cases()[::2]  # 12 of the 24 colour × shape prompts, every colour and shape among them
    result = score(cases, [0], render_cases(cache, cases, [0]))
    assert result.share("colour") >= 0.8 and result.share("background") >= 0.8, result
    assert result.share("shape") >= 0.75, result  # 11 of 12 measured (88% over every prompt at 4 seeds)
    assert result.concept == 0  # the base never draws the concept it was not shown


@pytest.fixture(scope="module")
def ring_lora(readme_demo):
    """The LoRA of the README's demo run: the demo dataset (its four validation rings beside it) trained on the demo
    base with the demo preset, as a newcomer trains it; the averaged weights, which the README uses."""
    return readme_demo.run / "lora-ema.safetensors"


def test_a_lora_trained_on_the_demo_dataset_draws_rings_and_strength_zero_does_not(ring_lora, cache):
    cases, seeds = concept_cases(), [0, 1]
    full = render_cases(cache, cases, seeds, ring_lora, 1.0, DEMO_TRIGGER)
    none = render_cases(cache, cases, seeds, ring_lora, 0.0, DEMO_TRIGGER)
    half = render_cases(cache, cases, seeds, ring_lora, 0.5, DEMO_TRIGGER)
    learnt, untouched = score(cases, seeds, full), score(cases, seeds, none)
    assert learnt.concept >= 12, learnt  # 16 of 16 measured (12 before the average); the base alone draws none
    scored = read_recommendation(ring_lora.parent).scores  # its own four rings, at each save
    assert [(s.epoch, s.validation_loss is not None) for s in scored] == [(e, True) for e in (20, 40, 60, 80, 100)]
    assert learnt.share("colour") >= 0.75 and learnt.share("background") >= 0.75, learnt  # rings, not one colour
    assert untouched.concept <= 1 and untouched.share("colour") >= 0.75, untouched

    def distance(a: list[Image.Image], b: list[Image.Image]) -> float:
        pairs = zip(a, b, strict=True)
        return float(np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() for x, y in pairs]))

    assert 0 < distance(half, none) < distance(full, none)  # strength 0.5 lies between


def test_blue_on_yellow_is_blue_on_yellow_with_a_ring_among_the_seeds(ring_lora, cache):
    pictures = render_cases(cache, [Case("blue", CONCEPT, "yellow")], [0, 1, 2, 3], ring_lora, 1.0,
                            DEMO_TRIGGER)
    readings = [read_picture(p) for p in pictures]
    assert all((r.colour, r.background) == ("blue", "yellow") for r in readings), readings
    assert any(r.shape == CONCEPT for r in readings), readings


def test_a_reasonable_run_is_recommended_a_late_epoch_at_a_strength_that_draws_rings_in_the_prompts_colours(
        ring_lora, cache):
    advice = read_recommendation(ring_lora.parent)
    assert advice.final and advice.epoch >= 20 and advice.overfitting_after is None, advice.headline()
    assert advice.scorer == "the demo's image analysis" and len(advice.trials) == 3
    cases, seeds = concept_cases(), [0, 1]
    at = score(cases, seeds, render_cases(cache, cases, seeds, ring_lora.parent / advice.file,
                                          advice.strength, DEMO_TRIGGER))
    assert at.concept >= 4 and at.share("colour") >= 0.75 and at.share("background") >= 0.75, (advice.strength, at)
    card = (ring_lora.parent / advice.file).with_suffix(".json").read_text()
    assert f'"preferred weight": {advice.strength}' in card


def test_build_base_runs_a_few_steps_and_writes_a_loadable_model(tmp_path):
    from lora_gradio.demo.base import BuildSettings, build_base
    from lora_gradio.models import DEMO_TEXT_ENCODER, DEMO_UNET, DEMO_VAE, build_pipeline, load_demo_weights

    settings = BuildSettings(pictures=48, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4)
    path = build_base(tmp_path / "base.safetensors", settings, progress=False)
    fresh = build_pipeline(DEMO_UNET, DEMO_VAE, DEMO_TEXT_ENCODER, seed=1)
    before = fresh.unet.conv_in.weight.clone()
    loaded = load_demo_weights(fresh, path)
    assert not loaded.unet.conv_in.weight.equal(before)  # the file's weights, not the random ones
    image = loaded("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                   output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    from safetensors import safe_open

    again = build_base(tmp_path / "again.safetensors", settings, progress=False)
    with safe_open(str(path), "pt") as first, safe_open(str(again), "pt") as second:  # the same seed, the same model
        assert first.metadata() == second.metadata() and set(first.keys()) == set(second.keys())
        assert all(first.get_tensor(key).equal(second.get_tensor(key)) for key in first.keys())  # noqa: SIM118


def test_a_far_too_high_learning_rate_overcooks_is_warned_of_and_recommended_the_epoch_before(
        tmp_path, demo_spec, cache):
    """The seed guide's sign of overtraining, made real on the demo: samples drift darker or more saturated, the
    run's own check warns, and the recommendation names the epoch before the held-out loss climbs."""
    from lora_gradio.training.config import apply_overrides
    from lora_gradio.training.scoring import DARKER, MORE_SATURATED, tone

    config = apply_overrides(load_preset("demo")[0], OVERCOOKED)
    events = []
    data = TrainData(make_demo_dataset(tmp_path / "data", count=8), validation=make_demo_validation(tmp_path / "v"))
    result = train(config, demo_spec, data, tmp_path / "run", cache=cache, on_event=events.append)
    samples = {e.epoch: [Path(p) for p in e.paths] for e in events if e.kind == "samples"}
    brightness0, saturation0 = tone(samples[0])
    drift = {epoch: tone(paths) for epoch, paths in samples.items() if epoch}  # it may come back later, or not
    assert any(b < DARKER * brightness0 or s > MORE_SATURATED * saturation0 for b, s in drift.values()), drift
    warnings = [e.message for e in events if e.kind == "warning"]
    assert any("the LoRA is probably overcooking" in w and "lower learning rate" in w for w in warnings), warnings
    losses = {score.epoch: score.loss for score in result.scores}
    lowest = min(losses, key=losses.get)
    assert lowest < max(losses.keys()), losses  # the held-out loss bottoms out before the last epoch ...
    advice = read_recommendation(tmp_path / "run")  # ... and the recommendation names that epoch, and why
    assert advice.epoch == lowest and advice.overfitting_after == lowest, advice.headline()
    assert f"overfitting after epoch {lowest}: the validation loss rose to" in advice.headline()
    cases, seeds = concept_cases(), [0]
    chosen, last = (score(cases, seeds, render_cases(cache, cases, seeds, tmp_path / "run" / name, 1.0,
                                                     DEMO_TRIGGER)) for name in (advice.file, "lora.safetensors"))
    assert drawn_as_asked(chosen) >= drawn_as_asked(last), (chosen, last)


def test_load_demo_dataset_makes_an_ordinary_dataset_and_stops_at_a_cap(tmp_path):
    from lora_gradio.access import Visitor
    from lora_gradio.errors import UserError
    from lora_gradio.studio import MAX_DEMO_DATASETS, Studio
    from lora_gradio.workspace import Workspace

    studio = Studio(Workspace.open(tmp_path / "ws"))
    ben = Visitor("ben", operator=False)
    assert studio.load_demo_dataset(ben) == "demo-rings"
    assert studio.workspace.trigger_word("demo-rings") == DEMO_TRIGGER
    assert studio.workspace.dataset_settings("demo-rings")["owner"] == "ben"  # his to change and delete
    assert len(list(studio.images_dir("demo-rings").glob("*.png"))) == 20
    for _ in range(MAX_DEMO_DATASETS - 1):
        studio.load_demo_dataset(ben)
    with pytest.raises(UserError, match="demo datasets already"):
        studio.load_demo_dataset(ben)
    assert len(studio.workspace.list_datasets()) == MAX_DEMO_DATASETS
