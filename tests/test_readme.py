"""The README's commands, followed literally in a fresh copy of the repository: the command-line demo, then the app
started the way the README says, which lists the run the commands made."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from browser import running_app
from gradio_client import Client
from PIL import Image

from lora_gradio.demo.shapes import DEMO_IMAGES
from lora_gradio.demo.vision import read_picture
from lora_gradio.training.config import load_preset

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- the README flow test runs this block as it stands -->"


def readme_block() -> str:
    """The bash block that follows the mark."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"```bash\n(.*?)```", text[text.index(MARK):], re.S).group(1)


def fresh_copy(target: Path) -> Path:
    """The repository's files as a clone would have them (ignored files left out), with this checkout's
    virtual environment standing in for the one the README's first command creates."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    (target / ".venv").symlink_to(Path(sys.prefix))
    return target


def test_the_readme_flow_works_from_the_repository_root(tmp_path):
    copy = fresh_copy(tmp_path / "lora-gradio")
    assert not (copy / "workspace").exists()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block()], cwd=copy, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    run = copy / "workspace" / "outputs" / "demo"
    assert (run / "lora.safetensors").is_file()
    drawn = read_picture(Image.open(run / "test.png"))  # the demo base draws what the prompt's words say
    assert (drawn.colour, drawn.background) == ("blue", "yellow"), drawn
    assert len(list((copy / "workspace" / "datasets" / "demo-rings" / "images").glob("*.png"))) == DEMO_IMAGES
    assert json.loads((run / "demo.workflow.json").read_text(encoding="utf-8"))["nodes"]
    assert "kohya" in done.stdout and "lora.safetensors" in done.stdout

    ignored = subprocess.run(["git", "check-ignore", "-q", str((run / "test.png").relative_to(copy))], cwd=ROOT)
    assert ignored.returncode == 0  # what the examples write stays out of git

    with running_app(copy / "workspace", root=copy) as url:  # `.venv/bin/python app.py`, to start it again
        listed = Client(url, verbose=False).predict(api_name="/runs")
    steps = load_preset("demo")[0].epochs * DEMO_IMAGES // load_preset("demo")[0].batch_size
    assert [(r["run"], r["status"], r["steps"]) for r in listed] == [("demo", "finished", f"{steps}/{steps}")]
