"""What a step minimises: SD's denoising objective, with sd-scripts' loss types (L2, Huber, smooth L1), min-SNR
and debiased-estimation weighting, weights per image, and its noise (offset and multi-resolution)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from .config import TrainConfig

MAX_SNR = 1000.0  # debiased estimation caps the SNR here, as sd-scripts does, so the first timesteps stay finite


@dataclass(frozen=True)
class Objective:
    """How a prediction's error becomes a loss: the error's form (``l2``, or sd-scripts' pseudo-Huber ``huber`` and
    ``smooth_l1`` with ``huber_c`` on its schedule) and the per-timestep weights (min-SNR, debiased estimation)."""

    min_snr_gamma: float = 0.0
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    debiased_estimation: bool = False

    @classmethod
    def of(cls, config: TrainConfig) -> Objective:
        """A run's objective, from its settings."""
        return cls(config.min_snr_gamma, config.loss_type, config.huber_c, config.huber_schedule,
                   config.debiased_estimation)


def training_noise(latents: torch.Tensor, generator: torch.Generator, config: TrainConfig) -> torch.Tensor:
    """The noise a step adds, from the run's own generator (a resume continues its stream): Gaussian, plus a
    per-channel constant scaled by ``noise_offset`` when set, which lets the LoRA learn darker and brighter pictures,
    and then kohya's multi-resolution noise when ``multires_noise_iterations`` is set."""
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents)
    if config.noise_offset:
        shift = torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=generator.device)
        noise += config.noise_offset * shift.to(latents)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, config.multires_noise_iterations, config.multires_noise_discount)
    return noise


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's multi-resolution noise: Gaussian noise at ever coarser sizes (level i at a random 2–4× per level, to
    the power i, smaller), upsampled bilinearly and added at ``discount``**i, then the whole scaled to unit spread.
    Coarse noise reaches the low frequencies that plain noise leaves, so the LoRA learns overall light and colour."""
    batch, channels, height, width = noise.shape
    noise = noise.clone()
    for level in range(iterations):
        ratio = float(torch.rand((), generator=generator, device=generator.device)) * 2 + 2
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = torch.randn((batch, channels, *size), generator=generator, device=generator.device).to(noise)
        noise += torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if 1 in size:
            break
    return noise / noise.std()


def snr_of(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each timestep's signal-to-noise ratio."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights: min(SNR, gamma) / SNR for noise prediction, / (SNR + 1) for v-prediction."""
    snr = snr_of(noise_scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr


def debiased_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """sd-scripts' debiased estimation: 1 / √SNR (1 / (SNR + 1) for v-prediction), the SNR capped at MAX_SNR."""
    snr = snr_of(scheduler, timesteps).clamp(max=MAX_SNR)
    return 1 / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else 1 / snr.sqrt()


def huber_threshold(objective: Objective, scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each sample's Huber ``c`` on sd-scripts' schedules: ``constant``; ``exponential``, from 1 at t = 0 down to
    huber_c at the last timestep; ``snr``, (1 − huber_c) / (1 + σ)² + huber_c, so 1 where the noise is weak and
    huber_c where it is strong."""
    c = objective.huber_c
    steps = timesteps.float()
    if objective.huber_schedule == "exponential":
        return torch.exp(math.log(c) * steps / scheduler.config.num_train_timesteps)
    if objective.huber_schedule == "snr":
        alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1 - alphas) / alphas).sqrt()
        return (1 - c) / (1 + sigmas) ** 2 + c
    return torch.full_like(steps, c)


def error(pred: torch.Tensor, target: torch.Tensor, objective: Objective, scheduler: DDPMScheduler,
          timesteps: torch.Tensor) -> torch.Tensor:
    """Each element's error: squared, or pseudo-Huber 2c(√(d² + c²) − c) (equal to d² as c grows), or smooth L1
    2(√(d² + c²) − c). √(d² + c²) − c is computed as d² / (√(d² + c²) + c), which keeps its digits at large c."""
    if objective.loss_type == "l2":
        return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    diff = pred.float() - target.float()
    c = huber_threshold(objective, scheduler, timesteps).view(-1, *[1] * (diff.dim() - 1))
    smooth = diff**2 / (torch.sqrt(diff**2 + c**2) + c)
    return 2 * c * smooth if objective.loss_type == "huber" else 2 * smooth


def denoising_loss(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   scheduler: DDPMScheduler, objective: Objective, weights: list[float],
                   masks: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's loss: the error against the noise (or the velocity, for v-prediction models), each place of it
    times its mask (masked loss, as kohya: then averaged over the whole picture), times its weight (prior
    preservation weighs class images apart) and its min-SNR or debiased-estimation weight."""
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    errors = error(pred, target, objective, scheduler, timesteps)
    loss = (errors if masks is None else errors * masks.to(errors.dtype)).mean((1, 2, 3))
    if any(weight != 1.0 for weight in weights):
        loss = loss * torch.tensor(weights, device=loss.device)
    if objective.min_snr_gamma:
        loss = loss * snr_weights(scheduler, timesteps, objective.min_snr_gamma)
    if objective.debiased_estimation:
        loss = loss * debiased_weights(scheduler, timesteps)
    return loss
