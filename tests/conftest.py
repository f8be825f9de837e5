"""Shared fixtures: the tiny demo model, a tiny LDM single-file checkpoint, small datasets, one trained LoRA, the
README's demo run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails instead of hanging
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def demo_spec():
    from lora_gradio.models import resolve_base

    return resolve_base("demo")


@pytest.fixture(scope="session")
def demo_pipe(demo_spec):
    from lora_gradio.models import load_pipeline

    return load_pipeline(demo_spec)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, demo_pipe):
    """The demo model saved as an LDM-layout .safetensors, plus a diffusers config folder for its tiny shapes."""
    from safetensors.torch import save_file

    from lora_gradio.ldm_layout import pipeline_to_ldm

    root = tmp_path_factory.mktemp("checkpoint")
    save_file(pipeline_to_ldm(demo_pipe), root / "tiny-sd15.safetensors")
    demo_pipe.save_pretrained(root / "config")
    return root / "tiny-sd15.safetensors", root / "config"


@pytest.fixture
def demo_data(tmp_path):
    from lora_gradio.demo.shapes import make_demo_dataset

    return make_demo_dataset(tmp_path / "data", count=8)


@pytest.fixture
def quick_config():
    """A one-epoch demo run: the cheapest real training (a plain LoRA, no samples)."""
    from lora_gradio.training.config import apply_overrides, load_preset

    return apply_overrides(load_preset("demo")[0], {"epochs": 1, "batch_size": 4, "network_type": "lora", "rank": 4,
                                                    "alpha": 4, "sample_prompts": [], "save_every_n_epochs": 1,
                                                    "ema_decay": 0.0})


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory):
    """The README's command-line demo, run once: the README test reads its output, the demo tests its LoRA."""
    from readme_run import run_readme_demo

    return run_readme_demo(tmp_path_factory.mktemp("readme") / "lora-gradio")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app on a free local port (one per test module): its URL and its workspace folder."""
    from browser import running_app

    workspace = tmp_path_factory.mktemp("app") / "workspace"
    with running_app(workspace) as url:
        yield url, workspace


@pytest.fixture
def one_thread(monkeypatch):
    """This process at SAME_THREADS for one test: runs compared bit for bit use one thread each."""
    import torch
    from browser import SAME_THREADS

    for name, value in SAME_THREADS.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
