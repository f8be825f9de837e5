"""Background jobs: training, captioning, Prepare, imports and grids all run the same way, as
``work(stop, emit) -> result``: ``emit`` is the one progress report, and a Stop gives a result marked ``stopped``.

The runner keeps each job's state on the server, so a reloaded page shows it live, and gives each job a secret id:
only whoever holds it (the page or script that started the job) can stop it. Training waits in a queue for a free
device, one run per device; the CLI runs the same work in the foreground.
"""

from __future__ import annotations

import heapq
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
from .training.setup import precision_group
from .views import free_accelerator_memory

LOG_LINES = 200
KEEP_FINISHED = 50  # finished jobs whose state stays readable
DEFAULT_DEVICE = "default"  # the one device of a runner not given a list: the best there is
log = logging.getLogger(__name__)
Work = Callable[[threading.Event, Emit], Any]
Place = Callable[[str], Work]  # a queued job's work, made once it has a device


@dataclass
class JobState:
    """Everything a page needs to show a job of any kind, whichever browser tab asks: ``step`` of ``total_steps``
    counts what the job counts (steps, images, files), and ``result`` is the work's own result, which has
    ``stopped`` set when a Stop ended it. A job that counts epochs fills those too; a training job also fills the
    ``losses`` (step, loss, learning rate, from ``loss_offset`` on), its held-out ``validation`` scores (step,
    epoch, loss), its latest ``recommendation``, ``samples`` and ``saved`` files."""

    kind: str = ""
    title: str = ""
    status: str = "idle"  # idle, queued, running, stopping, done, stopped, cancelled, error
    run_dir: str = ""
    device: str = ""  # where a queued job trains, once placed
    added_by: str = ""  # who queued it, as every visitor may read it
    position: int = 0  # a queued job's place in the queue, 1 for the next to start
    starts_in_s: float | None = None  # when a queued job should start, from the estimates of those ahead
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
    place: Place | None = None  # a queued job's work, made once a device is free
    planned_s: float | None = None  # a queued job's estimated length, for the start times of those behind it
    group: str = ""  # queued jobs of another group wait until this one ends


