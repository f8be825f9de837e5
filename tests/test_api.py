"""The public API through gradio_client, as scripts and other tools use the app; bad input gets clear errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from bad_files import photo_bytes
from browser import raw_call, wait_for
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from safetensors import safe_open

from lora_gradio.demo.shapes import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api(app):
    """A client of the module's app, and the app's workspace."""
    url, workspace = app
    return Client(url, verbose=False), workspace


def queue_command(client, *flags):
    """``python -m lora_gradio queue`` against the module's app, as a person types it in a shell."""
    done = subprocess.run([sys.executable, "-m", "lora_gradio", "queue", "--url", client.src, *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def demo_settings(client, **changes):
    """The demo preset's settings, some changed."""
    return {**client.predict("demo", api_name="/preset"), **changes}


def job(client, job_id=""):
    return client.predict(job_id, 0, api_name="/job_status")


def generate(client, lora="", strength=1.0, seed=3):
    return client.predict(prompt="lgdemo, a red circle", seed=seed, steps=3, lora=lora, strength_model=strength,
                          strength_clip=strength, api_name="/generate")


def test_train_stop_generate_and_grid_through_the_api(api):
    client, workspace = api
    client.predict("apidata", api_name="/create_dataset")
    make_demo_dataset(workspace / "datasets" / "apidata" / "images", count=8)
    started = client.predict(dataset="apidata", base="demo",
                             settings=demo_settings(client, epochs=400, batch_size=2, trigger_word="lgdemo"),
                             api_name="/train_start")
    assert "1600 steps" in started["estimate"] and started["job_id"]
    assert "No held-out images (Held-out images is 0)" in started["estimate"]  # the demo preset holds none out
    wait_for(lambda: job(client)["step"] >= 3, 60, "training to start")
    with pytest.raises(AppError, match="validation dataset must be another dataset"):
        client.predict(dataset="apidata", settings=demo_settings(client), validation="apidata",
                       api_name="/train_start")
    assert started["queued"] == 0 and started["message"] == f"Run {started['run']} is training."
    added = queue_command(client, "--add", "apidata", "--preset", "demo", "--set", "epochs=3")  # from a shell
    second = re.search(r"Run (\S+) is queued, position 1; it should start in about .+ job id, the key to stopping "
                       r"it: (\S+)", added.stderr)
    assert second, added.stderr
    assert [(row["place"], row["run"]) for row in client.predict(api_name="/queue")] == [
        ("training", started["run"]), ("1", second[1])]
    assert job(client, second[2])["status"] == "queued" and job(client, second[2])["position"] == 1
    cancelled = queue_command(client, "--cancel", second[1])
    assert f"Run {second[1]} left the queue." in cancelled.stderr
    assert cancelled.stdout.split()[:2] == ["training", started["run"]] and len(cancelled.stdout.splitlines()) == 1
    assert job(client, second[2])["status"] == "cancelled"
    third, fourth = (client.predict(dataset="apidata", base="demo", settings=demo_settings(client, epochs=epochs),
                                    api_name="/train_start") for epochs in (3, 4))
    assert (third["queued"], fourth["queued"]) == (1, 2)
    moved = client.predict(fourth["run"], 1, api_name="/queue_move")  # the operator puts the later one first
    assert moved == f"Run {fourth['run']} is now number 1 in the queue."
    assert [row["run"] for row in client.predict(api_name="/queue")] == [started["run"], fourth["run"], third["run"]]
    with pytest.raises(AppError, match="Give the new place as a whole number from 1"):
        client.predict(third["run"], 1.5, api_name="/queue_move")
    for waiting in (third, fourth):
        client.predict(waiting["run"], api_name="/queue_cancel")
    assert [row["run"] for row in client.predict(api_name="/queue")] == [started["run"]]
    with pytest.raises(AppError, match="busy with training"):
        generate(client)
    with pytest.raises(AppError, match=r"is training now\. Stop it first"):
        client.predict(started["run"], api_name="/delete_run")
    assert client.predict(api_name="/runs")[0]["run"] == started["run"]
    other = Client(client.src, verbose=False)  # another visitor, without the job id
    with pytest.raises(AppError, match="Only the page or script that started a job"):
        other.predict(job_id="", api_name="/train_stop")
    with pytest.raises(AppError, match="Only the page or script that started a job"):
        other.predict(job_id="guessed-id", api_name="/train_stop")
    assert job(client)["status"] == "running"
    client.predict(job_id=started["job_id"], api_name="/train_stop")
    wait_for(lambda: job(client)["status"] == "stopped", 60, "the stop")
    state = job(client, started["job_id"])
    assert state["saved"][-1].endswith(f"apidata-step{state['step']:08d}-ema.safetensors")  # not the finished run's
    assert state["saved"][-2].endswith(f"apidata-step{state['step']:08d}.safetensors")  # name; the average beside it
    assert len(state["losses"]) == state["step"]
    assert "job_id" not in state and started["job_id"] not in str(state)  # the key to Stop is never shown
    lora = f"{started['run']}/{Path(state['saved'][-1]).name}"
    with safe_open(client.predict(lora, api_name="/download_lora"), "pt") as downloaded:
        assert downloaded.metadata()["ss_network_module"] == "networks.lora"
    with pytest.raises(AppError, match="not in this workspace"):
        client.predict("../../settings.json", api_name="/download_lora")
    image = generate(client, lora, 0.5)
    assert "strength_model: 0.5, strength_clip: 0.5" in image["parameters"] and image["image"].endswith(".png")
    grid = client.predict(loras=[lora], strengths=[0, 1], prompt="lgdemo", steps=2, api_name="/grid")
    assert grid["image"].endswith(".png")
    with pytest.raises(AppError, match=r"grids up to 36 images \(37 asked\)"):
        client.predict(loras=[lora], strengths=[0.05 * i for i in range(37)], prompt="x", api_name="/grid")

    resumed = client.predict(run=started["run"], api_name="/train_resume")  # continue where it left off
    wait_for(lambda: job(client)["step"] > state["step"], 60, "the resumed run")
    assert job(client, resumed["job_id"])["losses"][:state["step"]] == state["losses"]  # the curve goes on
    client.predict(job_id=resumed["job_id"], api_name="/train_stop")
    wait_for(lambda: job(client)["status"] == "stopped", 60, "the second stop")
    listed = client.predict(api_name="/runs")[0]
    assert listed["run"] == started["run"] and listed["status"] == "interrupted"
    assert listed["steps"] == f"{job(client)['step']}/1600" and listed["recommended"] == "–"
    with pytest.raises(AppError, match="no recommendation yet"):  # nothing was saved at an epoch's end
        client.predict(started["run"], api_name="/recommendation")
    with pytest.raises(AppError, match="is not a run name"):
        client.predict("../settings.json", api_name="/recommendation")
    assert client.predict(started["run"], api_name="/delete_run") == f"Deleted run {started['run']}."
    assert not (workspace / "outputs" / started["run"]).exists() and client.predict(api_name="/runs") == []

    finished = client.predict(dataset="apidata", base="demo", api_name="/train_start", settings=demo_settings(
        client, epochs=2, save_every_n_epochs=1, trigger_word="lgdemo", sample_steps=4))
    wait_for(lambda: job(client, finished["job_id"])["status"] == "done", 120, "a short run")
    advice = client.predict(api_name="/recommendation")  # the latest run's: which file, at what strength, and why
    assert advice["final"] and advice["file"] in {"apidata-000001-ema.safetensors", "apidata-ema.safetensors"}
    assert advice["headline"].startswith(f"Recommended: epoch {advice['epoch']} ({advice['file']}) at strength")
    assert [row["epoch"] for row in advice["scores"]] == [1, 2] and len(advice["trials"]) == 3
    assert client.predict(api_name="/runs")[0]["recommended"] == f"epoch {advice['epoch']} at {advice['strength']:g}"
    assert job(client, finished["job_id"])["recommendation"] == advice


@pytest.mark.parametrize(("changes", "message"), [
    ({"rank": 0}, "rank = 0"),
    ({"unet_lr": -0.001}, "unet_lr = -0.001"),
    ({"epochs": 0}, "epochs = 0"),
    ({"sample_prompts": ["x" * 2000]}, "at most 1000 characters"),
    ({"learning_rate": 1e-4}, "unknown setting 'learning_rate'"),
    ({"rnak": 8}, "unknown setting 'rnak' \\(did you mean 'rank'\\?\\)"),
])
def test_impossible_settings_and_unknown_keys_are_refused_by_name(api, changes, message):
    client, _ = api
    with pytest.raises(AppError, match=message):
        client.predict(dataset="apidata", settings=demo_settings(client, **changes), api_name="/train_start")


@pytest.mark.parametrize(("extra", "message"), [
    ({"regularization": "../../etc"}, "is not a usable dataset name"),
    ({"regularization": "apidata"}, "must be another dataset"),
    ({"regularization": "nowhere"}, "Dataset 'nowhere' does not exist"),
    ({"repeats": 0}, "repeats = 0: use a whole number from 1 to 1000"),
    ({"repeats": 5000}, "repeats = 5000"),
])
def test_hostile_regularisation_and_repeats_are_refused_by_name(api, extra, message):
    client, _ = api
    with pytest.raises(AppError, match=message):
        client.predict(dataset="apidata", settings=demo_settings(client), **extra, api_name="/train_start")


@pytest.mark.parametrize(("arguments", "message"), [
    ({"steps": 0}, "steps = 0"),
    ({"seed": -1}, "seed = -1"),
    ({"strength_model": 7}, "strength_model = 7"),
    ({"width": 4000}, "size 4000"),
    ({"scheduler": "Heun"}, "scheduler 'Heun'"),
    ({"clip_skip": 3}, "clip_skip = 3: use 1 or 2"),
    ({"lora": "../../etc/passwd"}, "not in this workspace"),
    ({"width": 2048}, "This server allows images up to 1024 px a side"),  # the server's limits, named
    ({"steps": 120}, "up to 100 steps"),
])
def test_silly_generation_parameters_are_refused(api, arguments, message):
    client, _ = api
    with pytest.raises(AppError, match=message):
        client.predict(**{"prompt": "x", "steps": 2, **arguments}, api_name="/generate")


def test_no_dataset_and_a_base_that_fails_to_load(api):
    client, workspace = api
    with pytest.raises(AppError, match="Choose a dataset"):
        client.predict(dataset="", settings=demo_settings(client), api_name="/train_start")
    broken = workspace / "models" / "checkpoints" / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    client.predict("brokenbase", api_name="/create_dataset")
    shutil.copytree(workspace / "datasets" / "apidata" / "images", workspace / "datasets" / "brokenbase" / "images")
    started = client.predict(dataset="brokenbase", base="broken.safetensors", settings=demo_settings(client),
                             api_name="/train_start")
    wait_for(lambda: job(client, started["job_id"])["status"] == "error", 60, "the failure")
    assert "not a readable .safetensors" in job(client)["message"]
    assert generate(client)["image"]  # the app carries on


def test_a_lora_for_another_architecture_is_refused_in_the_test_tab(api):
    import torch
    from safetensors.torch import save_file

    client, workspace = api
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 640), f"{name}.lora_up.weight": torch.zeros(640, 4),
               f"{name}.alpha": torch.tensor(4.0)}, workspace / "models" / "loras" / "xl_style.safetensors")
    with pytest.raises(AppError, match=r"does not fit this SD1.x base model"):
        generate(client, "loras/xl_style.safetensors")


