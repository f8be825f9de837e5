"""The one model cache: it keeps one heavy model loaded (a base pipeline or the captioner) and lends it out under a
lease, so testing right after training loads nothing."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .captioners import CAPTIONER_KINDS, family
from .errors import Stopped, UserError
from .models import DEMO, BaseModelSpec, load_pipeline
from .threads import fit_threads
from .views import free_accelerator_memory, pick_device, place_pipeline, torch_device

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

T = TypeVar("T")
STOP_CHECK_S = 0.5  # how often a job waiting for the model looks at its Stop


@dataclass(frozen=True)
class CacheStatus:
    """A snapshot of the cache for the page and the API: what is loaded, who uses it, who waits."""

    model: str | None  # "pipeline demo", "captioner …", or None when empty
    size_gb: float
    device: str
    user: str | None  # what holds the lease now
    waiting: tuple[str, ...]  # what waits for it, first in line first
    alive: int  # models this cache loaded that are still in memory: 1 at most unless something leaks one
    loads: int

    def line(self) -> str:
        """One line for the top of the page."""
        if self.model is None:
            text = f"Loading a model for {self.user}" if self.user else "No model loaded yet"
        else:
            device = "GPU" if self.device == "cuda" else self.device.upper()
            text = f"Loaded: {self.model} ({self.size_gb:.2f} GB, {device})"
            if self.user:
                text += f" · in use by {self.user}"
        if self.waiting:
            text += f" · waiting: {len(self.waiting)} ({', '.join(self.waiting)})"
        return text


@dataclass
class _Holder:
    thread: int
    what: str
    long: bool


class ModelCache:
    """Holds the one heavy model in memory (a base pipeline or the captioner) and lends it out under a lease.

    ``with cache.use(key, loader, what) as model`` is the only way to reach the model: the holder has it alone until
    the block ends, others wait in arrival order, and a long holder (training) makes newcomers get "busy" at once.
    Asking for a different model releases the current one first, so two never compete for memory. Holders must not
    change the model; they work on views (:func:`pipeline_view`) and keep derived state with :meth:`derived`.
    """

    def __init__(self, device: str | None = None) -> None:
        self.device_name = device  # the slot it serves (cuda:1, cpu#2); None: the best device there is
        self._cond = threading.Condition()
        self._key: Hashable | None = None
        self._model: Any = None
        self._derived: dict[str, Any] = {}
        self._holder: _Holder | None = None
        self._queue: list[tuple[object, str]] = []  # (ticket, what) of each waiting user, in arrival order
        self._loaded: list[weakref.ref] = []
        self.loads = 0

    @contextmanager
    def use(self, key: Hashable, loader: Callable[[], T], what: str, long: bool = False,
            on_wait: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Iterator[T]:
        """Lease the model for ``key`` (loading it with ``loader`` if another or none is held) for ``what``.

        ``on_wait`` hears "waiting for the model: … ahead of you" while others are served first; it runs under the
        cache's lock, so it must be quick. ``stop`` ends the wait (and skips the use after a load) with a message.
        """
        self._acquire(what, long, on_wait, stop)
        try:
            fit_threads()  # this job runs on the cores free now
            if self._key != key or self._model is None:
                self._drop()
                model = loader()  # outside the lock: the status line stays live during a long load
                with self._cond:
                    self._model, self._key = model, key
                    self._loaded = [ref for ref in self._loaded if ref() is not None] + [weakref.ref(model)]
                    self.loads += 1
            if stop is not None and stop.is_set():
                raise Stopped(f"Stopped: {what} ended before it began, once the model was loaded.")
            yield self._model
        finally:
            self._give_back()

    def derived(self, name: str, make: Callable[[], T]) -> T:
        """State built from the held model (a view with a LoRA attached, say), kept until the model is released."""
        with self._cond:
            if self._holder is None or self._holder.thread != threading.get_ident():
                raise RuntimeError("derived() is for the lease holder only")
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    def pipeline(self, spec: BaseModelSpec, what: str, long: bool = False,
                 on_wait: Callable[[str], None] | None = None, stop: threading.Event | None = None,
                 ) -> AbstractContextManager[StableDiffusionPipeline]:
        """Lease the base pipeline for ``spec``, loaded once onto the best device in its inference precision."""
        return self.use(("pipeline", spec), lambda: place_pipeline(load_pipeline(spec), self.device), what, long,
                        on_wait, stop)

    @property
    def device(self) -> torch.device:
        """Where this cache's models run."""
        return torch_device(self.device_name) if self.device_name else pick_device()

    @property
    def busy(self) -> bool:
        """Whether a long job (training) holds the model, so anyone else would be refused."""
        with self._cond:
            return self._holder is not None and self._holder.long

    def release(self) -> None:
        """Drop the cached model and give its memory back, once whoever holds it has finished."""
        self._acquire("releasing the model", False, None, None)
        try:
            self._drop()
        finally:
            self._give_back()

    def status(self) -> CacheStatus:
        """What is loaded, who holds it and who waits; never waits for a load in progress."""
        with self._cond:
            model, key, holder = self._model, self._key, self._holder
            waiting = tuple(what for _, what in self._queue)
            alive = sum(ref() is not None for ref in self._loaded)
        if model is None or key is None:
            return CacheStatus(None, 0.0, "", holder.what if holder else None, waiting, alive, self.loads)
        parts = model.components.values() if hasattr(model, "components") else [getattr(model, "model", model)]
        tensors = [p for m in parts if hasattr(m, "parameters") for p in m.parameters()]
        size = sum(p.numel() * p.element_size() for p in tensors) / 2**30
        return CacheStatus(_label(key), size, tensors[0].device.type if tensors else "cpu",
                           holder.what if holder else None, waiting, alive, self.loads)

    def describe(self) -> str:
        """The status as one line, for the top of the page."""
        return self.status().line()

    @property
    def holds(self) -> Hashable | None:
        """The key of what is cached now, for display."""
        return self._key

    def _acquire(self, what: str, long: bool, on_wait: Callable[[str], None] | None,
                 stop: threading.Event | None) -> None:
        """Wait for this caller's turn in arrival order (or until ``stop``), then hold the lease."""
        ticket = object()
        with self._cond:
            self._refuse_during_long_job()
            if self._holder is not None and self._holder.thread == threading.get_ident():
                raise RuntimeError(f"{what} asked for the model while this thread already holds it")
            self._queue.append((ticket, what))
            try:
                told = ""
                while self._holder is not None or self._queue[0][0] is not ticket:
                    self._refuse_during_long_job()
                    message = self._waiting_message(ticket)
                    if on_wait is not None and message != told:
                        on_wait(message)
                        told = message
                    if stop is not None and stop.is_set():
                        raise Stopped(f"Stopped while waiting for the model: {what} did not start.")
                    self._cond.wait(timeout=None if stop is None else STOP_CHECK_S)
            finally:
                self._queue = [entry for entry in self._queue if entry[0] is not ticket]
                self._cond.notify_all()
            self._holder = _Holder(threading.get_ident(), what, long)

    def _give_back(self) -> None:
        with self._cond:
            self._holder = None
            self._cond.notify_all()

    def _refuse_during_long_job(self) -> None:
        if self._holder is not None and self._holder.long:
            raise UserError(f"The model is busy with {self._holder.what}. Try again when it has finished, "
                            "or stop it first.")

    def _waiting_message(self, ticket: object) -> str:
        ahead = next(i for i, (t, _) in enumerate(self._queue) if t is ticket) + (self._holder is not None)
        using = f"{self._holder.what} is running" if self._holder else "starting"
        return f"waiting for the model: {using}, {ahead} ahead of you"

    def _drop(self) -> None:
        with self._cond:
            self._model, self._key, self._derived = None, None, {}
        free_accelerator_memory()


def _label(key: Hashable) -> str:
    """'demo model' for ("pipeline", demo spec), 'BLIP captioner Salesforce/…' or 'WD tagger …' for
    ("captioner", source)."""
    if isinstance(key, tuple) and len(key) == 2:
        kind, what = key
        name = what.display_name if isinstance(what, BaseModelSpec) else str(what)
        if kind == "captioner":
            return f"{CAPTIONER_KINDS[family(name)]} {name}"
        return "demo model" if name == DEMO else name
    return str(key)
