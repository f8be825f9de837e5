"""Which epoch file to use and at what strength, with the reasons in words: from the held-out loss, the samples'
likeness and prompt following, and their health. Kept as ``recommendation.json`` in the run folder."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_text_atomic
from ..events import Emit, JobEvent
from .config import TRIAL_STRENGTHS
from .run_folder import RunFolder
from .scoring import EpochScores, Evaluator, Marks, health, judge_samples

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from ..models import BaseModelSpec
    from .config import TrainConfig
    from .validation import Score

OVERFIT_RISE = 0.10  # a later held-out loss this much above the lowest: the LoRA stopped generalising


@dataclass(frozen=True)
class Trial:
    """The recommended file's samples at one strength, judged."""

    strength: float
    likeness: float | None
    following: float | None


@dataclass
class Recommendation:
    """The epoch and strength to use, why, and every saved epoch's scores; ``final`` once the run has ended."""

    epoch: int
    file: str
    strength: float
    reasons: list[str]
    scores: list[EpochScores]
    overfitting_after: int | None = None
    trials: list[Trial] = field(default_factory=list)
    final: bool = False
    scorer: str = ""  # the evaluator that judged the samples ("" for none)
    shares: bool = False  # its marks are shares of pictures, not similarities

    def headline(self) -> str:
        """The card's sentence: 'Recommended: epoch 6 (anna-000006.safetensors) at strength 0.8, because …'."""
        if not self.final:
            return (f"Recommended so far: epoch {self.epoch} ({self.file}), because " + "; ".join(self.reasons) +
                    ". The strength is tried once the run ends.")
        return (f"Recommended: epoch {self.epoch} ({self.file}) at strength {self.strength:g}, because "
                + "; ".join(self.reasons) + ".")

    def record(self) -> dict:
        """As JSON: epoch, file, strength, reasons, scores (one row per saved epoch), the strength trials and the
        headline."""
        return {"headline": self.headline(), "epoch": self.epoch, "file": self.file, "strength": self.strength,
                "reasons": self.reasons, "overfitting_after": self.overfitting_after, "final": self.final,
                "scorer": self.scorer, "shares": self.shares, "scores": [score.record() for score in self.scores],
                "trials": [asdict(trial) for trial in self.trials]}

    @classmethod
    def from_record(cls, record: dict) -> Recommendation:
        """Back from JSON."""
        return cls(int(record["epoch"]), str(record["file"]), float(record["strength"]),
                   [str(reason) for reason in record["reasons"]],
                   [EpochScores.from_record(row) for row in record.get("scores") or []],
                   record.get("overfitting_after"), [Trial(**trial) for trial in record.get("trials") or []],
                   bool(record.get("final")), str(record.get("scorer") or ""), bool(record.get("shares")))


def percent(value: float | None, evaluator: Evaluator | None) -> str:
    """A mark in words: a share as a percentage (the demo's analysis), a similarity with three decimals (CLIP)."""
    if value is None:
        return "–"
    return f"{value:.0%}" if evaluator is not None and evaluator.shares else f"{value:.3f}"


def holds(score: EpochScores, base: Marks, tolerance: float) -> bool:
    """Healthy, and following the prompts about as well as the base model did."""
    lost = score.following is not None and base.following is not None and score.following < base.following - tolerance
    return score.health >= 1 and not lost


def choose_epoch(scores: list[EpochScores], base: Marks, evaluator: Evaluator | None,
                 ) -> tuple[EpochScores, list[str], int | None]:
    """The epoch where the held-out loss bottoms out among healthy ones that keep the prompt, else where likeness
    stops improving, else the last healthy one; its reasons; and the epoch after which it overfits, if it does."""
    tolerance = evaluator.tolerance if evaluator is not None else 0.0
    eligible = [score for score in scores if holds(score, base, tolerance)]
    reasons, among = [], f"the {len(scores)} saved epochs"
    if not eligible:
        eligible = scores
        reasons.append("no saved epoch keeps both the base model's tone and its prompt following, so this is the "
                       "best of them")
    elif len(eligible) < len(scores):
        left_out = ", ".join(str(score.epoch) for score in scores if score not in eligible)
        among = f"the {len(eligible)} saved epochs that keep the tone and the prompt (epochs {left_out} do not)"
    measured = [score for score in eligible if score.validation_loss is not None]
    liked = [score for score in eligible if score.likeness is not None]
    if measured:
        pick = min(measured, key=lambda score: score.validation_loss)
        reasons.append(f"its validation loss {pick.validation_loss:.4f} is the lowest of {among}")
    elif liked:
        top = max(score.likeness for score in liked)
        pick = next(score for score in liked if score.likeness >= top - tolerance)
        reasons.append(f"likeness stops improving there ({percent(pick.likeness, evaluator)}, the best of {among} "
                       f"is {percent(top, evaluator)}); there are no held-out images to measure overfitting")
    else:
        pick = eligible[-1]
        reasons.append("it is the last healthy epoch; with no held-out images and no scorer, nothing else was "
                       "measured")
    if measured and pick.likeness is not None:
        reasons.append(f"its samples' likeness is {percent(pick.likeness, evaluator)} and prompt following "
                       f"{percent(pick.following, evaluator)}")
    overfit = overfitting(pick, scores, base, tolerance)
    if overfit:
        reasons.append(f"overfitting after epoch {pick.epoch}: {overfit}")
    return pick, reasons, pick.epoch if overfit else None


