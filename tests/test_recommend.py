"""The recommended epoch and strength: chosen from the scores by the rules the README states, kept in
recommendation.json, and shown on the card, in the runs list and on the API; the CLIP scorer runs end to end with a
tiny random CLIP. Runs on the demo base judge what the recommended file draws (tests/test_demo.py)."""

from __future__ import annotations

import json

import pytest

from lora_gradio.events import JobEvent
from lora_gradio.training.config import apply_overrides, load_preset
from lora_gradio.training.recommend import (
    Trial,
    choose_strength,
    read_recommendation,
    recommend,
    write_recommendation,
)
from lora_gradio.training.run_folder import RECOMMENDATION_FILE
from lora_gradio.training.scoring import DemoEvaluator, EpochScores, Marks, without_trigger

DEMO_JUDGE = DemoEvaluator("lgring")
BASE = Marks(likeness=0.0, following=1.0)  # the base model: no ring, every colour right


def epochs(losses: list[float | None], likeness: list[float | None] | None = None,
           following: list[float | None] | None = None, health: list[float] | None = None) -> list[EpochScores]:
    """Saved epochs 1..n with these scores; the last is the final file."""
    count = len(losses)
    likeness, following = likeness or [None] * count, following or [None] * count
    health = health or [1.0] * count
    return [EpochScores(i + 1, "lora.safetensors" if i == count - 1 else f"lora-{i + 1:06d}.safetensors", loss,
                        likeness[i], following[i], health[i], "" if health[i] >= 1 else "darker")
            for i, loss in enumerate(losses)]


def test_an_overtrained_run_is_recommended_the_epoch_before_the_damage_and_says_so():
    scores = epochs([0.20, 0.15, 0.25, 0.40, 0.50], [0.5, 1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 0.5, 0.5])
    advice = recommend(scores, BASE, DEMO_JUDGE)
    assert (advice.epoch, advice.file, advice.overfitting_after) == (2, "lora-000002.safetensors", 2)
    text = " ".join(advice.reasons)
    assert "validation loss 0.1500 is the lowest" in text and "overfitting after epoch 2" in text
    assert "rose to 0.5000 by epoch 5" in text
    assert advice.headline().startswith("Recommended so far: epoch 2 (lora-000002.safetensors), because")


def test_a_steady_run_is_recommended_late_without_an_overfitting_reason():
    advice = recommend(epochs([0.070, 0.068, 0.064, 0.062, 0.058, 0.060]), BASE, None)
    assert advice.epoch == 5 and advice.overfitting_after is None  # 0.060 is within noise of 0.058
    assert not any("overfitting" in reason for reason in advice.reasons)


def test_epochs_that_darken_or_lose_the_prompt_are_passed_over_even_at_a_lower_loss():
    scores = epochs([0.30, 0.20, 0.10, 0.05], following=[1.0, 1.0, 0.25, 1.0], health=[1.0, 1.0, 1.0, 0.6])
    advice = recommend(scores, BASE, DEMO_JUDGE)
    assert advice.epoch == 2
    text = " ".join(advice.reasons)
    assert "epochs 3, 4 do not" in text and "epoch 3's samples stop following the prompt" in text
    assert "epoch 4's samples are darker" in text


def test_without_held_out_images_the_epoch_is_where_likeness_stops_improving():
    advice = recommend(epochs([None] * 5, [0.0, 0.5, 1.0, 1.0, 1.0], [1.0] * 5), BASE, DEMO_JUDGE)
    assert advice.epoch == 3 and "likeness stops improving there (100%" in advice.reasons[0]
    assert "no held-out images" in advice.reasons[0]


def test_the_strength_is_the_lowest_that_reaches_full_likeness_and_keeps_the_prompt():
    trials = [Trial(0.6, 0.25, 1.0), Trial(0.8, 1.0, 1.0), Trial(1.0, 1.0, 1.0), Trial(1.2, 1.0, 0.5)]
    assert choose_strength(trials, BASE, DEMO_JUDGE)[0] == 0.8
    trials = [Trial(0.6, 0.5, 1.0), Trial(0.8, 0.75, 0.25), Trial(1.0, 1.0, 1.0), Trial(1.2, 1.0, 1.0)]
    assert choose_strength(trials, BASE, DEMO_JUDGE)[0] == 1.0  # 0.8 is nearly as like, but loses the prompt
    trials = [Trial(0.6, 1.0, 1.0), Trial(0.8, 0.5, 1.0), Trial(1.0, 1.0, 1.0), Trial(1.2, 1.0, 1.0)]
    assert choose_strength(trials, BASE, DEMO_JUDGE)[0] == 1.0  # a lucky sample at 0.6 is not a trend
    strength, why = choose_strength([Trial(s, 0.0, 1.0) for s in (0.6, 0.8, 1.0, 1.2)], BASE, DEMO_JUDGE)
    assert strength == 1.0 and "train longer" in why  # nothing learnt: no strength to recommend but the default


