"""What a run hands back: its files, its losses and scores, and what its parts cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..estimate import RunCosts
from .recommend import Recommendation
from .scoring import EpochScores
from .validation import Score, best_score


@dataclass
class TrainResult:
    """What a run produced: the final LoRA, every saved file, the loss history and the held-out scores; stopped by
    a Stop, or early (the held-out loss stopped improving)."""

    lora_path: Path | None
    saved: list[Path]
    steps: int
    epochs: int
    stopped: bool
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    it_per_s: float = 0.0
    peak_memory_gb: float | None = None  # CUDA only
    seconds: float = 0.0  # the whole run, the model load included
    costs: RunCosts = field(default_factory=RunCosts)  # what each part cost, for later estimates
    scores: list[Score] = field(default_factory=list)  # the held-out loss at each evaluation
    stopped_early: bool = False
    epoch_scores: list[EpochScores] = field(default_factory=list)  # every saved file's scores
    recommendation: Recommendation | None = None  # which file at which strength, once a file is saved
    checking_s: float = 0.0  # of ``seconds``: validation, judging the samples and trying strengths

    def checking_line(self) -> str:
        """What validation and the recommendation cost this run, or "" where it had neither."""
        if not self.checking_s or not self.seconds:
            return ""
        return (f"Scoring the saved files (held-out loss, samples, strengths) took {self.checking_s:.1f} s of the "
                f"run's {self.seconds:.0f} s ({self.checking_s / self.seconds:.0%}).")

    def summary(self) -> str:
        """For logs: steps, speed, peak GPU memory and the saved file with the lowest held-out loss on one line, and
        the recommendation on the next."""
        memory = f", peak GPU memory {self.peak_memory_gb:.2f} GB" if self.peak_memory_gb is not None else ""
        best = best_score([score for score in self.scores if score.file])
        lowest = f"; lowest validation loss {best.loss:.4f} at epoch {best.epoch} ({best.file})" if best else ""
        early = " (stopped early: the validation loss stopped improving)" if self.stopped_early else ""
        line = f"{self.steps} steps in {self.epochs} epochs{early} at {self.it_per_s:.2f} it/s{memory}{lowest}"
        extra = [text for text in (self.checking_line(), self.recommendation and self.recommendation.headline())
                 if text]
        return "\n".join([line, *extra])
