"""The README's commands, followed literally in a fresh copy of the repository (the readme_demo fixture): the
command-line demo, then the app started the way the README says, which lists the run the commands made."""

import json
import math
import subprocess

from browser import running_app
from gradio_client import Client
from PIL import Image
from readme_run import ROOT

from lora_gradio.demo.shapes import CONCEPT, DEMO_IMAGES
from lora_gradio.demo.vision import read_picture
from lora_gradio.training.config import load_preset


def test_the_readme_flow_works_from_the_repository_root(readme_demo):
    copy, done = readme_demo.copy, readme_demo.done
    run = copy / "workspace" / "outputs" / "demo"
    assert (run / "lora.safetensors").is_file() and (run / "lora-ema.safetensors").is_file()
    drawn = read_picture(Image.open(run / "test.png"))  # the demo base draws what the prompt's words say
    assert (drawn.colour, drawn.background, drawn.shape) == ("blue", "yellow", CONCEPT), drawn  # and the LoRA's ring
    assert len(list((copy / "workspace" / "datasets" / "demo-rings" / "images").glob("*.png"))) == DEMO_IMAGES
    assert json.loads((run / "demo.workflow.json").read_text(encoding="utf-8"))["nodes"]
    assert "kohya" in done.stdout and "lora-ema.safetensors" in done.stdout

    ignored = subprocess.run(["git", "check-ignore", "-q", str((run / "test.png").relative_to(copy))], cwd=ROOT)
    assert ignored.returncode == 0  # what the examples write stays out of git

    with running_app(copy / "workspace", root=copy) as url:  # `.venv/bin/python app.py`, to start it again
        listed = Client(url, verbose=False).predict(api_name="/runs")
    preset = load_preset("demo")[0]
    steps = preset.epochs * math.ceil(DEMO_IMAGES / preset.batch_size)  # the last batch of an epoch is smaller
    assert [(r["run"], r["status"], r["steps"]) for r in listed] == [("demo", "finished", f"{steps}/{steps}")]