def overfitting(pick: EpochScores, scores: list[EpochScores], base: Marks, tolerance: float) -> str:
    """What went wrong after ``pick`` in words ('' where nothing did): a rising held-out loss, drifting tone or a
    lost prompt."""
    later = [score for score in scores if score.epoch > pick.epoch]
    signs = []
    if pick.validation_loss is not None:
        rose = [s for s in later if s.validation_loss is not None and
                s.validation_loss > pick.validation_loss * (1 + OVERFIT_RISE)]
        if rose:
            worst = max(rose, key=lambda score: score.validation_loss)
            signs.append(f"the validation loss rose to {worst.validation_loss:.4f} by epoch {worst.epoch}")
    unhealthy = next((score for score in later if score.health < 1), None)
    if unhealthy is not None:
        signs.append(f"epoch {unhealthy.epoch}'s samples are {unhealthy.health_note or 'off'} than the base's")
    lost = next((score for score in later if not holds(replace(score, health=1.0), base, tolerance)), None)
    if lost is not None:
        signs.append(f"epoch {lost.epoch}'s samples stop following the prompt")
    return ", ".join(signs)


def choose_strength(trials: list[Trial], base: Marks, evaluator: Evaluator | None) -> tuple[float, str]:
    """The lowest strength from which every stronger one reaches nearly the full likeness, while prompt following
    holds, with its reason; 1.0 where nothing was scored, or where the LoRA barely moves the likeness at any
    strength."""
    scored = [trial for trial in trials if trial.likeness is not None]
    if evaluator is None or not scored:
        return 1.0, "strength 1 is the full effect; no scorer compared strengths"
    tolerance = evaluator.tolerance
    full = max(trial.likeness for trial in scored)
    if base.likeness is not None and full - base.likeness <= tolerance:
        return 1.0, ("at no strength do the samples look more like the subject than the base model's; train longer "
                     "or at a higher learning rate")
    following = [trial.following for trial in scored if trial.following is not None]
    floor = (base.following if base.following is not None else max(following, default=0.0)) - tolerance
    ordered = sorted(scored, key=lambda trial: trial.strength)
    good = [trial for index, trial in enumerate(ordered)  # every stronger one keeps the likeness: one lucky
            if all(t.likeness >= full - tolerance for t in ordered[index:])  # sample at a low strength is no reason
            and (trial.following is None or trial.following >= floor)]
    if good:
        pick = good[0]
        return pick.strength, (f"strength {pick.strength:g} reaches {percent(pick.likeness, evaluator)} likeness "
                               f"(the most any strength gives is {percent(full, evaluator)}) and keeps the prompt "
                               f"({percent(pick.following, evaluator)})")
    pick = max(scored, key=lambda trial: (trial.following or 0.0, trial.likeness, -trial.strength))
    seen = ", ".join(f"{trial.strength:g}: {percent(trial.likeness, evaluator)}" for trial in ordered)
    return pick.strength, (f"the strengths disagree (likeness at {seen}), so strength {pick.strength:g}, which keeps "
                           f"the prompt best ({percent(pick.following, evaluator)}); compare them with Grid around "
                           f"it")


def recommend(scores: list[EpochScores], base: Marks, evaluator: Evaluator | None,
              trials: list[Trial] | None = None) -> Recommendation | None:
    """The recommendation from the saved epochs' scores (None before the first save); with ``trials``, final."""
    if not scores:
        return None
    pick, reasons, overfit = choose_epoch(scores, base, evaluator)
    strength, why = choose_strength(trials or [], base, evaluator) if trials is not None else (1.0, "")
    if why:
        reasons = [*reasons, why]
    return Recommendation(pick.epoch, pick.file, strength, reasons, list(scores), overfit, list(trials or []),
                          trials is not None, evaluator.name if evaluator else "", bool(evaluator and evaluator.shares))