def test_the_recommendation_file_round_trips_and_a_damaged_one_reads_as_none(tmp_path):
    trials = [Trial(s, 1.0, 1.0) for s in (0.6, 0.8, 1.0, 1.2)]
    advice = recommend(epochs([0.2, 0.1], [0.5, 1.0], [1.0, 1.0]), BASE, DEMO_JUDGE, trials)
    write_recommendation(tmp_path, advice)
    kept = json.loads((tmp_path / RECOMMENDATION_FILE).read_text())
    assert {"epoch", "file", "strength", "reasons", "scores", "headline"} <= set(kept)
    assert kept["scores"][1] == {"epoch": 2, "file": "lora.safetensors", "validation_loss": 0.1, "likeness": 1.0,
                                 "following": 1.0, "health": 1.0, "health_note": ""}
    again = read_recommendation(tmp_path)
    assert again.record() == advice.record() and again.final and again.strength == 0.6
    (tmp_path / RECOMMENDATION_FILE).write_text("{not json")
    assert read_recommendation(tmp_path) is None


def test_the_demo_judge_reads_likeness_and_following_from_the_pictures():
    from lora_gradio.demo.shapes import Drawing, draw

    ring = draw(Drawing("blue", "ring", "yellow", (32, 32), 20))
    circle = draw(Drawing("blue", "circle", "red", (32, 32), 20))
    prompts = ["lgring, a blue lgring on a yellow background"] * 2
    assert DEMO_JUDGE.marks(prompts, [ring, circle]) == Marks(0.5, 0.5)
    assert without_trigger(prompts[0], "lgring") == "a blue on a yellow background"


@pytest.fixture
def tiny_clip(tmp_path):
    """A random CLIP with a bundled tokenizer, saved as a local folder the way a downloaded one is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from lora_gradio.models import SD15_CONFIG_DIR

    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                     "num_hidden_layers": 2, "vocab_size": 49408},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer"))
    processor.save_pretrained(folder)
    return folder


def test_the_clip_scorer_judges_every_saved_epoch_and_the_strengths_end_to_end(tiny_clip, demo_spec, tmp_path):
    from lora_gradio.demo.shapes import DEMO_TRIGGER, make_demo_dataset
    from lora_gradio.training.loop import train

    config = apply_overrides(load_preset("demo")[0], {
        "epochs": 2, "save_every_n_epochs": 1, "trigger_word": DEMO_TRIGGER, "scorer": str(tiny_clip),
        "sample_steps": 2, "sample_prompts": ["{trigger}, a blue {trigger} on a yellow background"]})
    said = []
    result = train(config, demo_spec, make_demo_dataset(tmp_path / "data", count=4), tmp_path / "run",
                   on_event=said.append)
    kept = read_recommendation(tmp_path / "run")
    assert kept.final and kept.scorer == "CLIP" and not kept.shares
    assert [score.epoch for score in kept.scores] == [1, 2]
    assert all(-1 <= score.likeness <= 1 and -1 <= score.following <= 1 for score in kept.scores)
    assert [trial.strength for trial in kept.trials] == [0.6, 0.8, 1.0]
    assert all(trial.likeness is not None for trial in kept.trials)
    assert result.recommendation.record() == kept.record()
    cards = json.loads((tmp_path / "run" / kept.file).with_suffix(".json").read_text())
    assert cards["preferred weight"] == kept.strength
    assert any(event.kind == "recommendation" and event.record["final"] for event in said)


def test_an_unreachable_clip_left_to_auto_is_skipped_with_a_warning(monkeypatch):
    from lora_gradio.training.setup import make_evaluator

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    said: list[JobEvent] = []
    config = apply_overrides(load_preset("demo")[0], {"sample_prompts": ["a photo"], "scorer": "auto"})
    assert make_evaluator(config, False, [], said.append) is None
    assert "No sample scorer" in said[0].message and "validation loss alone" in said[0].message
    with pytest.raises(Exception, match="Hugging Face Hub"):  # asked for by name, it must be had
        make_evaluator(apply_overrides(config, {"scorer": "clip"}), False, [], said.append)
