"""The model cache's lease: one holder at a time, a visible queue, "busy" during training, a base nobody changes."""

import threading

import numpy as np
import pytest
import torch
from bad_files import photo_bytes
from tiny_blip import save_tiny_blip

from lora_gradio.cache import ModelCache
from lora_gradio.captioning import CaptionOptions, caption_dataset
from lora_gradio.errors import UserError
from lora_gradio.inference import generate
from lora_gradio.request import GenerateRequest
from lora_gradio.training.config import apply_overrides
from lora_gradio.training.loop import train


class Model:
    """A stand-in for a loaded model: anything the cache can hold."""


def holder(cache, what, entered, release, long=False):
    """A thread that takes the lease, says so, and keeps it until ``release`` is set."""

    def hold():
        with cache.use("model", Model, what, long=long):
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(30)
    return thread


def test_a_second_holder_waits_its_turn_in_arrival_order():
    cache = ModelCache()
    entered, release = threading.Event(), threading.Event()
    first = holder(cache, "captioning", entered, release)
    order, heard = [], {}
    queued = {name: threading.Event() for name in ("generation", "grid")}

    def later(name):
        def on_wait(text):
            heard.setdefault(name, text)
            queued[name].set()

        with cache.use("model", Model, name, on_wait=on_wait):
            order.append((name, cache.status().user))

    threads = []
    for name in ("generation", "grid"):
        threads.append(threading.Thread(target=later, args=(name,)))
        threads[-1].start()
        assert queued[name].wait(30)  # the second arrives only once the first is in the queue
    status = cache.status()
    assert status.user == "captioning" and status.waiting == ("generation", "grid") and order == []
    assert "waiting: 2 (generation, grid)" in status.line()
    assert heard == {"generation": "waiting for the model: captioning is running, 1 ahead of you",
                     "grid": "waiting for the model: captioning is running, 2 ahead of you"}
    release.set()
    for thread in [first, *threads]:
        thread.join(30)
    assert order == [("generation", "generation"), ("grid", "grid")]  # each had the model alone, in turn
    assert cache.status().user is None and cache.loads == 1


def test_training_makes_newcomers_and_waiters_busy_at_once():
    cache = ModelCache()
    entered, release, stop = threading.Event(), threading.Event(), threading.Event()
    first = holder(cache, "captioning", entered, release)
    outcome: dict[str, str] = {}

    def user(what: str, long: bool = False) -> threading.Thread:
        """Queue for the model behind whoever holds it now, and keep it (training) until ``stop``."""
        queued = threading.Event()

        def run():
            try:
                with cache.use("model", Model, what, long=long, on_wait=lambda text: queued.set()):
                    outcome[what] = "served"
                    if long:
                        stop.wait(30)
            except UserError as exc:
                outcome[what] = str(exc)

        thread = threading.Thread(target=run)
        thread.start()
        assert queued.wait(30)
        return thread

    users = [user("generation"), user("training (anna-1)", long=True), user("grid")]  # in this order
    release.set()
    first.join(30)
    users[2].join(30)  # the grid, queued behind training, is told at once instead of waiting for the whole run
    assert outcome["generation"] == "served" and outcome["training (anna-1)"] == "served"  # in arrival order
    assert "busy with training (anna-1)" in outcome["grid"]
    with pytest.raises(UserError, match=r"busy with training \(anna-1\)"), cache.use("model", Model, "generation"):
        raise AssertionError("let in beside training")
    stop.set()
    for thread in users:
        thread.join(30)
    assert cache.status().user is None and not cache.status().waiting


def test_only_the_holder_keeps_derived_state_and_a_nested_lease_is_a_bug():
    cache = ModelCache()
    with pytest.raises(RuntimeError, match="lease holder"):
        cache.derived("view", object)
    with cache.use("model", Model, "generation"):
        view = cache.derived("view", object)
        assert cache.derived("view", object) is view
        with pytest.raises(RuntimeError, match="already holds"), cache.use("model", Model, "grid"):
            raise AssertionError("a second lease in the same thread")


