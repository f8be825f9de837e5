"""Many visitors at once through gradio_client: generations, captioning, Prepare and the LoRA tools meet on one model
cache."""

import threading

from gradio_client import Client
from gradio_client.exceptions import AppError
from safetensors.torch import save_file
from test_network_types import trained_file
from tiny_blip import save_tiny_blip

from lora_gradio.dataset import read_caption
from lora_gradio.demo.shapes import make_demo_dataset
from lora_gradio.lora_tools import bake
from lora_gradio.views import pipeline_view

GENERATIONS = 8


def test_eight_generations_a_captioning_a_prepare_a_bake_and_an_extraction_at_once(app, demo_pipe):
    url, workspace = app
    Client(url, verbose=False).predict("crowd", api_name="/create_dataset")
    images = make_demo_dataset(workspace / "datasets" / "crowd" / "images", count=8)
    blip = save_tiny_blip(workspace / "models" / "blip")
    lora = trained_file(demo_pipe, "lora", workspace / "models" / "loras" / "crowd.safetensors")[1]
    tuned, _, _ = bake(pipeline_view(demo_pipe), "demo", [(lora, 1.0, 1.0)], "fp32")
    save_file(tuned, workspace / "models" / "checkpoints" / "tuned.safetensors")
    start = threading.Barrier(GENERATIONS + 4)
    outcomes: dict[str, object] = {}

    def visitor(name, call):
        client = Client(url, verbose=False)
        start.wait(60)
        try:
            outcomes[name] = call(client)
        except AppError as exc:
            outcomes[name] = exc

    calls = {f"generate-{i}": (lambda client, seed=i: client.predict(
        prompt="lgdemo, a red circle", seed=seed, steps=3, api_name="/generate")) for i in range(GENERATIONS)}
    calls["caption"] = lambda client: client.predict(dataset="crowd", model=str(blip), trigger_word="lgcrowd",
                                                     overwrite=True, batch_size=2, api_name="/caption")
    calls["prepare"] = lambda client: client.predict(dataset="crowd", resolution=64, api_name="/prepare")
    calls["bake"] = lambda client: client.predict("loras/crowd.safetensors", 0.5, 0.5, "demo", "fp16", "crowd-bake",
                                                  api_name="/lora_bake")
    calls["extract"] = lambda client: client.predict("tuned.safetensors", 4, api_name="/lora_extract")

    samples, done = [], threading.Event()

    def watch():  # what the cache holds, sampled all through the run
        client = Client(url, verbose=False)
        while not done.is_set():
            samples.append(client.predict(api_name="/cache_status"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=visitor, args=(name, call)) for name, call in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    done.set()
    watcher.join(60)

    failures = {name: str(result) for name, result in outcomes.items() if isinstance(result, AppError)}
    assert len(outcomes) == GENERATIONS + 4 and not failures, failures
    for index in range(GENERATIONS):
        result = outcomes[f"generate-{index}"]
        assert result["image"].endswith(".png") and f"Seed: {index}" in result["parameters"]
    assert len(outcomes["caption"]["written"]) == 8 and read_caption(images / "00_red_ring.png").startswith(
        "lgcrowd, ")
    assert outcomes["prepare"] == {"prepared": 8, "skipped": []}
    assert outcomes["bake"]["file"] == "models/checkpoints/crowd-bake.safetensors"
    assert outcomes["extract"]["modules"] and max(m["error"] for m in outcomes["extract"]["modules"]) < 1e-3

    assert samples and all(sample["alive"] <= 1 for sample in samples), [s for s in samples if s["alive"] > 1]
    users = {sample["user"] for sample in samples}
    assert {"captioning", "generation"} <= users, users  # both really held the model during the run
    log = next(workspace.parent.glob("app-*.log")).read_text()
    assert "Traceback" not in log, log[-3000:]

    after = Client(url, verbose=False).predict(prompt="lgdemo", steps=2, api_name="/generate")
    assert after["image"].endswith(".png")
