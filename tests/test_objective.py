"""The loss and noise knobs sd-scripts users bring, checked against their formulas: multi-resolution noise, Huber and
smooth-L1 losses on their schedules, debiased estimation; and a run that uses them all trains and says so."""

import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from lora_gradio.training.config import TrainConfig, apply_overrides
from lora_gradio.training.loop import train
from lora_gradio.training.objective import Objective, denoising_loss, huber_threshold, training_noise


def kohya_pyramid(noise, generator, iterations, discount):
    """kohya's pyramid_noise_like as sd-scripts documents it (noise levels at r**i smaller, r uniform in [2, 4),
    upsampled bilinearly, weighted discount**i, rescaled to unit std), drawing its randoms from ``generator``."""
    b, c, w, h = noise.shape
    upsample = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand((), generator=generator).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += upsample(torch.randn(b, c, wn, hn, generator=generator)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_multires_noise_is_kohyas_formula_on_a_fixed_seed():
    latents = torch.zeros(4, 4, 64, 48)
    multires = TrainConfig(multires_noise_iterations=6, multires_noise_discount=0.3)
    ours = training_noise(latents, torch.Generator().manual_seed(5), multires)
    generator = torch.Generator().manual_seed(5)
    plain = torch.randn(latents.shape, generator=generator)
    torch.testing.assert_close(ours, kohya_pyramid(plain.clone(), generator, 6, 0.3))
    assert ours.std() == pytest.approx(1.0, abs=1e-5)
    coarse = ours.mean((2, 3)).std() / plain.mean((2, 3)).std()
    assert coarse > 2  # what it is for: more of the noise in the picture's overall level than plain noise has
    offset = training_noise(latents, torch.Generator().manual_seed(5), TrainConfig(noise_offset=0.1))
    assert not torch.equal(offset, plain)
    assert torch.equal(training_noise(latents, torch.Generator().manual_seed(5), TrainConfig()), plain)  # off: plain


def losses(objective, diff, timesteps):
    scheduler = DDPMScheduler()
    target = torch.zeros(len(timesteps), 4, 8, 8)
    return denoising_loss(target + diff, target, target, timesteps, scheduler, objective, [1.0] * len(timesteps))


@pytest.mark.parametrize("schedule", ["constant", "snr", "exponential"])
def test_huber_is_mse_as_c_grows_and_counts_big_errors_less_at_small_c(schedule):
    generator = torch.Generator().manual_seed(0)
    diff = torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 400, 999])
    mse = losses(Objective(), diff, timesteps)
    if schedule != "exponential":  # exponential starts at c = 1 whatever huber_c is
        torch.testing.assert_close(losses(Objective(loss_type="huber", huber_c=1e4, huber_schedule=schedule), diff,
                                          timesteps), mse, rtol=1e-4, atol=0)
    small = Objective(loss_type="huber", huber_c=0.01, huber_schedule="constant")
    ratio = losses(small, diff * 10, timesteps) / losses(small, diff, timesteps)
    assert torch.all((ratio > 9) & (ratio < 11))  # linear in the error, where L2 grows 100×
    smooth = Objective(loss_type="smooth_l1", huber_c=0.1, huber_schedule="constant")
    torch.testing.assert_close(losses(smooth, diff, timesteps),
                               (2 * (torch.sqrt(diff**2 + 0.01) - 0.1)).mean((1, 2, 3)))


def test_huber_c_follows_sd_scripts_schedules():
    scheduler = DDPMScheduler()
    timesteps = torch.tensor([0, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    sigmas = ((1 - alphas) / alphas).sqrt()
    torch.testing.assert_close(huber_threshold(Objective(huber_c=0.2, huber_schedule="snr"), scheduler, timesteps),
                               0.8 / (1 + sigmas) ** 2 + 0.2)
    exponential = huber_threshold(Objective(huber_c=0.2, huber_schedule="exponential"), scheduler, timesteps)
    torch.testing.assert_close(exponential, torch.exp(torch.log(torch.tensor(0.2)) * timesteps / 1000))
    assert exponential[0] == 1 and huber_threshold(Objective(huber_c=0.2, huber_schedule="constant"), scheduler,
                                                   timesteps).tolist() == pytest.approx([0.2] * 3)


def test_debiased_estimation_weights_by_one_over_root_snr():
    timesteps = torch.tensor([1, 300, 900])
    diff = torch.ones(3, 4, 8, 8)
    alphas = DDPMScheduler().alphas_cumprod[timesteps]
    snr = (alphas / (1 - alphas)).clamp(max=1000)
    torch.testing.assert_close(losses(Objective(debiased_estimation=True), diff, timesteps), 1 / snr.sqrt())


def test_a_run_with_every_new_knob_trains_repeats_and_records_them(demo_spec, demo_data, quick_config, tmp_path,
                                                                    one_thread):
    config = apply_overrides(quick_config, {"multires_noise_iterations": 6, "multires_noise_discount": 0.1,
                                            "loss_type": "huber", "huber_c": 0.2, "debiased_estimation": True,
                                            "batch_size": 2})
    first = train(config, demo_spec, demo_data, tmp_path / "a")
    second = train(config, demo_spec, demo_data, tmp_path / "b")
    assert first.losses == second.losses and all(0 < loss < 10 for loss in first.losses)  # the noise is the seed's
    plain = train(apply_overrides(quick_config, {"batch_size": 2}), demo_spec, demo_data, tmp_path / "c")
    assert plain.losses != first.losses
    with safe_open(str(first.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_multires_noise_iterations"], metadata["ss_multires_noise_discount"]) == ("6", "0.1")
    assert (metadata["ss_loss_type"], metadata["ss_huber_c"], metadata["ss_huber_schedule"]) == ("huber", "0.2", "snr")
    assert metadata["ss_debiased_estimation"] == "True"
    assert json.loads(metadata["ss_network_args"]) == {}
