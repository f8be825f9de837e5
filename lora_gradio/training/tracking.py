"""A run's log for TensorBoard or Weights & Biases, written from the run's own progress events, with sd-scripts' tag
names (``loss/current``, ``loss/average``, ``lr/unet`` …) so dashboards people keep for sd-scripts runs work here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..events import Emit, JobEvent

if TYPE_CHECKING:
    from .config import TrainConfig

LOG_DIR = "logs"  # inside the run folder: tensorboard --logdir RUN/logs
FINAL = ("done", "stopped", "error")


class RunLog:
    """Writes a run's scalars and sample images as its events arrive. A resumed run's replayed history is not written
    again (those events carry no step count): the log of the first part is still in the folder."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.scale_text = config.text_encoder_lr / config.unet_lr if config.train_text_encoder else None
        self.epoch_losses: list[float] = []
        self.step = 0
        folder = Path(run_dir) / LOG_DIR
        if config.log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(log_dir=str(folder))
            self.wandb: Any = None
        else:
            try:
                import wandb
            except ImportError as exc:
                raise UserError("log_with = wandb needs Weights & Biases: pip install wandb, then wandb login (or "
                                "choose tensorboard, which is installed).") from exc
            folder.mkdir(parents=True, exist_ok=True)
            self.writer = None
            self.wandb = wandb.init(project="lora-gradio", name=Path(run_dir).name, id=safe_id(Path(run_dir).name),
                                    dir=str(folder), config=config.to_dict(), resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars at a training step."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        else:
            self.wandb.log(values, step=step)

    def images(self, paths: list[str], step: int) -> None:
        """Sample images, one tag per sample prompt."""
        import numpy as np
        from PIL import Image

        pictures = {}
        for index, path in enumerate(paths):
            with Image.open(path) as image:
                pictures[f"samples/{index}"] = np.asarray(image.convert("RGB"))
        if self.writer is not None:
            for tag, picture in pictures.items():
                self.writer.add_image(tag, picture, step, dataformats="HWC")
            self.writer.flush()
        else:
            import wandb

            self.wandb.log({tag: wandb.Image(picture) for tag, picture in pictures.items()}, step=step)

    def __call__(self, event: JobEvent) -> None:
        """Log what an event says: each step's loss and rates, each epoch's average, each held-out loss, samples."""
        live = event.total_steps > 0
        if event.kind == "step":
            self.step = event.step
            self.epoch_losses.append(event.loss)
            values = {"loss/current": event.loss, "loss/average": sum(self.epoch_losses) / len(self.epoch_losses)}
            if event.lr is not None:
                values["lr/unet"] = event.lr
                if self.scale_text is not None:
                    values["lr/textencoder"] = event.lr * self.scale_text
            self.scalars(values, event.step)
        elif event.kind == "epoch" and live and self.epoch_losses:
            self.scalars({"loss/epoch_average": sum(self.epoch_losses) / len(self.epoch_losses)}, event.step)
            self.epoch_losses = []
        elif event.kind == "validation" and live and event.loss is not None:
            self.scalars({"loss/validation/epoch_average": event.loss}, event.step or self.step)
        elif event.kind == "samples" and live and event.paths:
            self.images(event.paths, event.step)
        elif event.kind in FINAL:
            self.close()

    def close(self) -> None:
        """Write what is buffered and end the log."""
        if self.writer is not None:
            self.writer.close()
        elif self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def safe_id(name: str) -> str:
    """A W&B run id from a run folder's name (letters, digits, '-' and '_'), so a resumed run continues its own."""
    return re.sub(r"[^\w-]", "-", name)[:64]


def logged(config: TrainConfig, run_dir: Path, on_event: Emit | None) -> Emit:
    """The run's event handler, also writing its log when ``log_with`` asks for one."""
    emit = on_event or (lambda event: None)
    if config.log_with == "none":
        return emit
    log = RunLog(config, run_dir)

    def both(event: JobEvent) -> None:
        log(event)
        emit(event)

    return both
