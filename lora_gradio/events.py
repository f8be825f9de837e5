"""The one progress report every job sends: training, captioning, Prepare and grids alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class JobEvent:
    """``kind`` is status, progress, warning, step, epoch, saved, samples, history, validation (a held-out score in
    ``loss``), recommendation (its JSON in ``record``), done, stopped or error.

    ``step``/``total_steps`` count whatever the job counts (training steps, images); training also fills the rest.
    A resumed run first sends ``history``: the ``points`` (step, loss, learning rate) it had already made.
    """

    kind: str
    message: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    path: str | None = None
    paths: list[str] = field(default_factory=list)
    points: list[tuple[int, float, float | None]] = field(default_factory=list)
    record: dict | None = None


Emit = Callable[[JobEvent], None]


def ignore(event: JobEvent) -> None:
    """The ``emit`` of work run with no one watching (tests, scripts)."""


def progress(emit: Emit, text: str, done: int, total: int) -> None:
    """Report ``done`` of ``total`` things counted, with ``text`` formatted by those two numbers."""
    emit(JobEvent("progress", text.format(done, total), step=done, total_steps=total))


def status_events(emit: Emit) -> Callable[[str], None]:
    """An ``on_wait`` callback that shows the cache's queue position as the job's message."""
    return lambda text: emit(JobEvent("status", text))
