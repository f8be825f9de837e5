"""EMA of the LoRA weights on the demo model: the average equals the hand computation, it is saved beside every file,
the samples and scores say they are of it, and a resume continues it exactly."""

import threading

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gradio.training import kohya
from lora_gradio.training.config import apply_overrides
from lora_gradio.training.loop import Trainer, train


def test_the_saved_average_is_the_hand_computation_over_three_steps(demo_spec, demo_data, quick_config, tmp_path,
                                                                      monkeypatch, one_thread):
    config = apply_overrides(quick_config, {"ema_decay": 0.2, "max_train_steps": 3, "batch_size": 2,
                                            "save_every_n_epochs": 0, "save_dtype": "fp32", "unet_lr": 1e-3})
    trained = []  # the weights after each step, as kohya tensors
    step = Trainer.train_step

    def recording(self, batches):
        loss = step(self, batches)
        weights = kohya.lora_state_dict({"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder},
                                        torch.float32)
        trained.append({k: v.clone() for k, v in weights.items()})  # fp32 on the CPU: the live tensors themselves
        return loss

    monkeypatch.setattr(Trainer, "train_step", recording)
    result = train(config, demo_spec, demo_data, tmp_path / "run")
    assert len(trained) == 3 and result.lora_path.name == "lora-ema.safetensors"
    # step n averages at min(decay, (1 + n') / (10 + n')), n' = n - 1; the first step copies
    decays = [0.0, min(0.2, 2 / 11), min(0.2, 3 / 12)]
    expected = dict(trained[0])
    for decay, weights in zip(decays[1:], trained[1:], strict=True):
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights if not k.endswith(".alpha")}
    average, last = load_file(result.lora_path), load_file(tmp_path / "run" / "lora.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(average[key], value, rtol=1e-5, atol=1e-7)
        assert torch.equal(last[key], trained[-1][key])  # the trained file is the last step's weights
    ups = [k for k in expected if k.endswith("lora_up.weight")]
    assert sum((average[k] - last[k]).abs().sum() for k in ups) > 0.01 * sum(last[k].abs().sum() for k in ups)
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_ema_decay"], metadata["lora_gradio_weights"]) == ("0.2", "ema")
    plain = train(apply_overrides(config, {"ema_decay": 0.0}), demo_spec, demo_data, tmp_path / "plain")
    assert plain.lora_path.name == "lora.safetensors"  # averaging leaves the training itself untouched
    assert all(torch.equal(value, last[key]) for key, value in load_file(plain.lora_path).items())


def test_samples_and_scores_are_of_the_average_and_a_resume_continues_it(demo_spec, demo_data, quick_config, tmp_path,
                                                                           one_thread):
    config = apply_overrides(quick_config, {"ema_decay": 0.9, "epochs": 2, "batch_size": 2, "validation_images": 2,
                                            "sample_prompts": ["lgdemo, a red circle"], "sample_steps": 2})
    events = []
    whole = train(config, demo_spec, demo_data, tmp_path / "whole", on_event=events.append)
    names = sorted(path.name for path in (tmp_path / "whole").glob("*.safetensors"))
    assert names == ["lora-000001-ema.safetensors", "lora-000001.safetensors", "lora-ema.safetensors",
                     "lora.safetensors"]
    samples = [e.message for e in events if e.kind == "samples"]
    assert samples == ["Samples for epoch 0 (EMA weights)", "Samples for epoch 1 (EMA weights)",
                       "Samples for epoch 2 (EMA weights)"]
    assert all(e.message.endswith("(EMA weights)") for e in events if e.kind == "validation")
    assert [s.file for s in whole.scores] == ["lora-000001-ema.safetensors", "lora-ema.safetensors"]
    assert whole.recommendation.file.endswith("-ema.safetensors")
    with safe_open(str(tmp_path / "whole" / "lora.safetensors"), "pt") as handle:
        assert "ss_validation_loss" not in handle.metadata()  # scored were the averaged weights, not these
    with safe_open(str(whole.lora_path), "pt") as handle:
        assert float(handle.metadata()["ss_validation_loss"]) == round(whole.scores[-1].loss, 6)

    stop = threading.Event()
    train(config, demo_spec, demo_data, tmp_path / "cut", stop=stop,
          on_event=lambda e: e.kind == "step" and e.step == 3 and stop.set())
    resumed = train(config, demo_spec, demo_data, tmp_path / "cut", resume=True)
    assert resumed.losses == whole.losses
    for name in ("lora-ema.safetensors", "lora.safetensors"):
        ours, unbroken = load_file(tmp_path / "cut" / name), load_file(tmp_path / "whole" / name)
        assert all(torch.equal(ours[k], unbroken[k]) for k in unbroken)