@pytest.mark.parametrize(("values", "answer"), [
    ('"a", "", NaN, 2, 7.0, 0, 0', "Cannot generate: seed = nan: use a whole number."),
    ('"a", "", 1, 2, 7.0, NaN, 0', "Cannot generate: width = nan: use a whole number."),
    ('"a", "", 1e300, 2, 7.0, 0, 0', "Cannot generate: seed = 10000000000000000525…: use 0 to 2^63 - 1."),
    ('"a", "", 1, 2, Infinity, 0, 0', "Cannot generate: CFG = inf: use a number."),
    ('"a", "' + "x" * 2500 + '", 1, 2, 7.0, 0, 0', "the negative prompt is 2500 characters"),
    ('null, null, 4294967297, 2, 7.0, 0, 0', "event: complete"),  # an empty prompt and a seed above 2^32 work
])
def test_hostile_generation_values_get_the_pages_messages(api, values, answer):
    client, _ = api
    assert answer in raw_call(client.src, "generate", values + ', "Euler", "", 1.0, 1.0, "demo", 1')


@pytest.mark.parametrize("since", ["NaN", "-1", "1.5", '"x"'])
def test_a_job_status_from_a_hostile_index_is_refused_by_name(api, since):
    client, _ = api
    assert raw_call(client.src, "job_status", f'"", {since}').startswith("since = ")


