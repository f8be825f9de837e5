"""A run's TensorBoard log, read back from its event file: sd-scripts' tag names, every step's loss and rates, the
held-out loss and the samples; a W&B log asked for without W&B installed is a clear refusal."""

import sys

import pytest

from lora_gradio.demo.shapes import make_demo_validation
from lora_gradio.errors import UserError
from lora_gradio.training.config import apply_overrides
from lora_gradio.training.data import TrainData
from lora_gradio.training.loop import train


def test_a_tensorboard_log_holds_each_steps_loss_rates_held_out_loss_and_samples(demo_spec, demo_data, quick_config,
                                                                                   tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = apply_overrides(quick_config, {
        "log_with": "tensorboard", "epochs": 2, "batch_size": 4, "train_text_encoder": True, "unet_lr": 1e-3,
        "text_encoder_lr": 2.5e-4, "lr_scheduler": "linear", "sample_steps": 2, "sample_prompts": ["{trigger}, a ring"],
        "trigger_word": "lgdemo"})
    data = TrainData(demo_data, validation=make_demo_validation(tmp_path / "v"))
    events = []
    result = train(config, demo_spec, data, tmp_path / "run", on_event=events.append)
    log = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"images": 0, "scalars": 0})
    log.Reload()
    tags = log.Tags()
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch_average",
            "loss/validation/epoch_average"} <= set(tags["scalars"])
    current = log.Scalars("loss/current")
    assert [point.step for point in current] == list(range(1, result.steps + 1))
    assert [point.value for point in current] == pytest.approx(result.losses, rel=1e-6)
    unet, text = log.Scalars("lr/unet"), log.Scalars("lr/textencoder")
    assert unet[0].value > unet[-1].value  # the linear schedule falls ...
    assert [t.value for t in text] == pytest.approx([u.value / 4 for u in unet], rel=1e-6)  # ... for both parts
    first_epoch = result.losses[:result.steps // 2]
    assert log.Scalars("loss/epoch_average")[0].value == pytest.approx(sum(first_epoch) / len(first_epoch), rel=1e-6)
    held_out = [e.loss for e in events if e.kind == "validation"]
    assert [point.value for point in log.Scalars("loss/validation/epoch_average")] == pytest.approx(held_out)
    samples = log.Images("samples/0")
    assert [image.step for image in samples] == [0, result.steps // 2, result.steps]  # the base, then each save
    assert (samples[0].width, samples[0].height) == (64, 64)


def test_a_wandb_log_without_wandb_installed_says_how_to_get_it(demo_spec, demo_data, quick_config, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this machine has
    with pytest.raises(UserError, match="pip install wandb"):
        train(apply_overrides(quick_config, {"log_with": "wandb"}), demo_spec, demo_data, tmp_path / "run")
