"""How good the recommended epoch is on the demo: the demo preset on the demo dataset at several seeds; every saved
file is judged by the demo's own analysis (the concept prompts in every colour, rings drawn in the prompt's colour on
the prompt's background), and the recommended file is compared with the best one (target: within one save of it).

    python bench/recommend_quality.py [--seeds 5] [--pictures 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.cache import ModelCache
from lora_gradio.demo.judge import concept_cases, render_cases
from lora_gradio.demo.shapes import CONCEPT, DEMO_TRIGGER, make_demo_dataset, make_demo_validation
from lora_gradio.demo.vision import read_picture
from lora_gradio.models import resolve_base
from lora_gradio.training.config import apply_overrides, load_preset
from lora_gradio.training.data import TrainData
from lora_gradio.training.loop import train


def drawn_as_asked(cache: ModelCache, lora: Path, seeds: list[int], strength: float = 1.0) -> float:
    """The share of concept pictures with a ring in the prompt's colour on the prompt's background."""
    cases = concept_cases()
    pictures = render_cases(cache, cases, seeds, lora, strength, DEMO_TRIGGER)
    right = 0
    for index, picture in enumerate(pictures):
        case, reading = cases[index // len(seeds)], read_picture(picture)
        right += (reading.shape, reading.colour, reading.background) == (CONCEPT, case.colour, case.background)
    return right / len(pictures)


def main() -> None:
    """One demo run per seed; print each saved file's share, the recommended and the best, and the tally."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pictures", type=int, default=2, help="seeds per concept prompt when judging a file")
    args = parser.parse_args()
    cache, base = ModelCache(), resolve_base("demo")
    config = apply_overrides(load_preset("demo")[0], {"trigger_word": DEMO_TRIGGER})
    near, judge_seeds = 0, list(range(100, 100 + args.pictures))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = TrainData(make_demo_dataset(root / "images"), validation=make_demo_validation(root / "validation"))
        for seed in range(1, args.seeds + 1):
            started = time.perf_counter()
            result = train(apply_overrides(config, {"seed": seed}), base, data, root / f"seed-{seed}", cache=cache)
            advice = result.recommendation
            shares = {score.epoch: drawn_as_asked(cache, root / f"seed-{seed}" / score.file, judge_seeds)
                      for score in advice.scores}
            best = max(shares.values())
            saves = [score.epoch for score in advice.scores]
            best_at = [epoch for epoch, share in shares.items() if share == best]
            distance = min(abs(saves.index(advice.epoch) - saves.index(epoch)) for epoch in best_at)
            near += distance <= 1
            table = ", ".join(f"{epoch}: {share:.0%}" for epoch, share in shares.items())
            print(f"seed {seed}: {table}; recommended epoch {advice.epoch} at {advice.strength:g} "
                  f"({shares[advice.epoch]:.0%}, at its strength "
                  f"{drawn_as_asked(cache, root / f'seed-{seed}' / advice.file, judge_seeds, advice.strength):.0%}); "
                  f"best {best:.0%} at epochs {best_at}; {distance} saves away; "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    print(f"recommended within one save of the best: {near} of {args.seeds} seeds")


if __name__ == "__main__":
    main()
