"""Held-out images and their loss: images a run never trains on, scored with the same noise and timesteps at every
evaluation, so a rising number means the LoRA stopped generalising, not that the dice fell differently."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..events import JobEvent
from ..views import encode_prompts
from .data import CachedImage
from .objective import Objective, denoising_loss

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from .config import TrainConfig

MAX_TIMESTEPS = 8  # per held-out image, spread over the schedule
SHARE_OF_RUN = 0.10  # the evaluations' work, at most, against the training's
FORWARD_SHARE = 1 / 3  # a forward pass without gradients, against a training step's forward and backward
EVAL_BATCHES = 4  # training batches scored in one forward pass ...
EVAL_ROWS = 8  # ... up to this many rows, unless one training batch is larger: a GPU that trains it holds them


def timesteps_per_image(held: int, evaluations: int, steps: int, batch_size: int) -> int:
    """Timesteps for each held-out image such that every evaluation together costs at most a tenth of the training;
    from 1 to ``MAX_TIMESTEPS``."""
    budget = SHARE_OF_RUN * steps * batch_size / FORWARD_SHARE
    return max(1, min(MAX_TIMESTEPS, int(budget // max(held * evaluations, 1))))


def evaluation_count(config: TrainConfig, epochs: int, total_steps: int) -> int:
    """How often a run scores its held-out images: at every saved epoch (the final file included), and every
    ``validation_every_n_steps``."""
    saved = sum(1 for epoch in range(1, epochs) if config.save_every_n_epochs and
                epoch % config.save_every_n_epochs == 0) + 1
    return saved + (total_steps // config.validation_every_n_steps if config.validation_every_n_steps else 0)


def scoring_work(config: TrainConfig, held: int, epochs: int, steps: int) -> float:
    """What scoring ``held`` images costs over a run, in training steps (for the estimate)."""
    if not held:
        return 0.0
    count = evaluation_count(config, epochs, steps)
    forwards = held * count * timesteps_per_image(held, count, steps, config.batch_size)
    return forwards * FORWARD_SHARE / config.batch_size


@dataclass
class Fixed:
    """The fixed inputs of held-out images of one latent size: each image's latent (the distribution's mean) once
    per timestep, the noise, the timesteps, and which of ``captions`` each row has."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]
    rows: torch.Tensor


@dataclass(frozen=True)
class Score:
    """One evaluation: the step and epoch it came after, the held-out loss, and the LoRA file saved at that point
    ("" for a score between saves)."""

    step: int
    epoch: int
    loss: float
    file: str = ""

    def row(self) -> list:
        """The score as a JSON row: step, epoch, loss, file."""
        return [self.step, self.epoch, self.loss, self.file]

    def event(self) -> JobEvent:
        """The score as the job's event, without a log line (a resumed run's page gets its earlier scores)."""
        return JobEvent("validation", step=self.step, epoch=self.epoch, loss=self.loss)


@dataclass
class Validator:
    """Scores the held-out images into ``history`` (the run's own list, kept with its resume state) and says how
    each score compares."""

    fixed: list[Fixed]
    config: TrainConfig
    scheduler: DDPMScheduler
    history: list[Score] = field(default_factory=list)

    @property
    def objective(self) -> Objective:
        """The held-out loss is L2 with the run's min-SNR weights, whatever the run's loss type and debiasing: runs
        that train on different losses are scored on one scale."""
        return Objective(self.config.min_snr_gamma)

    @classmethod
    def build(cls, held: list[CachedImage], config: TrainConfig, scheduler: DDPMScheduler, scaling: float,
              timesteps: int, history: list[Score]) -> Validator:
        """Fixed noise from a seed of each image's own and timesteps spread evenly over the schedule."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        total = scheduler.config.num_train_timesteps
        spread = torch.tensor([int((k + 0.5) * total / timesteps) for k in range(timesteps)])
        sizes: dict[tuple[int, ...], list[tuple]] = {}  # images of one latent size are scored in shared batches
        for index, image in enumerate(held):
            mean = DiagonalGaussianDistribution(image.latent_params[0].unsqueeze(0)).mean * scaling
            generator = torch.Generator("cpu").manual_seed(config.seed * 1000 + index + 1)
            noise = torch.randn((timesteps, *mean.shape[1:]), generator=generator)
            sizes.setdefault(tuple(mean.shape), []).append((mean.expand(timesteps, -1, -1, -1), noise.to(mean),
                                                             image.caption))
        fixed = []
        for group in sizes.values():
            latents, noises, captions = zip(*group, strict=True)
            fixed.append(Fixed(torch.cat(latents), torch.cat(noises), spread.repeat(len(group)).to(latents[0].device),
                               list(captions), torch.arange(len(group)).repeat_interleave(timesteps)))
        return cls(fixed, config, scheduler, history)

    def loss(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: object) -> float:
        """The mean loss over every held-out image and timestep, without gradients, in chunks of EVAL_BATCHES
        batches (at most EVAL_ROWS rows): a pass that keeps no activations for a backward fits more than a batch."""
        batch = self.config.batch_size
        losses, chunk = [], max(batch, min(EVAL_BATCHES * batch, EVAL_ROWS))
        with torch.no_grad():
            for group in self.fixed:
                hidden = encode_prompts(text_encoder, tokenizer, group.captions, self.config.clip_skip)
                for start in range(0, len(group.timesteps), chunk):
                    part = slice(start, start + chunk)
                    latents, noise, steps = group.latents[part], group.noise[part], group.timesteps[part]
                    noisy = self.scheduler.add_noise(latents, noise, steps)
                    pred = unet(noisy, steps, hidden[group.rows[part].to(hidden.device)].to(latents.dtype)).sample
                    losses.append(denoising_loss(pred, latents, noise, steps, self.scheduler, self.objective,
                                                 [1.0] * len(steps)))
        return float(torch.cat(losses).mean())

    def scored(self, step: int) -> bool:
        """Whether the model as it is at ``step`` has its score already."""
        return bool(self.history) and self.history[-1].step == step

    def score(self, step: int, epoch: int, file: Path | None, unet: torch.nn.Module, text_encoder: torch.nn.Module,
              tokenizer: object) -> tuple[Score, str]:
        """Score the model as it is now (saved as ``file``, or between saves), keep it, and the log line that says
        how it compares with the scores before."""
        before = best_score(self.history)
        score = Score(step, epoch, self.loss(unet, text_encoder, tokenizer), file.name if file else "")
        self.history.append(score)
        where = f"at epoch {score.epoch}" + ("" if score.file else f" (step {score.step})")
        if before is None or score.loss < before.loss:
            return score, f"validation loss {score.loss:.4f} {where}, lowest so far"
        return score, (f"validation loss {score.loss:.4f} {where}; the lowest is {before.loss:.4f} at epoch "
                       f"{before.epoch}")

    def stalled(self, patience: int) -> bool:
        """Whether the last ``patience`` scores of saved files all failed to beat the best one before them."""
        kept = [score for score in self.history if score.file]
        best = best_score(kept)
        return bool(patience and best is not None and len(kept) - 1 - kept.index(best) >= patience)

    def early_stop_note(self, patience: int) -> str:
        """Why a run stops early, and which file to keep."""
        best = best_score([score for score in self.history if score.file])
        return (f"Stopping early: the validation loss has not improved for {patience} saves. The best is epoch "
                f"{best.epoch} ({best.file}, validation loss {best.loss:.4f}); keep that file.")


def best_score(scores: list[Score]) -> Score | None:
    """The lowest of the scores, the earliest of equals."""
    return min(scores, key=lambda score: score.loss) if scores else None
