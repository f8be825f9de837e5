"""A run's clock: what each step, each round of samples and each save took, kept apart so the speed shown is the
steps' own, the ETA counts what is still to render and save, and later runs are estimated from what this one cost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..estimate import RunCosts, sample_megapixels, saves_to_come, size_key, step_kind, step_megapixels
from .config import TrainConfig

RECENT_STEPS = 20  # the speed shown is over this many steps


class RunClock:
    """Times the run's steps between other work: a step's time runs from the end of whatever came before it."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.steps: list[float] = []
        self.renders: list[float] = []  # seconds of each round of samples
        self.saves: list[float] = []  # seconds of each LoRA file with its card and workflow
        self.validations: list[float] = []  # seconds of each scoring of the held-out images
        self.judging: list[float] = []  # seconds of each judging of a saved file's samples, and of the strength trials
        self.encode: dict[str, float] = {}
        self.tick = time.perf_counter()

    def encoded(self, seconds: float, count: int) -> None:
        """Encoding ``count`` images to latents took ``seconds``."""
        if count:
            self.encode = {size_key(self.config.resolution ** 2 / 1e6): seconds / count}

    def step(self) -> float:
        """A step ended now: its seconds."""
        now = time.perf_counter()
        self.steps.append(now - self.tick)
        self.tick = now
        return self.steps[-1]

    def forget_last_step(self) -> float:
        """Keep a step out of the speed (the one that compiled the UNet): its seconds."""
        return self.steps.pop()

    @contextmanager
    def apart(self, record: list[float] | None = None) -> Iterator[None]:
        """Time work done between steps (into ``record`` when given) and keep it out of the next step's time; work
        that raises is not recorded."""
        started = time.perf_counter()
        yield
        self.tick = time.perf_counter()
        if record is not None:
            record.append(self.tick - started)

    def checking_s(self) -> float:
        """Seconds the run spent on validation and on the recommendation, to show what they cost in the run itself."""
        return sum(self.validations) + sum(self.judging)

    def it_per_s(self) -> float:
        """Steps per second over the recent steps; 0 before the first."""
        recent = self.steps[-RECENT_STEPS:]
        return len(recent) / sum(recent) if recent else 0.0

    def time_besides_steps(self, epochs: int, total_steps: int, epochs_done: int, steps_done: int) -> float:
        """Seconds the rest of the run will spend rendering samples, saving files and scoring the held-out images
        (at every save, and every ``validation_every_n_steps``), at what they cost so far."""
        saves, renders = saves_to_come(self.config, epochs, total_steps, epochs_done, steps_done)
        render = self.renders[-1] if self.renders else 0.0
        save = sum(self.saves) / len(self.saves) if self.saves else 0.0
        every = self.config.validation_every_n_steps
        scorings = saves + ((total_steps - steps_done) // every if every else 0)
        validation = sum(self.validations) / len(self.validations) if self.validations else 0.0
        return renders * render + saves * save + scorings * validation

    def costs(self) -> RunCosts:
        """What this run's parts cost at its sizes (see :class:`RunCosts`), for the estimates of later runs."""
        config = self.config
        costs = RunCosts(encode=dict(self.encode))
        steady = self.steps[2:] if len(self.steps) > 4 else self.steps  # past the warm-up steps
        if steady:
            costs.steps = {step_kind(config): {size_key(step_megapixels(config)): sum(steady) / len(steady)}}
        if self.renders:
            per_step = sum(self.renders) / len(self.renders) / (len(config.sample_prompts) * config.sample_steps)
            costs.render = {size_key(sample_megapixels(config)): per_step}
        if self.saves:
            costs.save_s = sum(self.saves) / len(self.saves)
        return costs
