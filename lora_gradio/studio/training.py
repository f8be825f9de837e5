"""The studio's training: presets, a plan with its estimate, runs started, resumed, listed and deleted."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..access import OPERATOR, Visitor
from ..dataset import list_images
from ..errors import UserError
from ..estimate import TIMINGS_FILE, Estimate, Timings, device_name, estimate, format_duration
from ..events import Emit, JobEvent
from ..models import DEMO, BaseModelSpec, resolve_base
from ..request import short
from ..training.config import (
    GRID_STRENGTHS,
    PRESETS_DIR,
    TrainConfig,
    list_presets,
    load_preset,
    make_config,
    save_preset,
)
from ..training.data import TrainData
from ..training.kohya_config import KohyaSettings, read_kohya_files
from ..training.recommend import Recommendation, read_recommendation
from ..training.result import TrainResult
from ..training.run_folder import RunFolder, RunJob, list_runs, resumable_runs
from ..training.scoring import SCORERS
from ..workspace import DATASET_NAME
from .desk import exists
from .queueing import Entry, Queueing, added_by, read_queue

YOURS = " (yours)"  # a preset saved in this workspace, as the preset list names it


@dataclass(frozen=True)
class TestPlan:
    """A recommendation made ready for the Test tab: the LoRA's label, the strength, a prompt, the grid's rows
    (neighbouring epochs' labels) and columns (strengths), and the base it was trained on."""

    lora: str
    strength: float
    prompt: str
    rows: list[str]
    strengths: list[float]
    base: str = ""  # the run's base as the Test tab's picker names it ("" where the picker does not list it)


@dataclass(frozen=True)
class TrainingPlan:
    """A validated run before it starts: settings, base model, data and the estimate."""

    config: TrainConfig
    base: BaseModelSpec
    data: TrainData
    estimate: Estimate


class Training(Queueing):
    """Presets, plans and runs, queued for a device."""

    def plan_training(self, dataset: str | None, base: str | None, settings: dict[str, Any] | TrainConfig,
                      regularization: str | None = None, repeats: int = 1, validation: str | None = None,
                      ) -> TrainingPlan:
        """Validate settings (unknown keys are named) and estimate; the sample prompts keep ``{trigger}``, filled in
        as they are rendered.
        ``regularization`` names a second dataset of class images; ``repeats`` is how often an epoch shows each
        image of ``dataset``; ``validation`` names a dataset of the same subject to score instead of holding some
        of ``dataset``'s images out."""
        if not dataset:
            raise UserError("Choose a dataset above (and add images in the Dataset tab) before training.")
        config = settings if isinstance(settings, TrainConfig) else make_config(dict(settings))
        if config.output_name == TrainConfig().output_name:  # not named: after the dataset, so runs do not collide
            config = replace(config, output_name=lora_name(dataset))
        config = self.checked_scorer(config)
        spec = self.base(base)
        images, prepared = self.workspace.training_data(dataset)
        if not images.is_dir() or not list_images(images):
            raise UserError(f"Dataset '{dataset}' has no images yet: add photos in the Dataset tab (drop them, a zip, "
                            "or a folder of this server), then train.")
        regular = self.workspace.training_data(regularization)[0] if regularization else None
        held = self.workspace.training_data(validation)[0] if validation else self.workspace.own_validation(dataset)
        data = TrainData(images, prepared, regular, repeats, held)
        return TrainingPlan(config, spec, data, self.estimate_of(RunJob(config, spec, data)))

    def start_training(self, plan: TrainingPlan, visitor: Visitor = OPERATOR) -> str:
        """Queue the planned run for a new folder under outputs/, recorded as the visitor's: it starts at once on a
        free device, else when its turn comes. Returns the job id that Stop (or leaving the queue) needs. A visitor
        other than the operator trains within the server's time and sample caps."""
        self.limits.check_training(plan.estimate, visitor)
        name = f"{plan.config.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        taken = self.queued_runs()
        run = next(f"{name}{suffix}" for suffix in ("", *(f"-{i}" for i in range(2, 10_000)))
                   if f"{name}{suffix}" not in taken and not exists(self.workspace.outputs_dir / f"{name}{suffix}"))
        dataset = plan.data.images.parent.name
        if visitor.owns(self.workspace.dataset_settings(dataset).get("owner")):  # another's dataset stays theirs
            self.workspace.set_dataset_settings(dataset, plan.config.trigger_word, plan.data.repeats)
        job = RunJob(plan.config, plan.base, plan.data, visitor.name)
        return self.enqueue(Entry("", run, visitor.name, added_by(visitor), plan.estimate.steps,
                                  plan.estimate.seconds, job.record()), self.after_run(plan))

    def restore_queue(self) -> list[str]:
        """Queue again what the queue file kept when the server last stopped: a run that was training resumes from
        its last save first (or starts again, if it saved nothing), then the waiting runs in their order, each
        checked as a resumed run is. Returns a line for each, for the server's log."""
        try:
            kept = read_queue(self.queue_file)
        except ValueError as exc:
            return [f"The training queue in {self.queue_file.name} is damaged ({exc}); it starts empty."]
        lines = []
        for entry in kept:
            try:
                folder = self.workspace.outputs_dir / Path(entry.run).name
                if entry.device and RunFolder(folder).resumable:
                    entry = replace(entry, run=folder.name, job=None, planned_steps=0)
                job = RunFolder(folder).read_job() if entry.job is None else RunJob.from_record(entry.job, entry.run)
                self.check_job(job)
                plan = self.plan_rest(RunFolder(folder)) if entry.job is None else TrainingPlan(
                    job.config, job.base, job.data, self.estimate_of(job))
                self.enqueue(entry, self.after_run(plan))
                lines.append(f"Run {entry.run}: " + ("resumed from its last save" if entry.device and entry.job is None
                                                     else "trains again from the start" if entry.device
                                                     else "back in the queue") + ".")
            except (UserError, ValueError) as exc:
                lines.append(f"Run {entry.run} left the queue: {exc}")
        return lines

    def after_run(self, plan: TrainingPlan) -> Callable[[TrainResult, Emit], None]:
        """What follows a finished run: its time against the estimate shown before it and what validation and
        scoring took of it, then the ComfyUI copy."""

        def finish(result: TrainResult, emit: Emit) -> None:
            self.compare_with_estimate(plan, result, emit)
            if line := result.checking_line():
                emit(JobEvent("status", line))
            self.install_trained(result, emit)

        return finish

    @property
    def timings(self) -> Timings:
        """What runs measured on this machine, for the estimates."""
        return Timings(self.workspace.root / TIMINGS_FILE)

    def compare_with_estimate(self, plan: TrainingPlan, result: TrainResult, emit: Emit) -> None:
        """Keep what the finished run measured, and say how far its time was from the estimate shown before it."""
        self.timings.record(plan.base.display_name, device_name(), result.costs)
        guess = plan.estimate
        if guess.seconds is None or not guess.seconds:
            return
        off = (result.seconds - guess.seconds) / guess.seconds
        verdict = "within the estimate" if abs(result.seconds - guess.seconds) <= (guess.margin or 0) else \
            "outside the estimate"
        emit(JobEvent("status", f"Took {format_duration(result.seconds)}; the estimate was about "
                                f"{format_duration(guess.seconds)} (±{format_duration(guess.margin or 0)}): "
                                f"{abs(off):.0%} {'longer' if off > 0 else 'shorter'}, {verdict}. Later estimates "
                                "use what this run measured."))

    def run_folder(self, run: str | None, what: str = "resume") -> RunFolder:
        """A run of outputs/ by its folder name, as the list of runs shows it; never a path elsewhere."""
        if not run:
            raise UserError(f"Pick a run to {what}.")
        if Path(run).name != run or run in (".", "..") or len(run) > 255 or "\0" in run:
            raise UserError(f"{short(run)} is not a run name: {what} takes the name of a folder in outputs/, as the "
                            "list of runs shows it.")
        if not exists(self.workspace.outputs_dir / run):
            raise UserError(f"There is no run {short(run)} in outputs/: pick one from the list of runs.")
        folder = RunFolder(self.workspace.outputs_dir / run)
        folder.read_job()  # a clear message when it is not a run
        return folder

    def interrupted_runs(self) -> list[str]:
        """The runs of outputs/ that stopped before their end and can continue (and are not queued to), by folder
        name."""
        return [run for run in resumable_runs(self.workspace.outputs_dir) if run not in self.queued_runs()]

    def run_job(self, run: str | None) -> RunJob:
        """What a run of outputs/ trains (settings, base model, data), by its folder name."""
        return self.run_folder(run, "show").read_job()

    def resume_training(self, run: str | None, visitor: Visitor = OPERATOR) -> str:
        """Continue an interrupted run of outputs/ by its folder name (the visitor's own, or any for the operator);
        returns the job id that Stop needs."""
        folder = self.run_folder(run)
        job = folder.read_job()
        visitor.require(job.owner, f"Run '{folder.path.name}'")
        self.check_job(job)
        if folder.path.name in self.queued_runs():
            raise UserError(f"Run {folder.path.name} is already training or waiting in the queue.")
        plan = self.plan_rest(folder)
        return self.enqueue(Entry("", folder.path.name, visitor.name, added_by(visitor), 0, plan.estimate.seconds),
                            self.after_run(plan))

    def estimate_of(self, job: RunJob) -> Estimate:
        """A recorded run's whole estimate, from what runs measured on this machine."""
        known = self.timings.costs(job.base.display_name, device_name())
        loaded = self.cache.holds == ("pipeline", job.base)
        return estimate(job.config, job.data, job.base.kind == DEMO, known, loaded)

    def plan_rest(self, folder: RunFolder) -> TrainingPlan:
        """An interrupted run's estimate for the part still to train: the whole run's, in proportion to the steps
        left, so a resumed run is compared with an estimate too."""
        job = folder.read_job()
        whole = self.estimate_of(job)
        left = max(0, whole.steps - folder.summary().steps) / whole.steps if whole.steps else 1.0
        rest = replace(whole, seconds=whole.seconds * left if whole.seconds is not None else None,
                       margin=whole.margin * left if whole.margin is not None else None)
        return TrainingPlan(job.config, job.base, job.data, rest)

    def training_run(self) -> str | None:
        """The folder name of the run training now, if any."""
        state = self.jobs.latest("training")
        return Path(state.run_dir).name if state.active and state.run_dir else None

    def recommendation(self, run: str | None = None) -> Recommendation | None:
        """A run's recommended epoch and strength (the latest training run's when none is named): the final one
        kept in its folder, else what its saves so far recommend while it trains; None before its first save."""
        state = self.jobs.latest("training")
        live = Path(state.run_dir).name if state.run_dir else None
        folder = self.run_folder(run or live, "show")
        kept = read_recommendation(folder.path)
        if kept is None and folder.path.name == live and state.recommendation:
            return Recommendation.from_record(state.recommendation)
        return kept

    def recommended_test(self, run: str | None = None) -> TestPlan:
        """What the Test tab opens for a run's recommendation: its file at its strength with a prompt holding the
        trigger word, and for a grid the neighbouring epochs' files × the strengths tried."""
        advice = self.recommendation(run)
        if advice is None:
            raise UserError("This run has no recommendation yet: it comes with the first saved epoch.")
        state = self.jobs.latest("training")
        name = run or Path(state.run_dir).name
        files = [score.file for score in advice.scores]
        at = files.index(advice.file) if advice.file in files else 0
        labels = self.workspace.lora_files()
        rows = [f"{name}/{file}" for file in files[max(0, at - 1):at + 2] if f"{name}/{file}" in labels]
        label = f"{name}/{advice.file}"
        if label not in labels:
            raise UserError(f"The recommended file {advice.file} is no longer in run {name}.")
        base = self.run_job(name).base
        checkpoints = [c for c in self.workspace.list_checkpoints() if Path(c).name == Path(base.location).name]
        return TestPlan(label, advice.strength, self.lora_prompt(label), rows, list(GRID_STRENGTHS),
                        DEMO if base.kind == DEMO else next(iter(checkpoints), ""))

    def runs(self) -> list[list[str]]:
        """Every run, newest first: name, status, date, steps, recent loss, lowest validation loss and the
        recommended epoch and strength."""
        states = self.queued_runs()
        return [run.row(states.get(run.name, "")) for run in list_runs(self.workspace.outputs_dir)]

    def delete_run(self, run: str | None, visitor: Visitor = OPERATOR) -> str:
        """Delete a run's folder (its LoRA files, samples and resume state) and every served link to them; the
        visitor's own runs only, any for the operator, and never the one training now."""
        folder = self.run_folder(run, "delete")
        visitor.require(folder.read_job().owner, f"Run '{folder.path.name}'")
        now = self.queued_runs().get(folder.path.name)
        if now:
            raise UserError(f"Run '{run}' is training now. Stop it first, then delete it." if now == "running" else
                            f"Run '{run}' waits in the training queue. Take it out of the queue first, then delete it.")
        shutil.rmtree(folder.path)
        self.forget_deleted()
        return f"Deleted run {folder.path.name}."

    def check_job(self, job: RunJob) -> None:
        """A run's recorded base model and data must pass today's rules, whatever its job.json says."""
        if job.base.allow_pickle:
            raise UserError("This run was recorded with a pickle base model, which the app does not load. Resume it "
                            "from the command line if you trust the file.")
        if job.base.kind in ("single_file", "diffusers"):
            resolve_base(str(self.workspace.check_allowed(job.base.location, "The run's base model")))
        for folder in (job.data.images, job.data.prepared, job.data.regularization, job.data.validation):
            if folder is not None:
                self.workspace.check_allowed(folder, "The run's dataset folder")
        self.checked_scorer(job.config)

    def checked_scorer(self, config: TrainConfig) -> TrainConfig:
        """A CLIP scorer named by folder must lie inside the workspace or an allowed folder; names and hub ids
        pass as they are."""
        scorer = config.scorer.strip()
        if scorer in SCORERS or self.is_hub_id(scorer):
            return replace(config, scorer=scorer)
        return replace(config, scorer=str(self.workspace.check_allowed(scorer, "The CLIP scorer folder")))

    def presets(self) -> dict[str, Path]:
        """Every preset a visitor may load, by the name the preset list shows: the built-in ones, then this
        workspace's own (marked as yours)."""
        choices = {name: PRESETS_DIR / f"{name}.toml" for name in list_presets()}
        if self.workspace.presets_dir.is_dir():
            choices.update({f"{name}{YOURS}": self.workspace.presets_dir / f"{name}.toml"
                            for name in list_presets(self.workspace.presets_dir)})
        return choices

    def preset(self, name: str | None) -> tuple[TrainConfig, str]:
        """A preset's settings and description by its name; never a path, and the same answer for any unknown
        name, whether or not such a file exists somewhere."""
        choices = self.presets()
        label = str(name or "").strip()
        path = choices.get(label) or choices.get(f"{label}{YOURS}")
        if path is None:
            raise UserError(f"No preset has that name: pick one of {', '.join(choices)}.")
        return load_preset(str(path))

    def import_kohya_config(self, paths: list[Path], preset: str | None) -> tuple[TrainConfig, KohyaSettings]:
        """A preset's settings with those of uploaded kohya_ss or sd-scripts files on top, and what the files say;
        the folders and base they name are only reported, since a visitor picks those in the app."""
        found = read_kohya_files(paths)
        return found.config(self.preset(preset)[0]), found

    def save_preset(self, name: str, config: TrainConfig, visitor: Visitor = OPERATOR) -> str:
        """Save settings as a preset of this workspace; only the operator replaces one that exists."""
        name = (name or "").strip()
        if not DATASET_NAME.match(name) or name in (".", ".."):
            raise UserError("Name the preset with letters, digits, spaces, '.', '-' or '_' (up to 64 characters).")
        path = self.workspace.presets_dir / f"{name}.toml"
        if path.exists():
            visitor.require_operator(f"replace the saved preset '{name}' (save it under another name)")
        save_preset(config, path, "Saved from the app.")
        return f"{name}{YOURS}"


def lora_name(dataset: str) -> str:
    """A LoRA file name from a dataset's name: spaces and other characters a file name avoids become '-'."""
    return re.sub(r"[^\w.-]", "-", dataset.strip()).lstrip(".-")[:100] or TrainConfig().output_name