def test_a_run_name_that_is_not_a_file_name_is_refused(api):
    client, _ = api
    with pytest.raises(AppError, match=r"output_name = '\.\.': use a file name"):
        client.predict(dataset="apidata", settings=demo_settings(client, output_name=".."), api_name="/train_start")


def test_a_mac_zip_a_linked_folder_and_third_party_loras_through_the_api(api, demo_pipe, tmp_path):
    import os

    from gradio_client import handle_file
    from test_brought_files import mac_zip
    from test_lora_files import kohya_file, peft_file

    client, workspace = api
    client.predict("brought", api_name="/create_dataset")
    answer = client.predict("brought", [handle_file(mac_zip(tmp_path / "photos.zip"))], api_name="/import_files")
    assert answer["summary"].startswith("2 images and 2 captions imported from photos.zip; 2 system files ignored")
    assert {row["name"]: row["status"] for row in answer["files"]} == {
        "Café.jpg": "imported", "beach.png": "imported", "Café.txt": "imported", "beach.txt": "imported"}
    images = workspace / "datasets" / "brought" / "images"
    assert (images / "Café.txt").read_text() == "ohwx, a café terrace\n"

    folder = workspace / "incoming"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes((images / "beach.png").read_bytes())
    os.symlink(tmp_path, folder / "elsewhere")
    client.predict("linked", api_name="/create_dataset")
    answer = client.predict("linked", str(folder), api_name="/import_folder")
    assert "incoming held 1 unsafe entry" in answer["summary"]
    assert answer["files"][0]["name"] == "elsewhere" and "outside the imported folder" in answer["files"][0]["message"]

    loras = workspace / "models" / "loras"
    peft_file(demo_pipe, loras / "diffusers_style.safetensors")
    assert generate(client, "loras/diffusers_style.safetensors")["lora"].startswith("All 17 LoRA modules applied")
    kohya_file(demo_pipe, loras / "diverged.safetensors",
               **{"lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(float("inf"))})
    with pytest.raises(AppError, match=r"'diverged.safetensors' holds NaN or infinite values"):
        generate(client, "loras/diverged.safetensors")


def test_the_workflow_endpoint_returns_both_comfyui_formats(api):
    from lora_gradio.comfyui import api_from_ui

    client, _ = api
    graphs = [json.loads(Path(client.predict(prompt="ohwx, portrait", seed=11, base="demo", api_format=api_format,
                                             clip_skip=2, api_name="/workflow")).read_text(encoding="utf-8"))
              for api_format in (False, True)]
    assert api_from_ui(graphs[0]) == graphs[1]
    assert graphs[1]["6"]["inputs"]["seed"] == 11 and graphs[1]["3"]["inputs"]["text"] == "ohwx, portrait"
    assert graphs[1]["9"]["inputs"]["stop_at_clip_layer"] == -2 and graphs[1]["3"]["inputs"]["clip"] == ["9", 0]


def test_an_import_of_a_server_path_dressed_as_an_upload_is_refused(api):
    client, workspace = api
    client.predict("smuggled", api_name="/create_dataset")
    upload = '{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}'
    assert raw_call(client.src, "import_files", f'"smuggled", [{upload}]') != "event: complete"  # Gradio refuses
    assert not list((workspace / "datasets" / "smuggled" / "images").glob("*"))


def test_a_stop_signal_saves_the_running_run_before_the_server_leaves(tmp_path):
    import signal
    import subprocess
    import sys

    from browser import ROOT, free_port

    workspace, port = tmp_path / "workspace", free_port()
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), "--workspace",
                                str(workspace)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = wait_for(lambda: connected(f"http://127.0.0.1:{port}/"), 90, "the app")
        client.predict("signal", api_name="/create_dataset")
        make_demo_dataset(workspace / "datasets" / "signal" / "images", count=8)
        started = client.predict(dataset="signal", settings=demo_settings(client, epochs=500), api_name="/train_start")
        wait_for(lambda: job(client, started["job_id"])["step"] >= 3, 90, "a few steps")
        process.send_signal(signal.SIGTERM)  # what docker stop sends
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        log.close()
    run = workspace / "outputs" / started["run"]
    saved = list(run.glob("signal-step*.safetensors"))
    assert saved and (run / "resume-state.pt").is_file()  # the run can be resumed where it stopped
    assert "SIGTERM: stopping the running jobs and saving" in (tmp_path / "app.log").read_text()


def connected(url):
    try:
        return Client(url, verbose=False)
    except Exception:  # not serving yet
        return None


def test_a_pickle_lora_is_refused_as_one(api):
    client, workspace = api
    torch.save({"x": torch.zeros(1)}, workspace / "models" / "loras" / "old_style.pt")
    with pytest.raises(AppError, match=r"is a pickle file: the app loads .safetensors LoRAs only"):
        generate(client, "loras/old_style.pt")


def test_a_kohya_config_imports_through_the_api(api, tmp_path):
    client, _ = api
    gallery = Path(__file__).parent / "kohya_configs"
    answer = client.predict([handle_file(str(gallery / "sd-scripts-training.toml")),
                             handle_file(str(gallery / "sd-scripts-dataset.toml"))], "demo",
                            api_name="/import_kohya_config")
    settings = answer["settings"]
    assert (settings["rank"], settings["network_type"], settings["optimizer"]) == (16, "locon", "prodigy")
    assert (settings["trigger_word"], settings["resolution"], answer["repeats"]) == ("sks girl", 640, 10)
    assert settings["sample_prompts"] == client.predict("demo", api_name="/preset")["sample_prompts"]  # the preset's
    assert (settings["loss_type"], settings["huber_c"]) == ("smooth_l1", 0.1)
    assert answer["not_used"]["max_token_length"] == "225" and "caption_extension" in answer["not_used"]
    assert answer["folders"]["data"] == "/data/character/img"
    secret = tmp_path / "secret.json"  # a file on the server, named by a raw request instead of uploaded
    secret.write_text('{"network_dim": 77}')
    call = httpx.post(f"{client.src}gradio_api/call/import_kohya_config",
                      json={"data": [[{"path": str(secret), "meta": {"_type": "gradio.FileData"}}], "demo"]})
    answer = httpx.get(f"{client.src}gradio_api/call/import_kohya_config/{call.json()['event_id']}", timeout=60).text
    assert answer.startswith("event: error") and "77" not in answer
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(AppError, match="neither a kohya_ss JSON config nor an sd-scripts TOML file"):
        client.predict([handle_file(str(broken))], api_name="/import_kohya_config")


def test_resize_merge_bake_and_extract_through_the_api(api, demo_pipe):
    from test_network_types import trained_file

    client, workspace = api
    trained_file(demo_pipe, "locon", workspace / "models" / "loras" / "tools.safetensors")
    resized = client.predict("loras/tools.safetensors", 2, "sv_ratio", 2.0, api_name="/lora_resize")
    assert resized["lora"] == "loras/tools-sv_ratio2.safetensors"  # named by what was done, beside the others
    assert resized["file"] == "models/loras/tools-sv_ratio2.safetensors"
    assert {module["rank"] for module in resized["modules"]} <= {1, 2} and "error mean" in resized["summary"]
    merged = client.predict(["loras/tools.safetensors", resized["lora"]], [0.5, -0.5], api_name="/lora_merge")
    assert {m["name"]: m["rank"] for m in merged["modules"]} == {  # ranks side by side: each module's two add up
        m["name"]: m["rank_before"] + m["rank"] for m in resized["modules"]}
    baked = client.predict("loras/tools.safetensors", 0.8, 1.0, "demo", "fp32", "demo-tools", api_name="/lora_bake")
    assert baked["file"] == "models/checkpoints/demo-tools.safetensors" and baked["lora"] == ""
    image = client.predict(prompt="lgdemo, a red circle", seed=3, steps=3, base="demo-tools.safetensors",
                           api_name="/generate")  # the baked checkpoint is a base model like any other
    assert "demo-tools.safetensors" in image["parameters"]
    found = client.predict("demo-tools.safetensors", 4, 2, api_name="/lora_extract")
    assert found["lora"] == "loras/demo-tools-extracted-r4.safetensors"
    assert max(m["error"] for m in found["modules"]) < 1e-3  # the baked LoRA (rank 4, convs 2) comes back whole
    assert generate(client, found["lora"])["lora"].startswith("All ")
    with pytest.raises(AppError, match="already exists: choose another name"):
        client.predict("loras/tools.safetensors", 0.8, 1.0, "demo", "fp32", "demo-tools", api_name="/lora_bake")
    with pytest.raises(AppError, match="Merging needs at least two LoRA files"):
        client.predict(["loras/tools.safetensors"], [1.0], api_name="/lora_merge")
    with pytest.raises(AppError, match="one weight per LoRA"):
        client.predict(["loras/tools.safetensors", resized["lora"]], [1.0], api_name="/lora_merge")


def test_the_caption_endpoint_runs_a_wd_tagger_with_its_options(api, tmp_path):
    from tiny_captioners import save_tiny_wd_tagger

    client, workspace = api
    tagger = save_tiny_wd_tagger(workspace / "models" / "wd-api", [0.2, 0.7, 0.1, 0.05, 0.99, 0.5, 0.36, 0.34, 0.8,
                                                                   0.6, 0.95, 0.9, 0.8])
    client.predict("tagged", api_name="/create_dataset")
    picture = tmp_path / "one.png"
    picture.write_bytes(photo_bytes(80))
    client.predict("tagged", [handle_file(picture)], api_name="/import_files")
    answer = client.predict(dataset="tagged", model=str(tagger), trigger_word="ohwx", general_threshold=0.9,
                            ratings=True, underscores=True, blacklist="solo", api_name="/caption")
    assert answer["written"] == {"one.png": "ohwx, 1girl, hatsune_miku, sensitive"}
    refused = raw_call(client.src, "caption", f'"tagged", {json.dumps(str(tagger))}, "", "", "", "sentence", false, '
                                                  '40, 8, "detailed", NaN, 0.85, false, false, ""')
    assert "general threshold nan: use 0 to 1" in refused
