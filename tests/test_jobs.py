"""Background jobs, the shared model cache under load, and generation: one job at a time, no reloads."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_gradio.cache import ModelCache
from lora_gradio.errors import UserError
from lora_gradio.inference import compare_grid, generate
from lora_gradio.jobs import JobRunner, start_resume, start_training
from lora_gradio.models import resolve_base
from lora_gradio.request import GenerateRequest
from lora_gradio.training.config import apply_overrides
from lora_gradio.training.data import TrainData
from lora_gradio.training.run_folder import RunFolder, resumable_runs


def wait_until(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_start_waits_its_turn_and_generation_is_busy_during_training(demo_spec, demo_data, quick_config,
                                                                                tmp_path):
    cache, jobs = ModelCache(), JobRunner()
    long_run = apply_overrides(quick_config, {"epochs": 200, "batch_size": 1})
    job = start_training(jobs, cache, long_run, demo_spec, TrainData(demo_data), tmp_path / "run")
    wait_until(lambda: jobs.view(job).step >= 2)
    second = start_training(jobs, cache, long_run, demo_spec, TrainData(demo_data), tmp_path / "other")
    assert jobs.view(second).status == "queued" and jobs.view(second).position == 1
    jobs.stop(second)  # leaves the queue: it never ran
    assert jobs.wait(second, 1).status == "cancelled" and not (tmp_path / "other").exists()
    with pytest.raises(UserError, match=r"busy with training \(run\)"):
        generate(cache, demo_spec, GenerateRequest("a cat", steps=2))
    assert cache.status().user == "training (run)"
    with pytest.raises(UserError, match="Only the page or script that started a job"):
        jobs.stop("someone-elses-guess")
    assert jobs.view(job).status == "running"
    jobs.stop(job)
    state = jobs.wait(job, 60)
    assert state.status == "stopped" and Path(state.saved[-1]).name == f"lora-step{state.step:08d}.safetensors"
    assert not (tmp_path / "run" / "lora.safetensors").exists()  # that name is the finished run's alone
    assert len(state.losses) == state.step and state.total_steps == 200 * 8
    assert resumable_runs(tmp_path) == ["run"] and RunFolder(tmp_path / "run").read_job().config == long_run
    image = generate(cache, demo_spec, GenerateRequest("a cat", steps=2, lora=Path(state.saved[-1])))
    assert image.size == (64, 64) and cache.loads == 1  # training's base model served the test right after


def test_a_view_sends_only_the_losses_a_page_has_not_seen(demo_spec, demo_data, quick_config, tmp_path):
    jobs = JobRunner()
    job = start_training(jobs, ModelCache(), apply_overrides(quick_config, {"epochs": 2, "batch_size": 2}),
                         demo_spec, TrainData(demo_data), tmp_path / "run")
    everything = jobs.wait(job, 120).losses
    assert len(everything) == 8
    later = jobs.view(job, since=6)
    assert later.loss_offset == 6 and later.losses == everything[6:]
    assert jobs.view(job, since=8).losses == [] and jobs.latest("training", since=3).losses == everything[3:]


def test_job_that_fails_reports_the_reason(demo_data, quick_config, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    jobs = JobRunner()
    job = start_training(jobs, ModelCache(), quick_config, resolve_base(str(broken)), TrainData(demo_data),
                         tmp_path / "run")
    state = jobs.wait(job, 60)
    assert state.status == "error" and "not a readable .safetensors" in state.message
    assert not (tmp_path / "run" / "job.json").exists()


def test_resume_continues_at_the_right_step_with_the_same_losses(demo_spec, demo_data, quick_config, tmp_path,
                                                                   one_thread):
    config = apply_overrides(quick_config, {"epochs": 3, "batch_size": 2, "sample_prompts": ["a photo"],
                                            "sample_steps": 2})
    cache, jobs = ModelCache(), JobRunner()
    data = TrainData(demo_data)
    uncut = jobs.wait(start_training(jobs, cache, config, demo_spec, data, tmp_path / "whole"), 120)
    whole = uncut.losses
    cut = start_training(jobs, cache, config, demo_spec, data, tmp_path / "cut")
    wait_until(lambda: jobs.view(cut).step >= 5)
    jobs.stop(cut)
    stopped = jobs.wait(cut, 60)
    assert stopped.status == "stopped"
    resumed = jobs.wait(start_resume(jobs, cache, tmp_path / "cut"), 120)
    assert resumed.status == "done" and resumed.step == 12
    assert resumed.losses == whole  # the earlier part too, so the page shows the whole curve
    assert resumable_runs(tmp_path) == []
    assert sorted(Path(p).name for p in resumed.saved) == [  # the files from before the stop are listed too
        "lora-000001.safetensors", "lora-000002.safetensors", f"lora-step{stopped.step:08d}.safetensors",
        "lora.safetensors", "sample-grid.png"]
    assert [epoch for epoch, _ in resumed.samples] == [0, 1, 2, 3]
    assert resumed.recommendation == uncut.recommendation  # every saved epoch's scores came through the stop
    assert [row["epoch"] for row in resumed.recommendation["scores"]] == [1, 2, 3]


def test_strength_epoch_and_lora_changes_never_reload_the_base(demo_spec, demo_data, quick_config, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("LORA_GRADIO_DEFAULT_THREADS", "1")  # one thread count throughout: images compared bit for bit
    cache, jobs = ModelCache(), JobRunner()
    jobs.wait(start_training(jobs, cache, apply_overrides(quick_config, {"epochs": 2, "save_every_n_epochs": 1}),
                             demo_spec, TrainData(demo_data), tmp_path / "run"), 120)
    first, last = tmp_path / "run" / "lora-000001.safetensors", tmp_path / "run" / "lora.safetensors"
    loads = cache.loads
    request = GenerateRequest("lgdemo, a red circle", seed=4, steps=3)
    base = np.asarray(generate(cache, demo_spec, request))
    for lora, strength in [(last, 1.0), (last, 0.5), (first, 1.0), (last, -1.0), (last, 0.0)]:
        image = np.asarray(generate(cache, demo_spec, GenerateRequest(
            "lgdemo, a red circle", seed=4, steps=3, lora=lora, strength_model=strength, strength_clip=strength)))
        assert np.array_equal(image, base) == (strength == 0.0)
    grid = compare_grid(cache, demo_spec, request, [("e1", first), ("e2", last), ("e2b", last)], [0.0, 1.0])
    assert grid.width > 2 * 64 and grid.height > 3 * 64
    assert cache.loads == loads == 1


def test_lora_for_another_architecture_is_refused(demo_spec, tmp_path):
    xl = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}, xl)
    with pytest.raises(UserError, match=r"does not fit this SD1.x base model"):
        generate(ModelCache(), demo_spec, GenerateRequest("a cat", steps=2, lora=xl))


def test_impossible_generation_settings_are_named():
    with pytest.raises(UserError, match=r"steps = 0.*strength_model = 3"):
        GenerateRequest("a", steps=0, strength_model=3).validate()
    with pytest.raises(UserError, match=r"CFG = nan.*strength_clip = nan"):
        GenerateRequest("a", cfg=float("nan"), strength_clip=float("nan")).validate()


def test_generated_png_carries_its_parameters(demo_spec, tmp_path):
    from PIL import Image

    from lora_gradio.inference import save_png

    image = generate(ModelCache(), demo_spec, GenerateRequest("a red circle", seed=9, steps=2, scheduler="DDIM"))
    path = save_png(image, tmp_path / "out.png")
    with Image.open(path) as saved:
        text = saved.text["parameters"]
    assert text.startswith("a red circle\nSteps: 2, Sampler: DDIM") and "Seed: 9" in text and "Model: demo" in text


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M Karras", "DDIM"])
def test_each_scheduler_generates(demo_spec, name):
    assert generate(ModelCache(), demo_spec, GenerateRequest("x", steps=2, scheduler=name)).size == (64, 64)


def test_every_kind_of_job_ends_stopped_with_its_result_and_never_in_error(demo_spec, tmp_path):
    """One way to stop: a Stop while a job waits for the model, or in the middle of its work, gives the job's own
    result marked stopped, and the job's status is "stopped", never "error"."""
    import threading

    from tiny_blip import save_tiny_blip

    from lora_gradio.captioning import CaptionOptions, CaptionResult
    from lora_gradio.dataset import prepare_dataset
    from lora_gradio.demo.shapes import make_demo_dataset
    from lora_gradio.imports import import_folder
    from lora_gradio.studio import Studio
    from lora_gradio.workspace import Workspace

    studio = Studio(Workspace.open(tmp_path / "ws"))
    studio.create_dataset("rings")
    make_demo_dataset(studio.images_dir("rings"), count=4)
    blip = str(save_tiny_blip(tmp_path / "ws" / "blip"))  # inside the workspace, where the app may read
    plan = studio.plan_training("rings", "demo", {"epochs": 1, "resolution": 64, "sample_prompts": []})
    with studio.cache.use(("held by the test", 0), threading.Event, "a test holding the model"):
        waiting = {"captioning": studio.start_caption("rings", blip, CaptionOptions("ohwx", overwrite=True)),
                   "training": studio.start_training(plan)}
        wait_until(lambda: len(studio.cache.status().waiting) == 2)
        for job in waiting.values():
            studio.jobs.stop(job)
        states = {kind: studio.jobs.wait(job, 60) for kind, job in waiting.items()}
    for kind, state in states.items():
        assert state.status == "stopped" and state.result.stopped, (kind, state.message)
        assert "waiting for the model" in state.message and not any(line.startswith("error") for line in state.log)
    assert isinstance(states["captioning"].result, CaptionResult) and states["captioning"].result.written == {}
    assert studio.runs() == []  # the run stopped before its first step leaves no folder to resume
    stop, events = threading.Event(), []
    stop.set()
    request = GenerateRequest("a ring", steps=1)
    assert compare_grid(studio.cache, demo_spec, request, [("e1", tmp_path / "unread.safetensors")], [1.0], stop,
                        events.append) is None
    assert events[-1].kind == "stopped"
    prepared = prepare_dataset(studio.images_dir("rings"), tmp_path / "prepared", 64, emit=events.append, stop=stop)
    assert prepared.stopped and prepared.done == 0 and not (tmp_path / "prepared").exists()
    report = import_folder(studio.images_dir("rings"), tmp_path / "copy", emit=events.append, stop=stop)
    assert report.stopped and not report.files  # four images and their captions, none read
    assert "stopped after 0 of 8 files" in report.summary() and "holds no image" not in report.summary()
