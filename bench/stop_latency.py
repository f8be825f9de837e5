"""How long Stop takes while a run renders its sample images, against a whole round of samples (what Stop waited
for when it was only looked at between rounds), on the demo model.

    python bench/stop_latency.py [--sample-steps 100] [--side 256] [--prompts 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_gradio.cache import ModelCache
from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.jobs import JobRunner, start_training
from lora_gradio.models import resolve_base
from lora_gradio.training.config import apply_overrides, load_preset
from lora_gradio.training.data import TrainData


def main() -> None:
    """Time a whole round of samples in one run, then Stop pressed one second into the round of another,
    ``--rounds`` times each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample-steps", type=int, default=100)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = apply_overrides(load_preset("demo")[0], {
        "epochs": 2, "sample_steps": args.sample_steps, "sample_width": args.side, "sample_height": args.side,
        "sample_prompts": [f"lgdemo, prompt {i}" for i in range(args.prompts)]})
    cache, jobs, base = ModelCache(), JobRunner(), resolve_base("demo")
    rounds, stops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = TrainData(make_demo_dataset(Path(tmp) / "data"))
        for index in range(args.rounds):
            whole = start_training(jobs, cache, config, base, data, Path(tmp) / f"whole{index}")
            rendering = wait_for_message(jobs, whole, "Rendering sample images for epoch 0")
            rounds.append(wait_for_message(jobs, whole, "Samples for epoch 0") - rendering)
            jobs.stop(whole)
            jobs.wait(whole)
            cut = start_training(jobs, cache, config, base, data, Path(tmp) / f"cut{index}")
            wait_for_message(jobs, cut, "Rendering sample images for epoch 0")
            time.sleep(1.0)
            pressed = time.monotonic()
            jobs.stop(cut)
            state = jobs.wait(cut)
            stops.append(time.monotonic() - pressed)
            assert state.status == "stopped", state.message
    print(f"demo model, {args.prompts} prompts × {args.sample_steps} steps at {args.side} px, {args.rounds} runs")
    print(f"reference, a whole round of samples: median {statistics.median(rounds):.1f} s "
          f"({', '.join(f'{r:.1f}' for r in rounds)})")
    print(f"Stop pressed 1 s into a round, to the job's end (stop save included): median "
          f"{statistics.median(stops):.2f} s ({', '.join(f'{s:.2f}' for s in stops)})")


def wait_for_message(jobs: JobRunner, job: str, text: str, timeout: float = 600) -> float:
    """Block until the job's log has a line starting with ``text``; returns when that was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(line.startswith(text) for line in jobs.view(job).log):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"no '{text}' in the job's log")


if __name__ == "__main__":
    main()