class JobRunner:
    """Runs jobs in background threads; jobs that share an ``exclusive`` key run one at a time, and queued jobs
    (training) wait their turn for one of ``devices``, each device taking one at a time. ``on_queue`` hears every
    change of the queue or of what trains where, so it can be kept on disk."""

    def __init__(self, devices: list[str] | None = None, on_queue: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._queue: list[str] = []  # queued jobs' ids, the next to start first
        self.devices = list(devices or [DEFAULT_DEVICE])
        self.on_queue = on_queue
        self._closing = False  # the server stops: the queue kept on disk stays as it was, for the next start

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
            job = _Job(QueueTicket.new_id(), exclusive, JobState(
                kind, title, "running", run_dir, message="Starting", total_steps=planned_steps, started=time.time()),
                threading.Event(), owner)
            self._add(job)
            self._launch(job, work)
        return job.id

    def queue(self, kind: str, title: str, place: Place, run_dir: str = "", owner: str | None = None,
              added_by: str = "", planned_steps: int = 0, planned_s: float | None = None,
              job_id: str | None = None, group: str = "") -> str:
        """Queue work that needs a device of its own: it starts at once where one is free, else when its turn
        comes; jobs of different ``group`` never run side by side (runs in one process share accelerate's
        precision). Returns the job's id (``job_id`` when a queue kept on disk brings its own back)."""
        with self._lock:
            if job_id in self._jobs and self._jobs[job_id].state.status in ("queued", "running", "stopping"):
                raise UserError("That job is already queued.")
            job = _Job(job_id or QueueTicket.new_id(), None, JobState(
                kind, title, "queued", run_dir, "Queued", added_by=added_by, total_steps=planned_steps),
                threading.Event(), owner, place=place, planned_s=planned_s, group=group)
            self._add(job)
            self._queue.append(job.id)
            self._dispatch()
        self._queue_changed()
        return job.id

    def move(self, job_id: str, position: int, visitor: Visitor = OPERATOR) -> None:
        """Put a queued job at ``position`` (1: next to start); the operator's decision alone."""
        visitor.require_operator("reorder the training queue")
        with self._lock:
            if job_id not in self._queue:
                raise UserError("That run is not waiting in the queue (it started, ended or was cancelled).")
            self._queue.remove(job_id)
            self._queue.insert(max(0, min(int(position) - 1, len(self._queue))), job_id)
        self._queue_changed()

    def queued(self) -> list[tuple[str, JobState]]:
        """What trains on each device, then what waits, in order, by job id, each with its position and start."""
        with self._lock:
            placed = [j for j in self._jobs.values() if j.place is not None and j.state.active]
            waiting = [self._jobs[i] for i in self._queue]
            return [(job.id, self._copy(job.state, len(job.state.losses))) for job in (*placed, *waiting)]

    def _add(self, job: _Job) -> None:
        """Keep a new job, forgetting the oldest finished ones beyond what pages may still ask about."""
        self._jobs[job.id] = job
        finished = [k for k, j in self._jobs.items() if not j.state.active and j.state.status != "queued"]
        for old in finished[:-KEEP_FINISHED]:
            del self._jobs[old]

    def _launch(self, job: _Job, work: Work) -> None:
        job.thread = threading.Thread(target=self._run, args=(job, work), name=job.state.kind, daemon=True)
        job.thread.start()

    def _dispatch(self) -> None:
        """Start queued jobs on the free devices, first in line first (called under the lock)."""
        placed = [j for j in self._jobs.values() if j.place is not None and j.state.active]
        free = [device for device in self.devices if device not in {j.state.device for j in placed}]
        groups = {j.group for j in placed}
        while free and self._queue and groups <= {self._jobs[self._queue[0]].group}:
            job = self._jobs[self._queue.pop(0)]
            groups.add(job.group)
            job.state.device, job.state.status, job.state.started = free.pop(0), "running", time.time()
            job.state.message = "Starting"
            self._launch(job, job.place(job.state.device))

    def _queue_changed(self) -> None:
        if self.on_queue is not None and not self._closing:
            self.on_queue()

    def _forecast(self) -> dict[str, float | None]:
        """Each queued job's expected wait: devices free up as the runs on them end (by their ETA), and each run
        ahead holds its device for its estimate. Unknown from the first estimate missing on."""
        now, frees = time.time(), []
        for job in self._jobs.values():
            if job.place is not None and job.state.active:
                left = job.state.eta_s if job.state.eta_s is not None else \
                    None if job.planned_s is None else max(0.0, job.planned_s - (now - job.state.started))
                frees.append(left)
        frees += [0.0] * (len(self.devices) - len(frees))
        if any(left is None for left in frees):
            return dict.fromkeys(self._queue)
        heapq.heapify(frees)
        waits: dict[str, float | None] = {}
        for index, job_id in enumerate(self._queue):
            planned = self._jobs[job_id].planned_s
            if planned is None:
                return {**waits, **dict.fromkeys(self._queue[index:])}
            waits[job_id] = heapq.heappushpop(frees, frees[0] + planned)  # the soonest free device, then busy
        return waits

    def stop(self, job_id: str, visitor: Visitor = OPERATOR) -> None:
        """Ask the job to stop at its next check; a training job saves what it has learned, and a queued one leaves
        the queue. A job stops only for whoever started it and for the operator, whoever else holds its id."""
        job = self._job(job_id)
        if not visitor.owns(job.owner):
            raise UserError("Another user started this job: only they, or the operator who runs this server, can "
                            "stop it.")
        with self._lock:
            cancelled = job.id in self._queue
            if cancelled:
                self._queue.remove(job.id)
                job.state.status, job.state.message = "cancelled", "Cancelled before it started."
                job.state.log = [*job.state.log, "cancelled: taken out of the queue before it started"]
            elif job.state.active:
                job.stop.set()
                job.state.status = "stopping"
        if cancelled:
            self._queue_changed()

    def stop_all(self, timeout: float | None = None) -> list[str]:
        """Stop every running job (a training run saves what it learned) and wait up to ``timeout`` seconds for them
        to end, as when the server itself is asked to stop; returns their titles."""
        with self._lock:
            self._closing = True
            self._queue.clear()  # nothing more starts; what waits stays in a queue kept on disk
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
        """The newest job of a kind that started (what every visitor's Train tab shows), or an idle state."""
        with self._lock:
            jobs = sorted((j.state for j in self._jobs.values() if j.state.kind == kind and j.state.started),
                          key=lambda state: state.started)
            return self._copy(jobs[-1], since) if jobs else JobState(kind)

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        """Block until the job ends, a queued one through its wait (for the API, the CLI and tests)."""
        job = self._job(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while job.thread is None and job.state.status == "queued":
            if deadline is not None and time.monotonic() > deadline:
                return self.view(job_id)
            time.sleep(0.1)
        if job.thread is not None:
            job.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.view(job_id)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(str(job_id or ""))
        if job is None:
            start = "This page did not start that job" if not job_id else "No job has this id here"
            raise UserError(f"{start}. Only the page or script that started a job holds its id, and only it can "
                            "stop the job.")
        return job

    def _copy(self, state: JobState, since: int) -> JobState:
        """A copy a page may keep (called under the lock); a queued job's with its place and expected start."""
        since = max(0, min(int(since), len(state.losses)))
        ahead = {}
        if state.status == "queued":
            ahead = next(({"position": index + 1, "starts_in_s": self._forecast().get(job_id)}
                          for index, job_id in enumerate(self._queue) if self._jobs[job_id].state is state), {})
        return replace(state, loss_offset=since, losses=state.losses[since:], validation=list(state.validation),
                       samples=list(state.samples), saved=list(state.saved), log=list(state.log),
                       warnings=list(state.warnings), **ahead)

    def _run(self, job: _Job, work: Work) -> None:
        try:
            result = work(job.stop, lambda event: self._on_event(job, event))
            self._finish(job, "stopped" if getattr(result, "stopped", False) else "done", None, result)
        except UserError as exc:
            self._finish(job, "error", str(exc))
        except Exception as exc:  # a crash must reach the page, not kill the app
            log.exception("%s failed", job.state.title)
            self._finish(job, "error", f"{job.state.title} failed unexpectedly: {type(exc).__name__}: {exc}")
        free_accelerator_memory()  # what the job held goes back before the next one starts
        if job.place is not None:  # its device is free: the next in line starts on it
            with self._lock:
                self._dispatch()
            self._queue_changed()

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
    job = RunJob(config, base, data, owner)
    run.write_job(job)
    records = [run.job_file, *run.write_sd_scripts(job)]

    def forget_unsaved() -> None:
        if not run.state_file.is_file():
            for path in records:
                path.unlink(missing_ok=True)
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


@dataclass(frozen=True)
class QueueTicket:
    """How a run enters the queue: who it shows as added by, its estimated length (for the start times of those
    behind it), and the id a queue kept on disk brings back after a restart (None: a new one)."""

    added_by: str = ""
    planned_s: float | None = None
    job_id: str | None = None

    @staticmethod
    def new_id() -> str:
        """A fresh job id: secret, since it is the key to the job's Stop."""
        return secrets.token_urlsafe(16)


Caches = ModelCache | dict[str, ModelCache]  # one cache for every device, or each device's own


def on_device(caches: Caches, device: str) -> ModelCache:
    """The cache of the device a queued run was placed on."""
    return caches[device] if isinstance(caches, dict) else caches


def start_training(runner: JobRunner, caches: Caches, config: TrainConfig, base: BaseModelSpec, data: TrainData,
                   run_dir: Path, owner: str | None = None, finish: Finish | None = None,
                   planned_steps: int = 0, ticket: QueueTicket = QueueTicket()) -> str:
    """Queue a run: it trains at once on a free device, else when its turn comes; returns the job id that Stop (or
    cancelling it while it waits) needs."""
    return runner.queue("training", f"Training {Path(run_dir).name}", lambda device: lambda stop, emit: _then(
        run_training(config, base, data, run_dir, emit, stop, on_device(caches, device), owner), emit, finish),
        str(run_dir), owner, ticket.added_by, planned_steps, ticket.planned_s, ticket.job_id,
        precision_group(config))


def start_resume(runner: JobRunner, caches: Caches, run_dir: Path, owner: str | None = None,
                 finish: Finish | None = None, ticket: QueueTicket = QueueTicket()) -> str:
    """Queue an interrupted run to continue; returns the job id that Stop needs."""
    job = RunFolder(Path(run_dir)).read_job()  # fail here, in the caller, when the folder is not a run
    title = f"Training {Path(run_dir).name} (resumed)"
    return runner.queue("training", title, lambda device: lambda stop, emit: _then(
        resume_training(run_dir, emit, stop, on_device(caches, device)), emit, finish), str(run_dir), owner,
        ticket.added_by, 0, ticket.planned_s, ticket.job_id, precision_group(job.config))
