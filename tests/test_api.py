"""The same events through gradio_client, as scripts and other tools use the app; bad input gets clear errors."""

import shutil
import time

import pytest
from browser import running_app, wait_for
from gradio_client import Client
from gradio_client.exceptions import AppError

from lora_gradio.dataset import make_demo_dataset

NO_LORA = "(no LoRA: the base model)"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("api") / "workspace"
    with running_app(workspace) as url:
        yield Client(url, verbose=False), workspace


def demo_settings(client, **changes):
    """The demo preset's values, in the Train tab's order, with some changed by field position name."""
    from lora_gradio.ui.train_tab import ADVANCED, MAIN

    names = [*MAIN, "sample_prompts", *ADVANCED]
    _, *values = client.predict("demo", api_name="/load_preset")
    for name, value in changes.items():
        values[names.index(name)] = value
    return values


def job(client):
    return client.predict(api_name="/job_status")


def generate(client, lora, strength, seed=3):
    result = client.predict("demo", "", "lgdemo, a red circle", "", seed, 3, 7, 0, 0, "Euler", lora, strength, strength,
                            api_name="/generate")
    return result[0]


def test_train_stop_generate_and_grid_through_the_api(api):
    client, workspace = api
    client.predict("apidata", api_name="/create_dataset")
    make_demo_dataset(workspace / "datasets" / "apidata" / "images")
    plan, _ = client.predict("apidata", "demo", "", *demo_settings(client, epochs=400, trigger_word="lgdemo"),
                             api_name="/train_start")
    assert "1600 steps" in plan
    wait_for(lambda: job(client)["step"] >= 3, 60, "training to start")
    with pytest.raises(AppError, match="already running"):
        client.predict("apidata", "demo", "", *demo_settings(client), api_name="/train_start")
    with pytest.raises(AppError, match="busy with training"):
        generate(client, NO_LORA, 1)
    client.predict(api_name="/train_stop")
    wait_for(lambda: job(client)["status"] == "stopped", 60, "the stop")
    state = job(client)
    assert state["saved"][-1].endswith("lora.safetensors") and len(state["losses"]) == state["step"]
    run = workspace / "outputs" / state["run_dir"].rsplit("/", 1)[-1]
    lora = f"{run.name}/lora.safetensors"
    image = generate(client, lora, 0.5)
    assert "strength_model: 0.5, strength_clip: 0.5" in image["caption"]
    grid = client.predict("demo", "", [lora], "0, 1", "lgdemo", "", 1, 2, 7, 0, 0, "Euler", lora, 1, 1,
                          api_name="/grid")
    assert grid.endswith(".png")

    client.predict(run.name, api_name="/train_resume")  # continue the stopped run where it left off
    wait_for(lambda: job(client)["step"] > state["step"], 60, "the resumed run")
    assert job(client)["losses"][0][0] == state["step"] + 1
    client.predict(api_name="/train_stop")
    wait_for(lambda: job(client)["status"] == "stopped", 60, "the second stop")


@pytest.mark.parametrize(("changes", "message"), [
    ({"rank": 0}, "rank = 0"),
    ({"unet_lr": -0.001}, "unet_lr = -0.001"),
    ({"epochs": 0}, "epochs = 0"),
    ({"sample_prompts": "x" * 2000}, "at most 1000 characters"),
])
def test_impossible_settings_are_refused_with_the_field_named(api, changes, message):
    client, _ = api
    with pytest.raises(AppError, match=message):
        client.predict("apidata", "demo", "", *demo_settings(client, **changes), api_name="/train_start")


def test_no_dataset_and_a_base_that_fails_to_load(api):
    client, workspace = api
    with pytest.raises(AppError, match="Choose a dataset"):
        client.predict(None, "demo", "", *demo_settings(client), api_name="/train_start")
    broken = workspace / "models" / "checkpoints" / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    client.predict("brokenbase", api_name="/create_dataset")
    shutil.copytree(workspace / "datasets" / "apidata" / "images", workspace / "datasets" / "brokenbase" / "images")
    client.predict("brokenbase", "broken.safetensors", "", *demo_settings(client), api_name="/train_start")
    wait_for(lambda: job(client)["status"] == "error", 60, "the failure")
    assert "not a readable .safetensors" in job(client)["message"]
    time.sleep(0.5)
    assert generate(client, NO_LORA, 1)["image"]  # the app carries on


def test_a_lora_for_another_architecture_is_refused_in_the_test_tab(api):
    import torch
    from safetensors.torch import save_file

    client, workspace = api
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 640), f"{name}.lora_up.weight": torch.zeros(640, 4),
               f"{name}.alpha": torch.tensor(4.0)}, workspace / "models" / "loras" / "xl_style.safetensors")
    with pytest.raises(AppError, match=r"does not fit this SD1.x base model"):
        generate(client, "loras/xl_style.safetensors", 1)
