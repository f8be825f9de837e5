"""What a step minimises: SD's denoising objective, with min-SNR weighting and weights per image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


def training_noise(latents: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    """The noise a step adds, from the run's own generator (a resume continues its stream): Gaussian, plus a
    per-channel constant scaled by ``offset`` when set, which lets the LoRA learn darker and brighter pictures."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    if offset:
        shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=generator.device)
        noise += offset * shift.to(latents)
    return noise


def snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for noise prediction, / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def denoising_loss(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   scheduler: DDPMScheduler, min_snr_gamma: float, weights: list[float]) -> torch.Tensor:
    """Each sample's loss: the error against the noise (or the velocity, for v-prediction models), times its
    weight (prior preservation weighs class images apart) and its min-SNR weight when ``min_snr_gamma`` is set."""
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
    if any(weight != 1.0 for weight in weights):
        loss = loss * torch.tensor(weights, device=loss.device)
    if min_snr_gamma:
        loss = loss * snr_weights(scheduler, timesteps, min_snr_gamma)
    return loss
