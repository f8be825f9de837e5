"""Background jobs: training, captioning, Prepare, imports and grids all run the same way, as
``work(stop, emit) -> result``: ``emit`` is the one progress report, and a Stop gives a result marked ``stopped``.

The runner keeps each job's state on the server, so a reloaded page shows it live, and gives each job a secret id:
only whoever holds it (the page or script that started the job) can stop it. The CLI runs the same work in the
foreground.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .access import OPERATOR, Visitor
from .cache import ModelCache
from .errors import UserError
from .events import Emit, JobEvent
from .models import BaseModelSpec
from .training.config import TrainConfig
from .training.data import TrainData
from .training.loop import train
from .training.result import TrainResult
from .training.run_folder import RunFolder, RunJob

LOG_LINES = 200
KEEP_FINISHED = 50  # finished jobs whose state stays readable
log = logging.getLogger(__name__)
Work = Callable[[threading.Event, Emit], Any]


@dataclass
class JobState:
    """Everything a page needs to show a job of any kind, whichever browser tab asks: ``step`` of ``total_steps``
    counts what the job counts (steps, images, files), and ``result`` is the work's own result, which has
    ``stopped`` set when a Stop ended it. A job that counts epochs fills those too; a training job also fills the
    ``losses`` (step, loss, learning rate, from ``loss_offset`` on), its held-out ``validation`` scores (step,
    epoch, loss), its latest ``recommendation``, ``samples`` and ``saved`` files."""

    kind: str = ""
    title: str = ""
    status: str = "idle"  # idle, running, stopping, done, stopped, error
    run_dir: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    eta_s: float | None = None
    it_per_s: float | None = None
    loss_offset: int = 0
    losses: list[tuple[int, float, float | None]] = field(default_factory=list)
    validation: list[tuple[int, int, float]] = field(default_factory=list)
    recommendation: dict | None = None  # the run's latest recommendation, as recommendation.json keeps it
    samples: list[tuple[int, str]] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = 0.0
    result: Any = None

    @property
    def active(self) -> bool:
        """Still working (running, or stopping after a Stop)."""
        return self.status in ("running", "stopping")


@dataclass
class _Job:
    id: str
    exclusive: str | None
    state: JobState
    stop: threading.Event
    owner: str | None = None  # the visitor who started it (a login, or a browser's id); None: the operator
    thread: threading.Thread | None = None


class JobRunner:
    """Runs jobs in background threads; jobs that share an ``exclusive`` key (training, say) run one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    def start(self, kind: str, title: str, work: Work, exclusive: str | None = None, run_dir: str = "",
              owner: str | None = None, planned_steps: int = 0) -> str:
        """Run ``work`` in the background and return the job's id, the key to its Stop (with ``owner``'s login).
        ``planned_steps`` is shown as the total until the work counts its own."""
        with self._lock:
            busy = next((j.state for j in self._jobs.values() if exclusive and j.exclusive == exclusive
                         and j.state.active), None)
            if busy is not None:
                progress = f", step {busy.step}/{busy.total_steps}" if busy.total_steps else ""
                raise UserError(f"{busy.title} is already running{progress}. Wait for it or press Stop first.")
            job = _Job(secrets.token_urlsafe(16), exclusive, JobState(
                kind, title, "running", run_dir, "Starting", total_steps=planned_steps, started=time.time()),
                threading.Event(), owner)
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if not j.state.active]
            for old in finished[:-KEEP_FINISHED]:
                del self._jobs[old]
            job.thread = threading.Thread(target=self._run, args=(job, work), name=kind, daemon=True)
            job.thread.start()
        return job.id

    def stop(self, job_id: str, visitor: Visitor = OPERATOR) -> None:
        """Ask the job to stop at its next check; a training job saves what it has learned. A job stops only for
        whoever started it and for the operator, whoever else holds its id."""
        job = self._job(job_id)
        if not visitor.owns(job.owner):
            raise UserError("Another user started this job: only they, or the operator who runs this server, can "
                            "stop it.")
        with self._lock:
            if job.state.active:
                job.stop.set()
                job.state.status = "stopping"

    def stop_all(self, timeout: float | None = None) -> list[str]:
        """Stop every running job (a training run saves what it learned) and wait up to ``timeout`` seconds for them
        to end, as when the server itself is asked to stop; returns their titles."""
        with self._lock:
            running = [job for job in self._jobs.values() if job.state.active]
            for job in running:
                job.stop.set()
                job.state.status = "stopping"
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in running:
            if job.thread is not None:
                job.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return [job.state.title for job in running]

    def view(self, job_id: str, since: int = 0) -> JobState:
        """A consistent copy of one job's state, with only the losses from index ``since`` on."""
        job = self._job(job_id)
        with self._lock:
            return self._copy(job.state, since)

    def latest(self, kind: str, since: int = 0) -> JobState:
        """The newest job of a kind (what every visitor's Train tab shows), or an idle state."""
        with self._lock:
            jobs = [j.state for j in self._jobs.values() if j.state.kind == kind]
            return self._copy(jobs[-1], since) if jobs else JobState(kind)

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Block until the job ends (for the API, the CLI and tests)."""
        job = self._job(job_id)
        if job.thread is not None:
            job.thread.join(timeout)
        return self.view(job_id)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(str(job_id or ""))
        if job is None:
            start = "This page did not start that job" if not job_id else "No job has this id here"
            raise UserError(f"{start}. Only the page or script that started a job holds its id, and only it can "
                            "stop the job.")
        return job

    @staticmethod
    def _copy(state: JobState, since: int) -> JobState:
        since = max(0, min(int(since), len(state.losses)))
        return replace(state, loss_offset=since, losses=state.losses[since:], validation=list(state.validation),
                       samples=list(state.samples),
                       saved=list(state.saved), log=list(state.log), warnings=list(state.warnings))

    def _run(self, job: _Job, work: Work) -> None:
        try:
            result = work(job.stop, lambda event: self._on_event(job, event))
            self._finish(job, "stopped" if getattr(result, "stopped", False) else "done", None, result)
        except UserError as exc:
            self._finish(job, "error", str(exc))
        except Exception as exc:  # a crash must reach the page, not kill the app
            log.exception("%s failed", job.state.title)
            self._finish(job, "error", f"{job.state.title} failed unexpectedly: {type(exc).__name__}: {exc}")

    def _finish(self, job: _Job, status: str, message: str | None, result: Any = None) -> None:
        with self._lock:
            state = job.state
            state.status, state.result, state.eta_s = status, result, None
            if message:
                state.message = message
                state.log = [*state.log, f"{'error' if status == 'error' else status}: {message}"][-LOG_LINES:]

    def _on_event(self, job: _Job, event: JobEvent) -> None:
        with self._lock:
            state = job.state
            if event.total_steps:
                state.step, state.total_steps = event.step, event.total_steps
                state.total_epochs = event.total_epochs or state.total_epochs
            if event.kind == "step":
                state.epoch, state.eta_s, state.it_per_s = event.epoch, event.eta_s, event.it_per_s
                state.losses.append((event.step, float(event.loss), event.lr))
                return
            if event.kind == "history":
                state.losses = list(event.points)
            elif event.kind == "validation":
                state.validation.append((event.step, event.epoch, float(event.loss)))
            elif event.kind == "recommendation":
                state.recommendation = event.record
            elif event.kind == "progress" and event.step:
                elapsed = time.time() - state.started
                state.eta_s = elapsed / event.step * (event.total_steps - event.step)
            elif event.kind == "samples":
                state.samples.extend((event.epoch, p) for p in event.paths)
            elif event.kind == "saved" and event.path:
                state.saved.append(event.path)
            elif event.kind == "warning":
                state.warnings.append(event.message)
            if event.message:
                state.message = event.message
                prefix = f"{event.kind}: " if event.kind in ("warning", "error") else ""
                state.log = [*state.log, prefix + event.message][-LOG_LINES:]


def run_training(config: TrainConfig, base: BaseModelSpec, data: TrainData, run_dir: Path,
                 on_event: Emit | None = None, stop: threading.Event | None = None,
                 cache: ModelCache | None = None, owner: str | None = None) -> TrainResult:
    """Start a run in ``run_dir``, recording it (and who started it) so it can be resumed; a run that fails or
    stops before saving leaves none."""
    run = RunFolder(Path(run_dir))
    created = not run.path.exists()
    run.check_writable()
    run.write_job(RunJob(config, base, data, owner))

    def forget_unsaved() -> None:
        if not run.state_file.is_file():
            run.job_file.unlink(missing_ok=True)
            if created and not any(run.path.iterdir()):
                run.path.rmdir()

    try:
        result = train(config, base, data, run_dir, on_event=on_event, stop=stop, cache=cache)
    except BaseException:
        forget_unsaved()
        raise
    if result.stopped:
        forget_unsaved()
    return result


def resume_training(run_dir: Path, on_event: Emit | None = None, stop: threading.Event | None = None,
                    cache: ModelCache | None = None) -> TrainResult:
    """Continue an interrupted run from its last saved state, with its own config and data."""
    run = RunFolder(Path(run_dir))
    job = run.read_job()
    run.load_state()  # a clear message now when there is nothing to resume
    return train(job.config, job.base, job.data, run.path, on_event=on_event, stop=stop, cache=cache, resume=True)


Finish = Callable[[TrainResult, Emit], None]  # runs after training in the same job, e.g. to install the LoRA


def _then(result: TrainResult, emit: Emit, finish: Finish | None) -> TrainResult:
    """Run the after-run steps; the LoRA is written, so a failure among them is a warning, never a failed run."""
    if finish is not None and result.lora_path is not None and not result.stopped:
        try:
            finish(result, emit)
        except Exception as exc:  # timings, a ComfyUI copy, a card: each is extra to what the run made
            log.warning("an after-run step failed", exc_info=True)
            emit(JobEvent("warning", f"The LoRA was saved, but an after-run step failed: {exc}"))
    return result


def start_training(runner: JobRunner, cache: ModelCache, config: TrainConfig, base: BaseModelSpec, data: TrainData,
                   run_dir: Path, owner: str | None = None, finish: Finish | None = None,
                   planned_steps: int = 0) -> str:
    """Train in the background (one training at a time); returns the job id that Stop needs."""
    return runner.start("training", f"Training {Path(run_dir).name}", lambda stop, emit: _then(run_training(
        config, base, data, run_dir, on_event=emit, stop=stop, cache=cache, owner=owner), emit, finish),
        exclusive="training", run_dir=str(run_dir), owner=owner, planned_steps=planned_steps)


def start_resume(runner: JobRunner, cache: ModelCache, run_dir: Path, owner: str | None = None,
                 finish: Finish | None = None) -> str:
    """Continue an interrupted run in the background; returns the job id that Stop needs."""
    RunFolder(Path(run_dir)).read_job()  # fail here, in the caller, when the folder is not a run
    return runner.start("training", f"Training {Path(run_dir).name} (resumed)", lambda stop, emit: _then(
        resume_training(run_dir, on_event=emit, stop=stop, cache=cache), emit, finish), exclusive="training",
        run_dir=str(run_dir), owner=owner)
