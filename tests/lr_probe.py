"""Run under ``accelerate launch``: train the demo with a linear schedule and write rank 0's (step, lr) to a file."""

import json
import sys
from pathlib import Path

from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.models import resolve_base
from lora_gradio.training.config import apply_overrides, load_preset
from lora_gradio.training.loop import train

out = Path(sys.argv[1])
config = apply_overrides(load_preset("demo")[0], {"epochs": 4, "lr_scheduler": "linear", "unet_lr": 1e-3,
                                                  "save_every_n_epochs": 0, "batch_size": 2})
events = []
result = train(config, resolve_base("demo"), make_demo_dataset(out / "data", count=8), out / "run",
               on_event=lambda event: events.append(event))
steps = [(e.step, e.lr) for e in events if e.kind == "step"]
totals = {e.total_steps for e in events if e.kind == "step"}
if result.lora_path is not None:  # rank 0
    (out / "lr.json").write_text(json.dumps({"steps": steps, "totals": sorted(totals)}))
