"""What the demo base and a LoRA trained on it draw, read back by the project's own picture analysis
(lora_gradio/demo/vision.py), against the targets the demo must meet. Prints a Markdown table.

    python bench/demo_quality.py                          # the base: every colour × shape, 4 seeds
    python bench/demo_quality.py --lora RUN/lora.safetensors   # the concept at strengths 0, 0.5 and 1
    python bench/demo_quality.py --run RUN                # the concept at strength 1 for every epoch file of a run
    python bench/demo_quality.py --run RUN --pictures docs/images   # and the README's sample and strength grids
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.cache import ModelCache
from lora_gradio.demo.judge import Score, base_cases, concept_cases, judge
from lora_gradio.demo.shapes import DEMO_TRIGGER
from lora_gradio.inference import compare_grid, save_png
from lora_gradio.models import DEMO, resolve_base
from lora_gradio.request import GenerateRequest
from lora_gradio.training.ema import EMA_SUFFIX, is_ema_file
from lora_gradio.training.run_folder import RunFolder

HEADER = "| what | pictures | colour | shape | background | ring drawn |\n| --- | --- | --- | --- | --- | --- |"
BASE_TARGETS = {"colour": 0.90, "shape": 0.85, "background": 0.90}


def row(label: str, result: Score) -> str:
    """One table row."""
    return f"| {label} | {result.pictures} | {result.line()} |"


def check(result: Score, targets: dict[str, tuple[str, float]]) -> list[str]:
    """The targets a score misses, as lines; ``targets`` maps a name to (">=" or "<=", share)."""
    missed = []
    for what, (sense, share) in targets.items():
        value = result.share(what)
        if (value < share) if sense == ">=" else (value > share):
            missed.append(f"{what}: {100 * value:.0f}%, target {sense} {100 * share:.0f}%")
    return missed


def epoch_files(run: Path) -> list[tuple[str, Path]]:
    """A run's epoch files (``name-000004.safetensors``) in order, then the final file; each with its EMA twin
    (``name-000004-ema.safetensors``) after it where the run kept one."""
    def order(path: Path) -> tuple[int, bool]:
        stem = path.stem.removesuffix(EMA_SUFFIX)
        epoch = re.search(r"-(\d{6})$", stem)
        return (int(epoch.group(1)) if epoch else sys.maxsize, stem != path.stem)

    files = [f for f in run.glob("*.safetensors") if "-step" not in f.stem]
    return [(f.name, f) for f in sorted(files, key=order)]


def write_pictures(cache: ModelCache, run: Path, folder: Path) -> None:
    """The run's own sample grid, and the Test tab's comparison grid of its epoch files (their EMA twins, where the
    run kept them) × strengths 0, 0.5 and 1 for the blue ring on yellow, as the README shows them."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RunFolder(run).sample_grid_file, folder / "demo-sample-grid.png")
    blue = next(case for case in concept_cases() if case.colour == "blue")
    request = GenerateRequest(blue.prompt(DEMO_TRIGGER), seed=1)
    files = epoch_files(run)
    judged = [(name, path) for name, path in files if is_ema_file(path)] or files  # what a run keeps
    grid = compare_grid(cache, resolve_base(DEMO), request, judged, [0.0, 0.5, 1.0])
    save_png(grid, folder / "demo-strength-grid.png")


def main() -> int:
    """Score, print the table and the missed targets; exit 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", type=Path, help="a LoRA trained on the demo base (with the demo dataset)")
    parser.add_argument("--run", type=Path, help="a run folder: every epoch file at strength 1")
    parser.add_argument("--pictures", type=Path, help="with --run: write the sample grid and the strength grid here")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    args = parser.parse_args()
    cache, seeds, missed = ModelCache(), list(range(args.seeds)), []
    started = time.perf_counter()
    print(HEADER)
    if args.run:
        for name, path in epoch_files(args.run):
            print(row(name, judge(cache, concept_cases(), seeds, path)), flush=True)
        if args.pictures:
            write_pictures(cache, args.run, args.pictures)
    elif args.lora:
        targets = {0.0: {"concept": ("<=", 0.10)}, 0.5: {}, 1.0: {"concept": (">=", 0.80), "colour": (">=", 0.80)}}
        for strength, wanted in targets.items():
            result = judge(cache, concept_cases(), seeds, args.lora, strength)
            print(row(f"concept prompts, strength {strength:g}", result), flush=True)
            missed += [f"strength {strength:g}: {line}" for line in check(result, wanted)]
    else:
        result = judge(cache, base_cases(), seeds, trigger=None)
        print(row("base: every colour × shape", result))
        missed = check(result, {what: (">=", share) for what, share in BASE_TARGETS.items()})
    print(f"\n{time.perf_counter() - started:.0f} s. " + ("Missed: " + "; ".join(missed) if missed else
                                                          "Every target met."))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
