"""One training job at a time, run in the background; its state lives here, not in any browser tab.

The CLI runs the same ``run_training`` in the foreground. Each run folder holds ``job.json`` (config, base model,
dataset), so an interrupted run can be resumed after a restart.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_text_atomic
from .errors import UserError
from .models import BaseModelSpec, ModelCache
from .training.config import TrainConfig, make_config
from .training.loop import TrainEvent, TrainResult, check_writable, state_path, train

JOB_FILE = "job.json"
LOG_LINES = 200


def write_job_file(run_dir: Path, config: TrainConfig, base: BaseModelSpec, data_dir: Path) -> None:
    """Record what a run needs to be resumed: its config, base model and dataset."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / JOB_FILE, json.dumps({
        "config": config.to_dict(), "base": asdict(base), "data_dir": str(data_dir), "created": time.time()},
        indent=2) + "\n")


def read_job_file(run_dir: Path) -> tuple[TrainConfig, BaseModelSpec, Path]:
    """The config, base model and dataset of an earlier run."""
    path = Path(run_dir) / JOB_FILE
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a lora-gradio run folder (no {JOB_FILE}).")
    job = json.loads(path.read_text(encoding="utf-8"))
    return make_config(job["config"], f"run '{Path(run_dir).name}'"), BaseModelSpec(**job["base"]), Path(
        job["data_dir"])


def run_training(config: TrainConfig, base: BaseModelSpec, data_dir: Path, run_dir: Path,
                 on_event: Callable[[TrainEvent], None] | None = None, stop: threading.Event | None = None,
                 cache: ModelCache | None = None) -> TrainResult:
    """Start a run in ``run_dir``, recording it so it can be resumed (a run that fails before saving leaves none)."""
    check_writable(Path(run_dir))
    write_job_file(Path(run_dir), config, base, Path(data_dir))
    try:
        return train(config, base, data_dir, run_dir, on_event=on_event, stop=stop, cache=cache)
    except BaseException:
        if not state_path(run_dir).is_file():
            (Path(run_dir) / JOB_FILE).unlink(missing_ok=True)
        raise


def resume_training(run_dir: Path, on_event: Callable[[TrainEvent], None] | None = None,
                    stop: threading.Event | None = None, cache: ModelCache | None = None) -> TrainResult:
    """Continue an interrupted run from its last saved state, with its own config and data."""
    config, base, data_dir = read_job_file(run_dir)
    if not state_path(run_dir).is_file():
        raise UserError(f"Run '{Path(run_dir).name}' has nothing to resume: it finished, or stopped before its "
                        "first save.")
    return train(config, base, data_dir, run_dir, on_event=on_event, stop=stop, cache=cache, resume=True)


def resumable_runs(outputs_dir: Path) -> list[str]:
    """Run folders that were interrupted and can continue."""
    return sorted(p.name for p in Path(outputs_dir).glob("*") if (p / JOB_FILE).is_file() and state_path(p).is_file())


@dataclass
class JobState:
    """Everything a page needs to show the job, whichever browser tab asks."""

    status: str = "idle"  # idle, running, stopping, done, stopped, error
    run_dir: str = ""
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    eta_s: float | None = None
    it_per_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, str]] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = 0.0


class TrainingJobs:
    """Runs at most one training job in a background thread and keeps its live state."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._state = JobState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether a job is in progress."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, config: TrainConfig, base: BaseModelSpec, data_dir: Path, run_dir: Path) -> None:
        """Train in the background; a second start while one runs is refused."""
        self._launch(Path(run_dir), lambda stop, on_event: run_training(
            config, base, data_dir, run_dir, on_event=on_event, stop=stop, cache=self.cache))

    def resume(self, run_dir: Path) -> None:
        """Continue an interrupted run in the background."""
        read_job_file(run_dir)  # fail here, in the caller, when the folder is not a run
        self._launch(Path(run_dir), lambda stop, on_event: resume_training(
            run_dir, on_event=on_event, stop=stop, cache=self.cache))

    def stop(self) -> None:
        """Ask the running job to stop after its current step; it saves what it has learned."""
        if self.running:
            self._stop.set()
            with self._lock:
                self._state.status = "stopping"

    def view(self) -> JobState:
        """A consistent copy of the job's state."""
        with self._lock:
            state = self._state
            return JobState(**{**asdict(state), "losses": list(state.losses), "samples": list(state.samples),
                               "saved": list(state.saved), "log": list(state.log), "warnings": list(state.warnings)})

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current job ends (for the CLI and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _launch(self, run_dir: Path, work: Callable[[threading.Event, Callable[[TrainEvent], None]], TrainResult],
                ) -> None:
        with self._lock:
            if self.running:
                raise UserError(f"A training job is already running ({Path(self._state.run_dir).name}, step "
                                f"{self._state.step}/{self._state.total_steps}). Wait for it or press Stop first.")
            self._stop = threading.Event()
            self._state = JobState(status="running", run_dir=str(run_dir), message="Starting", started=time.time())
            stop = self._stop
            self._thread = threading.Thread(target=self._run, args=(work, stop), name="training", daemon=True)
            self._thread.start()

    def _run(self, work: Callable[..., TrainResult], stop: threading.Event) -> None:
        try:
            result = work(stop, self._on_event)
            with self._lock:
                self._state.status = "stopped" if result.stopped else "done"
        except UserError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a crash must reach the page, not kill the app
            self._fail(f"Training failed unexpectedly: {type(exc).__name__}: {exc}")

    def _fail(self, message: str) -> None:
        with self._lock:
            self._state.status = "error"
            self._state.message = message
            self._state.log.append(f"error: {message}")

    def _on_event(self, event: TrainEvent) -> None:
        with self._lock:
            state = self._state
            if event.kind == "step":
                state.step, state.total_steps = event.step, event.total_steps
                state.epoch, state.total_epochs = event.epoch, event.total_epochs
                state.eta_s, state.it_per_s = event.eta_s, event.it_per_s
                state.losses.append((event.step, float(event.loss)))
                return
            if event.total_steps:
                state.total_steps, state.total_epochs = event.total_steps, event.total_epochs
            if event.kind == "samples":
                state.samples.extend((event.epoch, p) for p in event.paths)
            elif event.kind == "saved" and event.path:
                state.saved.append(event.path)
            elif event.kind == "warning":
                state.warnings.append(event.message)
            if event.message:
                state.message = event.message
                prefix = f"{event.kind}: " if event.kind in ("warning", "error") else ""
                state.log = [*state.log, prefix + event.message][-LOG_LINES:]
