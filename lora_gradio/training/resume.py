"""A run's resume state: the part of the trainer that saves everything needed to continue bit for bit, and reads it
back. A mixin of :class:`~lora_gradio.training.loop.Trainer`, whose attributes it uses."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..events import JobEvent
from . import scoring
from .validation import Score

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .clock import RunClock
    from .config import TrainConfig
    from .ema import WeightAverage
    from .result import TrainResult
    from .run_folder import RunFolder


class Resumable:
    """Checkpoints of a run: weights, optimizer, schedule, EMA and random state, with the history the page shows."""

    config: TrainConfig
    accelerator: Accelerator
    folder: RunFolder
    result: TrainResult
    clock: RunClock
    average: WeightAverage | None
    lora_params: dict[str, torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    generator: torch.Generator
    caption_rng: random.Random
    lrs: list[float | None]
    total_steps: int
    steps_per_epoch: int
    last_checkpoint: float
    emit: Callable[[JobEvent], None]
    event: Callable[..., JobEvent]
    read_losses: Callable[[], None]

    def checkpoint(self, epoch: int, steps_in_epoch: int) -> None:
        """Save everything a resume needs to continue bit for bit: weights, optimizer, schedule and random state."""
        self.read_losses()
        if not self.accelerator.is_main_process:
            return
        with self.clock.apart():
            self.folder.save_state({
                "step": self.result.steps, "epoch": epoch, "steps_in_epoch": steps_in_epoch,
                "losses": self.result.losses, "lrs": self.lrs, "scores": [s.row() for s in self.result.scores],
                "epoch_scores": [s.record() for s in self.result.epoch_scores],
                "lora": {k: v.detach().float().cpu() for k, v in self.lora_params.items()},
                "ema": self.average.state() if self.average else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict(),
                "generator": self.generator.get_state(), "caption_rng": self.caption_rng.getstate()})
            self.folder.write_progress(self.result.steps, self.total_steps, self.result.losses, False,
                                       self.result.scores)
        self.last_checkpoint = time.monotonic()

    def restore(self) -> tuple[int, int]:
        """Load the saved state; returns the epoch and the steps of it already done."""
        state = self.folder.load_state()
        self.result.steps, self.result.losses = state["step"], list(state["losses"])
        self.lrs = list(state.get("lrs") or [None] * len(self.result.losses))
        self.result.scores[:] = [Score(*score) for score in state.get("scores", [])]  # the validator's list too
        self.result.epoch_scores[:] = [scoring.EpochScores.from_record(row) for row in state.get("epoch_scores", [])]
        for name, value in state["lora"].items():
            self.lora_params[name].data.copy_(value)
        if self.average is not None and state.get("ema"):  # saved without EMA: the average starts here
            self.average.load(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["scheduler"])
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError:  # saved on another kind of device: its noise stream cannot continue here
            self.generator.manual_seed(self.config.seed + state["step"])
            self.emit(JobEvent("warning", "This run was saved on another kind of device (CPU or GPU): it continues "
                                          "with a fresh random stream, so its next steps differ from an unbroken "
                                          "run's."))
        self.caption_rng.setstate(state["caption_rng"])
        epoch, done = state["epoch"], state["steps_in_epoch"]
        points = list(zip(range(1, len(self.lrs) + 1), self.result.losses, self.lrs, strict=True))
        scores = [score.event() for score in self.result.scores]
        for event in [self.event("history", "", points=points), *scores, *self.folder.history(self.steps_per_epoch)]:
            self.emit(event)  # the page of a resumed run shows the whole run, not only its new part
        self.emit(self.event("status", f"Resuming at step {self.result.steps} (epoch {epoch + 1}, step "
                                       f"{done + 1} of it)", epoch=epoch))
        return epoch, done
