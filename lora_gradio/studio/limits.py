"""What one visitor's request may ask of the server, stated on the page and checked before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..access import Visitor
from ..errors import UserError
from ..estimate import Estimate, format_duration
from ..request import GenerateRequest


@dataclass(frozen=True)
class Limits:
    """What one visitor's request may ask of the server; the page states them up front."""

    max_images: int = 1000  # per dataset
    max_grid_cells: int = 36
    max_image_side: int = 1024  # pixels, for Test-tab images and grids
    max_steps: int = 100  # sampling steps per image
    max_upload_mb: int = 200  # per uploaded file (Gradio refuses larger ones)
    max_train_minutes: int = 120  # estimated length of a run started by anyone but the operator
    max_samples: int = 200  # sample images a run started by anyone but the operator may render
    keep_uploads_hours: float = 24  # uploads not imported by then are removed ...
    uploads_budget_mb: int = 4096  # ... and the oldest first while all of them take more than this

    def check_training(self, estimate: Estimate, visitor: Visitor) -> None:
        """Refuse a run of anyone but the operator past the time or sample cap, naming the number and the flag."""
        if visitor.operator:
            return
        minutes = (estimate.seconds or 0) / 60
        if minutes > self.max_train_minutes:
            raise UserError(f"This run is estimated at about {format_duration(estimate.seconds or 0)}, and this "
                            f"server lets visitors train up to {self.max_train_minutes} min a run (its operator "
                            "sets that with --max-train-minutes). Train fewer epochs or steps, or render fewer "
                            "samples.")
        if estimate.samples > self.max_samples:
            raise UserError(f"This run would render {estimate.samples} sample images, and this server allows "
                            f"visitors {self.max_samples} a run (its operator sets that with --max-samples). Sample "
                            "less often, or with fewer prompts.")

    def check(self, request: GenerateRequest, images: int = 1) -> None:
        """Refuse a generation or a grid past the server's limits, naming the limit."""
        sides = [s for s in (request.width, request.height) if s]
        problems = [text for ok, text in (
            (all(s <= self.max_image_side for s in sides), f"images up to {self.max_image_side} px a side"),
            (request.steps <= self.max_steps, f"up to {self.max_steps} steps"),
            (images <= self.max_grid_cells, f"grids up to {self.max_grid_cells} images ({images} asked)"),
        ) if not ok]
        if problems:
            raise UserError("This server allows " + "; ".join(problems) + ".")

    def describe(self) -> str:
        """The limits as one line for the page."""
        return (f"Limits on this server: {self.max_images} images per dataset, uploads up to {self.max_upload_mb} MB "
                f"a file, images up to {self.max_image_side} px and {self.max_steps} steps, grids up to "
                f"{self.max_grid_cells} images.")

    def describe_training(self) -> str:
        """The training limits as one line for the Train tab."""
        return (f"Runs started by anyone but the operator: up to {self.max_train_minutes} min (estimated) and "
                f"{self.max_samples} sample images each.")
