"""The layout of one training run's folder, owned here: ``job.json``, the resume state, LoRA files and samples.

Both the job runner and the training loop go through :class:`RunFolder`; neither knows the other's files.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_bytes_atomic, write_text_atomic
from ..errors import UserError
from ..events import JobEvent
from ..models import BaseModelSpec
from .config import TrainConfig, make_config
from .data import TrainData
from .validation import Score, best_score

JOB_FILE = "job.json"
PROGRESS_FILE = "progress.json"  # steps done and the latest loss, for the list of runs
RESUME_FILE = "resume-state.pt"
SAMPLES = "samples"
SAMPLE_GRID = "sample-grid.png"
RECOMMENDATION_FILE = "recommendation.json"  # which file at what strength, and why (training/recommend.py)
STOP_MARK = "-step"  # NAME-step00000123.safetensors: a run stopped at step 123 (kohya's step-save name)


@dataclass(frozen=True)
class RunJob:
    """What a run trains: its settings, base model and data, and who started it (None: the operator)."""

    config: TrainConfig
    base: BaseModelSpec
    data: TrainData
    owner: str | None = None

    def record(self) -> dict[str, Any]:
        """The job as JSON values, as ``job.json`` and the training queue keep it."""
        data = self.data
        return {"config": self.config.to_dict(), "base": asdict(self.base), "data_dir": str(data.images),
                "prepared_dir": str(data.prepared) if data.prepared else None,
                "regularization_dir": str(data.regularization) if data.regularization else None,
                "validation_dir": str(data.validation) if data.validation else None,
                "repeats": data.repeats, "started_by": self.owner}

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str) -> RunJob:
        """The job a record holds; ValueError naming what is damaged."""
        try:
            folders = [record.get(key) for key in ("prepared_dir", "regularization_dir", "validation_dir")]
            prepared, regular, validation = (Path(folder) if folder else None for folder in folders)
            data = TrainData(Path(record["data_dir"]), prepared, regular, record.get("repeats", 1), validation)
            owner = record.get("started_by")
            return cls(make_config(record["config"], where), BaseModelSpec(**record["base"]), data,
                       owner if isinstance(owner, str) else None)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class RunFolder:
    """One run's folder; every path inside it is named here."""

    path: Path

    @property
    def job_file(self) -> Path:
        """The recorded :class:`RunJob`, so the run can be resumed after a restart."""
        return self.path / JOB_FILE

    @property
    def state_file(self) -> Path:
        """What an unfinished run needs to continue exactly where it stopped."""
        return self.path / RESUME_FILE

    @property
    def samples_dir(self) -> Path:
        """Sample images, ``epoch0003-1.png`` for epoch 3's second prompt."""
        return self.path / SAMPLES

    def lora_file(self, name: str, epoch: int | None = None, stopped_at: int | None = None) -> Path:
        """``name-000004.safetensors`` for an epoch save, ``name-step00000123.safetensors`` for a run stopped at
        step 123 (kohya's step-save name), ``name.safetensors`` only for the finished run."""
        if stopped_at is not None:
            return self.path / f"{name}{STOP_MARK}{stopped_at:08d}.safetensors"
        return self.path / (f"{name}-{epoch:06d}.safetensors" if epoch is not None else f"{name}.safetensors")

    def lora_files(self) -> list[Path]:
        """The LoRA files saved so far, oldest first."""
        return sorted(self.path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)

    @property
    def recommendation_file(self) -> Path:
        """The finished run's recommended epoch and strength."""
        return self.path / RECOMMENDATION_FILE

    @property
    def sample_grid_file(self) -> Path:
        """Every epoch's samples in one picture, made when the run finishes."""
        return self.path / SAMPLE_GRID

    def sample_file(self, epoch: int, index: int, step: int | None = None) -> Path:
        """Where the sample for prompt ``index`` goes: ``epoch0003-0.png`` at an epoch's end, ``step00000150-0.png``
        when rendered at a step."""
        name = f"step{step:08d}-{index}.png" if step is not None else f"epoch{epoch:04d}-{index}.png"
        return self.samples_dir / name

    def latest_sample(self) -> Path | None:
        """The first prompt's sample of the newest epoch that has one."""
        found = self.all_samples()
        return found[max(found)][0] if found else None

    def samples_of(self, epoch: int) -> list[Path]:
        """The samples already rendered for an epoch (epoch 0's, when a run resumes)."""
        return self.all_samples().get(epoch, [])

    def all_samples(self) -> dict[int, list[Path]]:
        """Every epoch's rendered samples, by epoch."""
        return self._samples("epoch")

    def step_samples(self) -> dict[int, list[Path]]:
        """The samples rendered every N steps, by step."""
        return self._samples("step")

    def _samples(self, kind: str) -> dict[int, list[Path]]:
        """Samples named ``{kind}NNNN-index.png``, by that number."""
        found: dict[int, list[Path]] = {}
        for path in sorted(self.samples_dir.glob(f"{kind}*-*.png")) if self.samples_dir.is_dir() else []:
            number = path.name[len(kind):].split("-")[0]
            if number.isdigit():
                found.setdefault(int(number), []).append(path)
        return found

    def check_writable(self) -> None:
        """Fail before any work if the folder cannot take files."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"Cannot write to output folder '{self.path}': {exc.strerror or exc}. "
                            "Choose a folder you have write access to.") from exc

    def write_job(self, job: RunJob) -> None:
        """Record what the run trains on."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.job_file, json.dumps({**job.record(), "created": time.time()}, indent=2) + "\n")

    def write_sd_scripts(self, job: RunJob) -> list[Path]:
        """The run as sd-scripts takes it (``sd-scripts.toml`` and the dataset file it names), to reproduce there;
        the files written."""
        from .kohya_export import sd_scripts_files

        written = []
        for name, text in sd_scripts_files(job.config, job.base, job.data, str(self.path.resolve())).items():
            write_text_atomic(self.path / name, text)
            written.append(self.path / name)
        return written

    def read_job(self) -> RunJob:
        """The recorded job, or a clear message when this is not a run folder."""
        if not self.job_file.is_file():
            raise UserError(f"'{self.path.name}' is not a lora-gradio run folder (no {JOB_FILE}).")
        try:
            return RunJob.from_record(json.loads(self.job_file.read_text(encoding="utf-8")), f"run '{self.path.name}'")
        except ValueError as exc:
            raise UserError(f"The {JOB_FILE} of run '{self.path.name}' is damaged ({exc}); it cannot be resumed. "
                            "Start a new run instead.") from exc

    @property
    def resumable(self) -> bool:
        """Whether the run was interrupted with a state to continue from."""
        return self.job_file.is_file() and self.state_file.is_file()

    def history(self, steps_per_epoch: int) -> list[JobEvent]:
        """The samples and LoRA files the run made before it was interrupted, as the events that first showed them,
        so a resumed run's page shows the whole run, not only its new part."""
        events = [JobEvent("samples", epoch=epoch, paths=[str(p) for p in paths])
                  for epoch, paths in sorted(self.all_samples().items())]
        events += [JobEvent("samples", epoch=math.ceil(step / steps_per_epoch), paths=[str(p) for p in paths])
                   for step, paths in sorted(self.step_samples().items())]
        return events + [JobEvent("saved", path=str(path)) for path in self.lora_files()]

    def save_state(self, state: dict[str, Any]) -> None:
        """Write the resume state atomically, so a kill mid-write leaves the previous one."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes_atomic(self.state_file, buffer.getvalue())

    def load_state(self) -> dict[str, Any]:
        """The resume state, or a clear message when there is none."""
        import torch

        if not self.state_file.is_file():
            raise UserError(f"Run '{self.path.name}' has nothing to resume: it finished, or stopped before its "
                            "first save.")
        return torch.load(self.state_file, map_location="cpu", weights_only=True)

    def finish(self) -> None:
        """A finished run has nothing left to resume."""
        self.state_file.unlink(missing_ok=True)

    def write_progress(self, steps: int, total_steps: int, losses: list[float], finished: bool,
                       scores: list[Score]) -> None:
        """Record how far the run got, its recent loss (the mean of the last 10 steps) and every held-out score."""
        recent = losses[-10:]
        write_text_atomic(self.path / PROGRESS_FILE, json.dumps({
            "steps": steps, "total_steps": total_steps, "finished": finished,
            "loss": sum(recent) / len(recent) if recent else None,
            "validation": [score.row() for score in scores]}) + "\n")

    def summary(self) -> RunSummary:
        """The run as the list of runs shows it."""
        try:
            progress = json.loads((self.path / PROGRESS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            progress = {}
        if not isinstance(progress, dict):
            progress = {}
        created = self.job_file.stat().st_mtime if self.job_file.is_file() else self.path.stat().st_mtime
        status = "finished" if progress.get("finished") else "interrupted" if self.resumable else "no saved state"
        loss = progress.get("loss")
        return RunSummary(self.path.name, status, time.strftime("%Y-%m-%d %H:%M", time.localtime(created)),
                          int(progress.get("steps") or 0), int(progress.get("total_steps") or 0),
                          float(loss) if isinstance(loss, int | float) else None, created,
                          best_score([score for score in scores_of(progress) if score.file]),
                          self.recommended())

    def recommended(self) -> str:
        """The recommendation in a few words ("epoch 6 at 0.8"), "" where the run has none (or a damaged one)."""
        try:
            advice = json.loads(self.recommendation_file.read_text(encoding="utf-8"))
            return f"epoch {int(advice['epoch'])} at {float(advice['strength']):g}"
        except (OSError, ValueError, KeyError, TypeError):
            return ""


def scores_of(progress: dict) -> list[Score]:
    """The held-out scores a read ``progress.json`` keeps (none where it has none, or they are damaged)."""
    try:
        return [Score(int(step), int(epoch), float(loss), str(file))
                for step, epoch, loss, file in progress.get("validation") or []]
    except (ValueError, TypeError):
        return []


@dataclass(frozen=True)
class RunSummary:
    """One line of the list of runs."""

    name: str
    status: str  # finished, interrupted, no saved state (the page says running for the live one)
    date: str
    steps: int
    total_steps: int
    loss: float | None
    created: float
    best: Score | None = None  # the lowest held-out loss of a saved file
    recommended: str = ""  # the finished run's recommended epoch and strength

    def row(self, now: str = "") -> list[str]:
        """Run, status (``now``, "running" or "queued", where the run trains or waits), date, steps, recent loss, the
        best held-out loss and the recommendation, as table cells."""
        steps = f"{self.steps}/{self.total_steps}" if self.total_steps else "–"
        loss = f"{self.loss:.4f}" if self.loss is not None else "–"
        best = f"{self.best.loss:.4f} (epoch {self.best.epoch})" if self.best else "–"
        return [self.name, now or self.status, self.date, steps, loss, best,
                self.recommended or "–"]


def list_runs(outputs_dir: Path) -> list[RunSummary]:
    """Every run folder under ``outputs_dir``, newest first."""
    folders = [p for p in Path(outputs_dir).glob("*") if (p / JOB_FILE).is_file()]
    return sorted((RunFolder(p).summary() for p in folders), key=lambda r: r.created, reverse=True)


def is_stop_file(path: Path | str) -> bool:
    """Whether a LoRA file is what a stopped run saved, not an epoch's or the finished run's."""
    return STOP_MARK in Path(path).stem


def resumable_runs(outputs_dir: Path) -> list[str]:
    """Run folders that were interrupted and can continue."""
    return sorted(p.name for p in Path(outputs_dir).glob("*") if RunFolder(p).resumable)
