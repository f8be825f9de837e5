"""The studio's training queue, kept in the workspace: what trains on each device and what waits, in order, so a
restart of the server (or of its container) carries on where it stopped."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..access import LOCAL, OPERATOR, Visitor
from ..atomic import write_text_atomic
from ..errors import UserError
from ..estimate import format_duration
from ..jobs import Finish, JobState, QueueTicket, start_resume, start_training
from ..training.run_folder import RunJob
from .desk import Desk

QUEUE_FILE = "queue.json"
QUEUE_COLUMNS = ["place", "run", "added by", "steps", "starts"]
YOU = " (you)"  # after the name of whoever added a run, in the queue the visitor sees


@dataclass(frozen=True)
class Entry:
    """One run of the queue as the file keeps it: its job id ("" until it has one), run folder (under outputs/),
    owner and shown name, planned steps and seconds, and what it trains: a new run's job record, or None to resume
    the folder. ``device`` is where it trained when the file was written ("" while it waits)."""

    id: str
    run: str
    owner: str | None
    added_by: str
    planned_steps: int = 0
    planned_s: float | None = None
    job: dict[str, Any] | None = None
    device: str = ""


def added_by(visitor: Visitor) -> str:
    """How the queue names who added a run: the login; a browser's id stays secret, since it is their key."""
    if visitor.name is None or (visitor.name == LOCAL and visitor.operator):
        return "operator"
    return "a visitor without a login" if visitor.name.startswith("browser ") else visitor.name


def read_queue(path: Path) -> list[Entry]:
    """The entries a queue file kept, what was training first; ValueError when it is damaged."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["runs"]
        entries = [Entry(**record) for record in records]
    except FileNotFoundError:
        return []
    except (OSError, KeyError, TypeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    return sorted(entries, key=lambda entry: not entry.device)


class Queueing(Desk):
    """Runs enter a queue; its order and what trains where are written to ``queue.json`` at every change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._entries: dict[str, Entry] = {}
        self._writing = threading.Lock()
        self.jobs.on_queue = self.remember_queue

    @property
    def queue_file(self) -> Path:
        """Where the queue survives a restart."""
        return self.workspace.root / QUEUE_FILE

    def enqueue(self, entry: Entry, finish: Finish | None) -> str:
        """Queue a new run (``entry.job``) or the resumption of ``entry.run``; it starts at once on a free device.
        Returns the job id: the key to its Stop, or to cancelling it while it waits."""
        folder = self.workspace.outputs_dir / entry.run
        job_id = entry.id or QueueTicket.new_id()
        self._entries[job_id] = replace(entry, id=job_id, device="")  # known before it starts and writes the file
        ticket = QueueTicket(entry.added_by, entry.planned_s, job_id)
        try:
            if entry.job is None:
                start_resume(self.jobs, self.caches, folder, entry.owner, finish, ticket)
            else:
                job = RunJob.from_record(entry.job, f"queued run '{entry.run}'")
                start_training(self.jobs, self.caches, job.config, job.base, job.data, folder, entry.owner, finish,
                               entry.planned_steps, ticket)
        except BaseException:
            self._entries.pop(job_id, None)
            raise
        self.remember_queue()
        return job_id

    def remember_queue(self) -> None:
        """Write what trains where and what waits, in order (the runner calls this at every change)."""
        with self._writing:
            queued = self.jobs.queued()
            kept = [replace(self._entries[job_id], device=state.device if state.status != "queued" else "")
                    for job_id, state in queued if job_id in self._entries]
            listed = {job_id for job_id, _ in queued}
            for job_id in [job_id for job_id in self._entries if job_id not in listed and self._ended(job_id)]:
                del self._entries[job_id]
            write_text_atomic(self.queue_file, json.dumps({"runs": [asdict(e) for e in kept]}, indent=2) + "\n")

    def _ended(self, job_id: str) -> bool:
        """Whether a job ran and ended, or left the queue (one being queued right now has not)."""
        try:
            state = self.jobs.view(job_id)
        except UserError:
            return False
        return not state.active and state.status != "queued"

    def queue_rows(self, visitor: Visitor = OPERATOR) -> list[list[str]]:
        """What trains on each device, then what waits: place, run, who added it (you, for the visitor's own),
        steps and the expected start."""
        rows = []
        for job_id, state in self.jobs.queued():
            entry = self._entries.get(job_id)
            mine = YOU if entry and visitor.name is not None and entry.owner == visitor.name else ""
            if state.status == "queued":
                place = str(state.position)
                starts = "in about " + format_duration(state.starts_in_s) if state.starts_in_s is not None else \
                    "after the runs ahead (no estimate)"
            else:
                place = "training" + (f" on {state.device}" if len(self.jobs.devices) > 1 else "")
                starts = "now"
            steps = f"{state.step}/{state.total_steps}" if state.total_steps else "–"
            rows.append([place, Path(state.run_dir).name, state.added_by + mine, steps, starts])
        return rows

    def waiting_for(self, visitor: Visitor, job_ids: list[str] | None = None) -> list[JobState]:
        """The runs of the visitor's that wait in the queue, with a page's own ``job_ids`` whoever added them."""
        return [state for queued_id, state in self.jobs.queued() if state.status == "queued" and (
            queued_id in (job_ids or []) or (visitor.name is not None and queued_id in self._entries
                                    and self._entries[queued_id].owner == visitor.name))]

    def queue_line(self, state: JobState) -> str:
        """A job's place in one sentence: training now (on which device), or its place in the queue and when it
        should start."""
        run = Path(state.run_dir).name
        if state.status != "queued":
            where = f" on {state.device}" if len(self.jobs.devices) > 1 and state.device else ""
            return f"Run {run} is {'training' if state.active else state.status}{where}."
        when = f"; it should start in about {format_duration(state.starts_in_s)}" \
            if state.starts_in_s is not None else ", after the runs ahead of it"
        return (f"Run {run} is queued, position {state.position}{when}. It starts by itself; you may close this "
                "page.")

    def move_in_queue(self, run: str | None, position: int, visitor: Visitor = OPERATOR) -> str:
        """Put a waiting run at ``position`` (1: next to start); the operator's decision alone."""
        visitor.require_operator("reorder the training queue")
        if isinstance(position, bool) or not isinstance(position, int) or not 1 <= position <= 10_000:
            raise UserError("Give the new place as a whole number from 1 (next to start).")
        self.jobs.move(self.queued_id(run), position, visitor)
        waiting = [state for _, state in self.jobs.queued() if state.status == "queued"]
        return f"Run {run} is now number {min(position, len(waiting))} in the queue."

    def cancel_queued(self, run: str | None, visitor: Visitor = OPERATOR) -> str:
        """Take a waiting run out of the queue: the visitor's own, or any for the operator."""
        self.jobs.stop(self.queued_id(run), visitor)
        return f"Run {run} left the queue."

    def queued_runs(self) -> dict[str, str]:
        """The runs that train now or wait in the queue, by folder name: "running" or "queued"."""
        return {Path(state.run_dir).name: "queued" if state.status == "queued" else "running"
                for _, state in self.jobs.queued()}

    def queued_id(self, run: str | None) -> str:
        """The job id of a run waiting in the queue, by its folder name as the queue shows it."""
        found = [job_id for job_id, state in self.jobs.queued()
                 if state.status == "queued" and Path(state.run_dir).name == run]
        if not run or not found:
            raise UserError(f"Run {run or '(none)'} is not waiting in the queue: it started, ended or left it. "
                            "Pick a run from the queue's list.")
        return found[0]
