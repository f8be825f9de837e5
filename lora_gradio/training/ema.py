"""An exponential moving average (EMA) of the LoRA weights, as OneTrainer and ai-toolkit keep it: a smoother LoRA
than the last step's, saved beside every file the run writes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

EMA_SUFFIX = "-ema"  # lora-000004.safetensors is saved with lora-000004-ema.safetensors beside it


def ema_file(path: Path) -> Path:
    """The EMA twin of a LoRA file's name."""
    return path.with_name(f"{path.stem}{EMA_SUFFIX}{path.suffix}")


def is_ema_file(path: Path | str) -> bool:
    """Whether a file holds a run's averaged weights."""
    return Path(path).stem.endswith(EMA_SUFFIX)


class WeightAverage:
    """The average of the trained weights, kept beside them on their device (diffusers' ``EMAModel``). Step n
    averages with the decay min(``decay``, (1 + n') / (10 + n')), n' = n - 1, and the first step copies: the
    untrained start fades out within a few steps, and a short run is not held back by it."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.params = list(params.values())
        self.average = EMAModel(self.params, decay=decay, foreach=True)

    def update(self) -> None:
        """Take the weights of the step just made into the average."""
        self.average.step(self.params)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for a while (to save, sample or score them), then the trained ones
        back, exactly."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def state(self) -> dict[str, Any]:
        """What a resume needs, on the CPU."""
        state = self.average.state_dict()
        return {**state, "shadow_params": [p.detach().float().cpu() for p in state["shadow_params"]]}

    def load(self, state: dict[str, Any]) -> None:
        """Continue the average a checkpoint saved, on the weights' device."""
        self.average.load_state_dict(state)
        self.average.to(device=self.params[0].device, dtype=self.params[0].dtype)
