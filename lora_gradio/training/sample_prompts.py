"""sd-scripts' sample prompt lines: a prompt, then its own settings as flags (``--n`` negative, ``--w``/``--h`` size,
``--s`` steps, ``--l`` CFG, ``--d`` seed, ``--ss`` sampler, ``--cs`` CLIP skip), so prompts people kept for sd-scripts
render the same samples here. A line without flags uses the run's sample settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# sd-scripts' sampler names with a counterpart here, and this app's own names (the request's SAMPLERS keys)
KOHYA_SAMPLERS = {"euler": "Euler", "k_euler": "Euler", "euler_a": "Euler a", "k_euler_a": "Euler a", "ddim": "DDIM",
                  "dpmsolver++": "DPM++ 2M Karras"}
FLAGS = {"n": "negative prompt", "w": "width", "h": "height", "s": "steps", "l": "CFG", "d": "seed",
         "ss": "sampler", "cs": "CLIP skip"}
FLAG_START = re.compile(r"\s--(?=\w)")  # sd-scripts splits a line at " --"


@dataclass(frozen=True)
class SampleLine:
    """One sample prompt line: its prompt and the settings its flags give (None: the run's sample setting)."""

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    sampler: str | None = None
    clip_skip: int | None = None

    def described(self) -> str:
        """The flags' settings in words ("768×512, 28 steps, seed 42"), empty for a line without flags."""
        size = {(True, True): f"{self.width}×{self.height}", (True, False): f"width {self.width}",
                (False, True): f"height {self.height}", (False, False): ""}[(bool(self.width), bool(self.height))]
        parts = [size, f"{self.steps} steps" if self.steps else "", "" if self.cfg is None else f"CFG {self.cfg:g}",
                 "" if self.seed is None else f"seed {self.seed}", self.sampler or "",
                 f"CLIP skip {self.clip_skip}" if self.clip_skip else "",
                 "" if self.negative is None else f"negative '{self.negative}'"]
        return ", ".join(part for part in parts if part)


def bounded(value: str, flag: str, low: float, high: float, kind: type = int) -> Any:
    """A flag's number within its bounds, or a message naming the flag and the range."""
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"--{flag} {value!r} is not a {'whole ' if kind is int else ''}number") from None
    if not low <= number <= high:  # also refuses NaN
        raise ValueError(f"--{flag} {value} is outside {low:g}–{high:g}")
    return number


def parse_sample_line(line: str) -> SampleLine:
    """Split a line into its prompt and flags; an unknown flag or a value out of range is a ValueError naming it."""
    prompt, *flags = FLAG_START.split(" " + line.strip())  # a line may start with its flags
    given: dict[str, Any] = {}
    for part in flags:
        flag, _, value = part.partition(" ")
        flag, value = flag.lower(), value.strip()
        if flag not in FLAGS:
            raise ValueError(f"unknown flag --{flag}: use {', '.join('--' + f for f in FLAGS)}")
        if not value and flag != "n":
            raise ValueError(f"--{flag} needs a value ({FLAGS[flag]})")
        if flag in ("w", "h"):
            size = bounded(value, flag, 64, 2048)
            if size % 8:
                raise ValueError(f"--{flag} {size} is not a multiple of 8")
            given["width" if flag == "w" else "height"] = size
        elif flag == "ss":
            if value.lower() not in KOHYA_SAMPLERS and value not in KOHYA_SAMPLERS.values():
                raise ValueError(f"--ss {value}: use one of {', '.join(KOHYA_SAMPLERS)}")
            given["sampler"] = KOHYA_SAMPLERS.get(value.lower(), value)
        else:
            name, low, high, kind = {"n": ("negative", 0, 0, str), "s": ("steps", 1, 150, int),
                                     "l": ("cfg", 1, 30, float), "d": ("seed", 0, 2**32 - 1, int),
                                     "cs": ("clip_skip", 1, 2, int)}[flag]
            given[name] = value if kind is str else bounded(value, flag, low, high, kind)
    if not prompt.strip():
        raise ValueError("the line has flags but no prompt before them")
    return SampleLine(prompt.strip(), **given)
