"""What validation and scoring add to a demo run: the demo preset on the demo dataset, its four validation rings
scored at every save, the samples judged and the recommended file tried at four strengths, against the same run
with neither, and with validation alone, in turns on one loaded model (target: at most 10% more). Each run also
times its own validation and scoring on its clock: that share of the run is measured under the same load as the rest
of it, so a busy host moves it less than the comparison between runs.

    python bench/validation_cost.py [--rounds 3] [--held N]

``--held N`` holds N of the dataset's own images out instead (the default rule is 10% of 15 or more).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.cache import ModelCache
from lora_gradio.demo.shapes import DEMO_TRIGGER, make_demo_dataset, make_demo_validation
from lora_gradio.models import resolve_base
from lora_gradio.training.config import apply_overrides, load_preset
from lora_gradio.training.data import TrainData
from lora_gradio.training.loop import train


def main() -> None:
    """Alternate the three kinds of run, ``--rounds`` times each; print the seconds of each and the median
    overheads."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--held", type=int, default=0, help="hold this many images out instead of the check rings")
    args = parser.parse_args()
    config, _ = load_preset("demo")
    cache, base = ModelCache(), resolve_base("demo")
    timings: dict[str, list[float]] = {"neither": [], "validation": [], "both": []}
    shares: list[float] = []  # of the runs with both: their own validation and scoring against their length
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = make_demo_dataset(root / "data" / "images")
        checks = None if args.held else make_demo_validation(root / "data" / "validation")
        held = apply_overrides(config, {"validation_images": args.held, "trigger_word": DEMO_TRIGGER})
        plain = apply_overrides(held, {"validation_images": 0, "scorer": "off"})
        runs = {"neither": (plain, TrainData(images)),
                "validation": (apply_overrides(held, {"scorer": "off"}), TrainData(images, validation=checks)),
                "both": (held, TrainData(images, validation=checks))}
        train(plain, base, TrainData(images), root / "warm-up", cache=cache)  # loads the model, warms the caches
        for round_ in range(args.rounds):
            for name, (settings, data) in runs.items():
                result = train(settings, base, data, root / f"{name}-{round_}", cache=cache)
                timings[name].append(result.seconds)
                if name == "both":
                    shares.append(result.checking_s / result.seconds)
                scored = ", ".join(f"{s.loss:.4f}" for s in result.scores) or "none"
                advice = result.recommendation.headline() if result.recommendation else "no recommendation"
                print(f"round {round_ + 1} {name:10}: {result.seconds:6.1f} s ({result.checking_s:.1f} s of it "
                      f"validation and scoring), {result.steps} steps, validation losses {scored}; {advice}",
                      flush=True)
    medians = {name: statistics.median(seconds) for name, seconds in timings.items()}
    base = medians["neither"]
    print(f"median with neither {base:.1f} s, validation alone {medians['validation']:.1f} s "
          f"({(medians['validation'] - base) / base:+.1%}), validation and scoring {medians['both']:.1f} s "
          f"({(medians['both'] - base) / base:+.1%}); within the runs with both, validation and scoring took "
          f"{', '.join(f'{share:.1%}' for share in shares)} (median {statistics.median(shares):.1%})")


if __name__ == "__main__":
    main()
