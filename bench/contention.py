"""Training and generation speed on a CPU that other processes keep busy, with PyTorch's thread defaults and with the
settings lora-gradio applies at start-up, each pair in fresh processes, side by side in one run. Prints one JSON
object per line: one per (settings, busy processes), then the comparison.

    python bench/contention.py --hogs 2 --steps 12
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what lora_gradio.threads sets, and what would override it: each is removed for both kinds of run
THREAD_VARIABLES = ("TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def hog() -> None:
    """A process that keeps one core busy, as another user's job would."""
    while True:
        pass


def workload(steps: int) -> dict:
    """Demo training steps (the mean of the last 20) and one 20-step demo generation (run in a child process)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from lora_gradio.cache import ModelCache
    from lora_gradio.demo.shapes import make_demo_dataset
    from lora_gradio.inference import generate
    from lora_gradio.models import resolve_base
    from lora_gradio.request import GenerateRequest
    from lora_gradio.training.config import apply_overrides, load_preset
    from lora_gradio.training.loop import train

    base, cache = resolve_base("demo"), ModelCache()
    config = apply_overrides(load_preset("demo")[0], {"max_train_steps": steps, "save_every_n_epochs": 0,
                                                      "sample_prompts": []})
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(Path(tmp) / "data")
        result = train(config, base, data, Path(tmp) / "out", cache=cache)
    generate(cache, base, GenerateRequest("lgdemo, a red circle", steps=2))  # warm
    start = time.perf_counter()
    generate(cache, base, GenerateRequest("lgdemo, a red circle", steps=20))
    return {"torch_threads": torch.get_num_threads(), "train_s_per_step": round(1 / result.it_per_s, 3),
            "generate_s": round(time.perf_counter() - start, 3)}


def measure(defaults: bool, hogs: int, steps: int) -> dict:
    """The workload in a fresh process, beside ``hogs`` busy processes."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["LORA_GRADIO_DEFAULT_THREADS"] = "1" if defaults else "0"
    busy = [multiprocessing.Process(target=hog, daemon=True) for _ in range(hogs)]
    for process in busy:
        process.start()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(steps)], env=env, check=True,
                              capture_output=True, text=True)
    finally:
        for process in busy:
            process.terminate()
            process.join()
    return {"settings": "defaults" if defaults else "lora-gradio", "busy_processes": hogs,
            **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    """Every combination, then how much the busy processes slowed each settings' runs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(workload(args.steps)))
        return
    results = {}
    for defaults in (True, False):
        for hogs in (0, args.hogs):
            results[(defaults, hogs)] = measure(defaults, hogs, args.steps)
            print(json.dumps(results[(defaults, hogs)]), flush=True)
    slowdown = {("defaults" if defaults else "lora-gradio"): {
        key: round(results[(defaults, args.hogs)][key] / results[(defaults, 0)][key], 2)
        for key in ("train_s_per_step", "generate_s")} for defaults in (True, False)}
    print(json.dumps({"cores": os.cpu_count(), "busy_processes": args.hogs, "slowdown_when_busy": slowdown}))


if __name__ == "__main__":
    main()
