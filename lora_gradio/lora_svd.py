"""The SVD behind the LoRA tools: how many ranks a module keeps (a fixed rank, or sd-scripts' sv_fro and sv_ratio),
a module's change refactored at that rank, and the report of what each module kept.

A LoRA module's change is ΔW = up · down · alpha/rank. Its SVD never needs ΔW itself: two QR factorisations and the
SVD of a rank × rank core give it exactly, so a full SD1.5 file takes seconds. Each module's relative error,
‖ΔW − ΔW kept‖ / ‖ΔW‖ (Frobenius), comes from the dropped singular values, so the report is exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

METHODS = {"fixed": "every module at the rank",
           "sv_fro": "the fewest ranks that keep VALUE (0-1) of each change's Frobenius norm",
           "sv_ratio": "the ranks whose singular value is at least the largest divided by VALUE"}
MAX_RANK = 1024
MAX_WEIGHT = 10.0  # the largest merge weight or bake strength, either sign


@dataclass(frozen=True)
class RankRule:
    """How many ranks a module keeps: ``rank`` at most, and with ``sv_fro`` or ``sv_ratio`` (sd-scripts' names) the
    fewest that keep ``value`` of the change."""

    rank: int
    method: str = "fixed"
    value: float = 0.0

    def check(self, what: str = "Rank") -> RankRule:
        """The rule, or a message naming the bound it breaks (NaN and infinities included)."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise UserError(f"{what} must be a whole number from 1 to {MAX_RANK}, not {self.rank!r}.")
        if self.method not in METHODS:
            raise UserError(f"Unknown rank method '{self.method}': use one of {', '.join(METHODS)}.")
        bounds = {"sv_fro": (0.0, 1.0, "more than 0 and at most 1, like 0.9"),
                  "sv_ratio": (1.0, 1e6, "more than 1, like 10")}
        if self.method in bounds:
            low, high, text = bounds[self.method]
            if not (isinstance(self.value, int | float) and math.isfinite(self.value) and low < self.value <= high):
                raise UserError(f"The {self.method} value must be {text}, not {self.value!r}.")
        return self

    def keep(self, singular: torch.Tensor) -> int:
        """How many of the (descending) singular values to keep; at least one, at most ``rank``."""
        import torch

        count = int((singular > 0).sum())
        squares = singular.double() ** 2
        if self.method == "sv_fro" and count:
            share = torch.cumsum(squares, 0) / squares.sum()
            count = int((share < self.value ** 2 - 1e-12).sum()) + 1
        elif self.method == "sv_ratio" and count:
            count = int((singular >= singular[0] / self.value).sum())
        return max(1, min(count, self.rank, singular.numel()))

    def describe(self) -> str:
        """'rank 8' or 'sv_fro 0.9, at most rank 32'."""
        if self.method == "fixed":
            return f"rank {self.rank}"
        return f"{self.method} {self.value:g}, at most rank {self.rank}"


@dataclass(frozen=True)
class ModuleResult:
    """One module of a written file: its kohya name, its rank before (0 when it had none) and now, and the relative
    error of what was kept."""

    name: str
    rank_before: int
    rank: int
    error: float


@dataclass
class ToolReport:
    """What a tool wrote and how each module came out; ``notes`` name what was carried over or left out."""

    tool: str
    path: Path
    modules: list[ModuleResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # from the start of the work to the file on disk

    def summary(self) -> str:
        """One line: the file, the modules, the ranks and the worst error."""
        if not self.modules:
            return f"Wrote {self.path.name} in {self.seconds:.1f} s. " + " ".join(self.notes)
        ranks = sorted({m.rank for m in self.modules})
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
        worst = max(self.modules, key=lambda m: m.error)
        mean = sum(m.error for m in self.modules) / len(self.modules)
        return (f"Wrote {self.path.name}: {len(self.modules)} modules at {shown}; error mean {mean:.2%}, worst "
                f"{worst.error:.2%} ({worst.name}); {self.seconds:.1f} s. " + " ".join(self.notes)).strip()

    def text(self) -> str:
        """The summary, then each module's rank and error."""
        rows = [f"  {m.name}: rank {m.rank_before} → {m.rank}, error {m.error:.3%}" if m.rank_before else
                f"  {m.name}: rank {m.rank}, error {m.error:.3%}" for m in self.modules]
        return "\n".join([self.summary(), *(["Modules:", *rows] if rows else [])])


def check_weights(values: list[float], what: str) -> None:
    """Refuse a merge weight or strength that is not a finite number within ±MAX_WEIGHT, naming it."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or abs(value) > MAX_WEIGHT:
            raise UserError(f"A {what} must be a number from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, not {value!r}.")


def low_rank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of ``up @ down`` (out × r times r × n) through two QRs and an r × r SVD: exact, and cheap for LoRA
    ranks, where the full product's SVD would cost seconds a module."""
    import torch

    q_up, r_up = torch.linalg.qr(up.double())
    q_down, r_down = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return (q_up @ u).float(), s.float(), (vh @ q_down.T).float()


def split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, keep: int, scale: float, down_tail: tuple[int, ...],
          conv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) holding the first ``keep`` singular triplets divided by ``scale`` (alpha/rank), the singular values
    shared evenly between the two, shaped as kohya stores a linear or conv module."""
    root = (s[:keep] / scale).sqrt()
    up = (u[:, :keep] * root).contiguous()
    down = (root[:, None] * vh[:keep]).reshape(keep, *down_tail).contiguous()
    return down, up[..., None, None] if conv else up


def relative_error(s: torch.Tensor, keep: int) -> float:
    """‖ΔW − ΔW kept‖ / ‖ΔW‖ from all the singular values: the dropped ones' share."""
    total = float((s.double() ** 2).sum())
    kept = float((s[:keep].double() ** 2).sum())
    return math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0


def factor_module(name: str, up: torch.Tensor, down: torch.Tensor, rule: RankRule, ratio: float,
                  down_tail: tuple[int, ...], conv: bool, rank_before: int) -> tuple[dict, ModuleResult]:
    """One module of ΔW = up · down as kohya tensors at the rule's rank, with alpha = ``ratio`` × rank."""
    import torch

    u, s, vh = low_rank_svd(up, down)
    keep = rule.keep(s)
    new_down, new_up = split(u, s, vh, keep, ratio, down_tail, conv)
    tensors = {f"{name}.lora_down.weight": new_down, f"{name}.lora_up.weight": new_up,
               f"{name}.alpha": torch.tensor(ratio * keep)}
    return tensors, ModuleResult(name, rank_before, keep, relative_error(s, keep))