def try_strengths(pipe: StableDiffusionPipeline, base: BaseModelSpec, config: TrainConfig, lora: Path,
                  at_one: list[Path], evaluator: Evaluator, stop: threading.Event | None) -> list[Trial]:
    """Render the sample prompts with ``lora`` at each of TRIAL_STRENGTHS (model and clip alike) on a fresh view of the
    base, the way the Test tab does, two prompts per batch; ``at_one`` are its samples already rendered at
    strength 1."""
    from ..inference import attach_strengths, render_batches
    from ..views import pipeline_view
    from .samples import sample_request

    prompts = config.prompts()
    view = pipeline_view(pipe)
    trials = []
    for strength in TRIAL_STRENGTHS:
        if strength == 1.0 and len(at_one) == len(prompts):
            marks = judge_samples(evaluator, prompts, at_one)
        else:
            requests = [replace(sample_request(config, index, lora), strength_model=strength,
                                strength_clip=strength) for index in range(len(prompts))]
            attach_strengths(view, requests[0])
            marks = evaluator.marks(prompts, render_batches(view, requests, base.display_name, stop))
        trials.append(Trial(strength, marks.likeness, marks.following))
    return trials


@dataclass
class Advisor:
    """Judges each saved file as the run goes, beside its held-out loss, and recommends one: live from the first
    save, and final once the strengths are tried. ``scores`` is the run's own list, kept with its resume state."""

    evaluator: Evaluator | None
    prompts: list[str]
    scores: list[EpochScores]
    first: list[Path] = field(default_factory=list)  # the base model's samples (epoch 0)
    base: Marks = field(default_factory=lambda: Marks(None, None))

    def start(self, first: list[Path]) -> Recommendation | None:
        """Judge the base model's samples (a resumed run: what its saves so far recommend)."""
        self.first, self.base = first, judge_samples(self.evaluator, self.prompts, first)
        return recommend(self.scores, self.base, self.evaluator)

    def add(self, epoch: int, file: Path | None, held_out: list[Score], step: int, paths: list[Path],
            ) -> Recommendation | None:
        """Score a saved file from its samples (``paths``, none where the run renders none) and the held-out loss
        at its ``step``; None where nothing was saved (not rank 0) and for the final file of an early stop, which
        is its last epoch's file again."""
        if file is None or (self.scores and self.scores[-1].epoch == epoch):
            return None
        loss = next((score.loss for score in reversed(held_out) if score.step == step), None)
        marks = judge_samples(self.evaluator, self.prompts, paths)
        health_now, note = health(self.first, paths)
        self.scores.append(EpochScores(epoch, file.name, loss, marks.likeness, marks.following, health_now, note))
        return recommend(self.scores, self.base, self.evaluator)

    def finish(self, pipe: StableDiffusionPipeline, base: BaseModelSpec, config: TrainConfig, folder: Path,
               samples: Callable[[int], list[Path]], stop: threading.Event, emit: Emit) -> Recommendation | None:
        """Try the recommended file at TRIAL_STRENGTHS (``samples(epoch)``: its samples at strength 1), keep the
        final recommendation in the run folder, and give that file's A1111 card and ComfyUI workflow its
        strength."""
        import torch

        from ..inference import RenderStopped
        from ..views import free_accelerator_memory
        from . import cards

        if not self.scores:
            return None
        chosen = recommend(self.scores, self.base, self.evaluator)
        lora, trials = folder / chosen.file, []
        if self.evaluator is not None:
            emit(JobEvent("status", f"Trying {chosen.file} at strengths "
                                    f"{', '.join(f'{s:g}' for s in TRIAL_STRENGTHS)}"))
            try:
                trials = try_strengths(pipe, base, config, lora, samples(chosen.epoch), self.evaluator, stop)
            except RenderStopped:
                emit(JobEvent("status", "Stop pressed: the strengths were left untried"))
            except torch.cuda.OutOfMemoryError:
                free_accelerator_memory()
                emit(JobEvent("warning", "The GPU ran out of memory trying strengths; the recommended strength "
                                         "stays 1. Compare strengths with the Test tab's grid."))
        final = recommend(self.scores, self.base, self.evaluator, trials)
        write_recommendation(folder, final)
        cards.recommend_strength(lora, config, base.display_name, final.strength)
        return final


def write_recommendation(run_dir: Path, recommendation: Recommendation) -> Path:
    """Keep the recommendation in the run folder, atomically."""
    path = RunFolder(Path(run_dir)).recommendation_file
    write_text_atomic(path, json.dumps(recommendation.record(), indent=2) + "\n")
    return path


def read_recommendation(run_dir: Path) -> Recommendation | None:
    """A run's recommendation, or None where it has none (or a damaged one)."""
    try:
        return Recommendation.from_record(json.loads(RunFolder(Path(run_dir)).recommendation_file.read_text("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
