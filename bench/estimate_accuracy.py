"""How far the estimate shown before Start is from the run's real time: a first run on a fresh workspace (guessed
costs), then runs of other sizes that use what the first one measured. Prints one JSON object per run, then the
summary; a run is "within" when its time is within ±30% of the estimate.

    python bench/estimate_accuracy.py --base demo
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.studio import Studio
from lora_gradio.workspace import Workspace

RUNS = [  # the first measures; the others differ in size, length and samples
    {"epochs": 3, "resolution": 64, "batch_size": 2},
    {"epochs": 6, "resolution": 64, "batch_size": 2},
    {"epochs": 3, "resolution": 128, "batch_size": 4, "sample_steps": 8},
    {"epochs": 8, "resolution": 64, "batch_size": 1, "save_every_n_epochs": 2, "sample_every_n_steps": 16},
]


def main() -> None:
    """Each run's estimate, its time, and how far apart they were."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="demo")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        studio = Studio(Workspace.open(Path(tmp) / "ws"))
        studio.workspace.dataset_dir("bench", create=True)
        make_demo_dataset(studio.images_dir("bench"), size=128)
        for settings in RUNS:
            config = {"trigger_word": "lgdemo", "mixed_precision": "no", "sample_prompts": ["lgdemo, a circle"],
                      "sample_steps": 4, **settings}
            plan = studio.plan_training("bench", args.base, config)
            state = studio.jobs.wait(studio.start_training(plan), 3600)
            off = (state.result.seconds - plan.estimate.seconds) / plan.estimate.seconds
            results.append({"settings": settings, "steps": plan.estimate.steps,
                            "estimate_s": round(plan.estimate.seconds, 1), "margin_s": round(plan.estimate.margin, 1),
                            "measured_costs": plan.estimate.measured, "actual_s": round(state.result.seconds, 1),
                            "off": f"{off:+.0%}", "within_30_percent": abs(off) <= 0.3})
            print(json.dumps(results[-1]), flush=True)
    later = [r for r in results if r["measured_costs"]]
    print(json.dumps({"base": args.base, "runs": len(results),
                      "measured_runs_within_30_percent": f"{sum(r['within_30_percent'] for r in later)}/{len(later)}"}))


if __name__ == "__main__":
    main()