def test_the_base_stays_the_base_through_bf16_training_and_other_schedulers(demo_spec, demo_data, quick_config,
                                                                            tmp_path, one_thread):
    cache = ModelCache()
    request = GenerateRequest("lgdemo, a red circle", seed=5, steps=3)
    before = np.asarray(generate(cache, demo_spec, request))
    with cache.pipeline(demo_spec, "a check") as pipe:
        weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        scheduler = type(pipe.scheduler).__name__
    config = apply_overrides(quick_config, {"mixed_precision": "bf16", "epochs": 2, "train_text_encoder": True,
                                            "gradient_checkpointing": True, "sample_prompts": ["lgdemo"]})
    result = train(config, demo_spec, demo_data, tmp_path / "run", cache=cache)
    after_training = np.asarray(generate(cache, demo_spec, request))
    generate(cache, demo_spec, GenerateRequest("x", seed=1, steps=2, scheduler="DDIM", lora=result.lora_path))
    after_ddim = np.asarray(generate(cache, demo_spec, request))
    assert np.array_equal(before, after_training) and np.array_equal(before, after_ddim)
    with cache.pipeline(demo_spec, "a check") as pipe:
        assert type(pipe.scheduler).__name__ == scheduler and pipe.unet.dtype == torch.float32
        assert not pipe.get_list_adapters() and not pipe.unet.training
        assert all(torch.equal(weights[k], v) for k, v in pipe.unet.state_dict().items())
    assert cache.loads == 1


def test_captioning_holds_the_lease_while_it_works(tmp_path, demo_spec):
    blip = str(save_tiny_blip(tmp_path / "blip"))
    for index in range(4):
        (tmp_path / f"img{index}.png").write_bytes(photo_bytes(index, (64, 64)))
    cache = ModelCache()
    seen, waiting, results = [], threading.Event(), []

    def during(event):
        if event.kind == "progress" and event.step == 2:  # a generation arrives mid-way: it waits, never shares
            thread = threading.Thread(target=lambda: results.append(generate(
                cache, demo_spec, GenerateRequest("x", steps=1), on_wait=lambda text: waiting.set())))
            thread.start()
            assert waiting.wait(30)
            seen.append((cache.status().user, cache.status().waiting))
            during.thread = thread

    caption_dataset(cache, blip, tmp_path, CaptionOptions(batch_size=2), emit=during)
    during.thread.join(60)
    assert seen == [("captioning", ("generation",))]
    assert results[0].size == (64, 64) and cache.loads == 2 and cache.status().alive == 1


def native_threads() -> set[int]:
    """The OS threads of this process that Python did not start: PyTorch's OpenMP workers among them."""
    import os

    return {int(task) for task in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}


def test_a_test_image_asked_from_a_long_lived_thread_leaves_no_openmp_pool_behind(tmp_path, monkeypatch):
    """A server's request threads live on after a request. OpenMP keeps a pool of workers for each thread that ran
    a parallel kernel, and a second pool alive throttles every other one (training ran 1.9× slower after one Test-tab
    image), so the Studio renders on a thread that ends with the image."""
    from lora_gradio.studio import Studio
    from lora_gradio.threads import KEEP_DEFAULTS
    from lora_gradio.workspace import Workspace

    monkeypatch.setenv(KEEP_DEFAULTS, "1")  # two threads whatever else this machine runs, so a pool has a worker
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        studio = Studio(Workspace.open(tmp_path / "ws"))
        request = GenerateRequest("a red circle on a blue background", seed=3, steps=2)
        studio.generate("demo", request)  # the model loaded, PyTorch's own threads started
        before = native_threads()
        done, leave = threading.Event(), threading.Event()
        made = []

        def request_thread() -> None:
            made.append(studio.generate("demo", request))
            done.set()
            leave.wait(30)

        worker = threading.Thread(target=request_thread)
        worker.start()
        assert done.wait(60)
        left = native_threads() - before
        leave.set()
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert made[0].path.is_file()
    assert left == set(), f"{len(left)} OpenMP worker(s) outlived the image on the request thread"
