"""The command line: the fresh-clone demo run, and one clear line plus a non-zero exit for each bad input."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_gradio.cli import main, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--preset", "demo", "--set", "epochs=1"]


def test_fresh_clone_demo_run_writes_a_kohya_lora(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lora_gradio", "train", "--preset", "demo", "--set", "epochs=4",
                           "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "it draws 64 px pictures" in done.stderr and "step" in done.stderr  # the demo note and the tqdm bar
    assert "pip install kernels" not in done.stderr  # bitsandbytes' optional-kernel notice stays quiet
    lora = Path(done.stdout.strip().splitlines()[-1])
    assert lora == out / "lora-ema.safetensors" and (out / "lora.safetensors").is_file()  # the preset keeps an EMA
    with safe_open(str(lora), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        assert handle.get_tensor(next(k for k in keys if k.endswith(".alpha"))).dtype == torch.float16
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    assert metadata["ss_sd_model_name"] == "demo" and metadata["ss_output_name"] == "lora"
    assert (metadata["lora_gradio_weights"], metadata["ss_ema_decay"]) == ("ema", "0.99")
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def run_cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def test_missing_base_file(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--base", str(tmp_path / "gone.safetensors"), "--data", str(tmp_path),
                        "--output", str(tmp_path / "o"))
    assert code == 2 and "gone.safetensors' not found" in err and err.count("\n") == 1


def test_pickle_checkpoint(capsys, tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"x")
    code, err = run_cli(capsys, "train", "--base", str(tmp_path / "m.ckpt"), "--data", str(tmp_path),
                        "--output", str(tmp_path / "o"))
    assert code == 2 and "pickle" in err and "--allow-pickle" in err


def test_sdxl_shaped_checkpoint(capsys, tmp_path, demo_data):
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
              tmp_path / "xl.safetensors")
    code, err = run_cli(capsys, "train", *QUICK, "--base", str(tmp_path / "xl.safetensors"), "--data",
                        str(demo_data), "--output", str(tmp_path / "o"))
    assert code == 2 and "SDXL" in err and "step" not in err  # no empty progress bar before the error
    held, *rest = err.splitlines()
    assert held.startswith("No held-out images") and rest == ["Loading base model xl.safetensors", rest[-1]]
    assert not (tmp_path / "o").exists()  # a failed run leaves no empty folder behind


def test_random_bytes_checkpoint(capsys, tmp_path, demo_data):
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    code, err = run_cli(capsys, "train", *QUICK, "--base", str(tmp_path / "noise.safetensors"), "--data",
                        str(demo_data), "--output", str(tmp_path / "o"))
    assert code == 2 and "not a readable .safetensors" in err


def test_empty_dataset(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "train", *QUICK, "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o"))
    assert code == 2 and "No usable images" in err and "step" not in err
    assert not (tmp_path / "o").exists()


def test_a_dataset_folder_of_the_app_trains_on_its_images_once(capsys, tmp_path, demo_data):
    from lora_gradio.dataset import prepare_dataset

    dataset = tmp_path / "workspace" / "datasets" / "shapes"
    dataset.mkdir(parents=True)
    demo_data.rename(dataset / "images")
    prepare_dataset(dataset / "images", dataset / "prepared", 64, False)
    code = main(["train", *QUICK, "--data", str(dataset), "--output", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{dataset} is a lora-gradio dataset: training on its images/ (with their captions), with its prepared/ " \
           "training copies." in err
    with safe_open(out.strip().splitlines()[-1], "pt") as handle:
        assert handle.metadata()["ss_num_train_images"] == str(len(list((dataset / "images").glob("*.png"))))


def test_unreadable_image_and_missing_caption_are_named_and_training_goes_on(capsys, tmp_path, demo_data):
    (demo_data / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    Image.new("RGB", (96, 96), "purple").save(demo_data / "nocaption.png")
    code, err = run_cli(capsys, "train", *QUICK, "--set", "trigger_word=lgdemo", "--data", str(demo_data),
                        "--output", str(tmp_path / "o"))
    assert code == 0
    assert "Skipped truncated.jpg" in err
    assert "nocaption.png has no caption; training it with 'lgdemo'" in err
    with safe_open(str(tmp_path / "o" / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_num_train_images"] == "9"


def test_preset_with_wrong_field(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--preset", "demo", "--set", "rnak=3", "--output", str(tmp_path))
    assert code == 2 and "unknown setting 'rnak'" in err


def test_unwritable_output_folder(capsys, tmp_path, demo_data):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code, err = run_cli(capsys, "train", *QUICK, "--data", str(demo_data), "--output", str(blocker / "out"))
    assert code == 2 and "Cannot write to output folder" in err
    assert blocker.read_text() == "a file where a folder should be"


def test_overrides_are_typed():
    assert parse_overrides(["rank=32", "unet_lr=1e-4", "train_text_encoder=true", "trigger_word=ohwx",
                            "unet_modules=to_q,to_k"]) == {
        "rank": 32, "unet_lr": 1e-4, "train_text_encoder": True, "trigger_word": "ohwx",
        "unet_modules": ["to_q", "to_k"]}


def test_generate_writes_a_png(capsys, tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt", "a cat", "--steps", "2", "--output", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("command", [["presets"]])
def test_presets_listed(capsys, command):
    assert main(command) == 0
    assert "seed-recommended" in capsys.readouterr().out


def test_two_process_launch_shards_batches_and_saves_once(tmp_path):
    """The multi-GPU path (DDP, gathered loss, rank-0 saves), exercised with two CPU processes over gloo."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "lora_gradio", "train", "--preset", "demo", "--set", "epochs=3", "--set", "batch_size=2",
                           "--output", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(out / "lora-ema.safetensors")]  # printed once, by rank 0
    for name in ("lora.safetensors", "lora-ema.safetensors"):  # the trained weights, and their average
        with safe_open(str(out / name), "pt") as handle:
            assert handle.metadata()["ss_steps"] == "15"  # 10 batches an epoch, split over 2 processes, 3 epochs


def test_resume_after_a_killed_process_continues_at_the_saved_step(tmp_path):
    import signal
    import time

    from lora_gradio.training.run_folder import RunFolder

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "lora_gradio", "train", "--preset", "demo", "--set", "epochs=6",
                                "--set", "batch_size=1", "--set", "save_every_n_epochs=1", "--output", str(out)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "lora-000002.safetensors").exists():
        assert process.poll() is None and time.monotonic() < deadline, "training ended or stalled"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)  # no chance to save anything more
    process.wait()
    assert not (out / "lora.safetensors").exists()
    resumed_at = RunFolder(out).load_state()["step"]
    assert resumed_at >= 40 and resumed_at % 20 == 0  # a whole number of 20-step epochs, at least two

    done = subprocess.run([sys.executable, "-m", "lora_gradio", "resume", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Resuming at step {resumed_at} " in done.stderr  # where the saved state left off
    with safe_open(str(out / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "120" and handle.metadata()["ss_epoch"] == "6"
    assert not (out / "resume-state.pt").exists()


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "resume", str(tmp_path))
    assert code == 2 and "not a lora-gradio run folder" in err


def test_import_from_the_command_line_reports_like_the_page(tmp_path, capsys):
    from test_brought_files import windows_zip

    windows_zip(tmp_path / "trip.zip")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "note.pdf").write_bytes(b"%PDF-1.4")
    code = main(["import", str(tmp_path / "trip.zip"), str(tmp_path / "loose"), "--into", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.splitlines() == ["2 images and 2 captions imported from trip.zip; 2 system files ignored (Thumbs.db, "
                                "desktop.ini).",
                                "0 images and 0 captions imported from loose; 1 skipped (see each file's reason)."]
    assert "warning: IMG_0001 (2).txt: caption for IMG_0001 (2).jpg; not UTF-8" in err
    assert "skipped: note.pdf: not an image type (.pdf)" in err


@pytest.mark.parametrize("fmt", ["ui", "api"])
def test_the_workflow_command_writes_comfyuis_json(tmp_path, capsys, fmt):
    from lora_gradio.comfyui import api_from_ui

    out = tmp_path / "anna.json"
    code = main(["workflow", "--lora", "loras/anna.safetensors", "--base", "/models/dreamshaper_8.safetensors",
                 "--prompt", "ohwx, portrait", "--seed", "7", "--scheduler", "DDIM", "--strength-clip", "0.5",
                 "--format", fmt, "--output", str(out)])
    assert code == 0
    graph = json.loads(out.read_text())
    prompt = graph if fmt == "api" else api_from_ui(graph)
    assert prompt["1"]["inputs"]["ckpt_name"] == "dreamshaper_8.safetensors"
    assert prompt["2"]["inputs"]["lora_name"] == "anna.safetensors" and prompt["2"]["inputs"]["strength_clip"] == 0.5
    assert (prompt["6"]["inputs"]["seed"], prompt["6"]["inputs"]["scheduler"]) == (7, "ddim_uniform")


def test_every_generate_flag_says_what_it_does_and_its_default():
    shown = subprocess.run([sys.executable, "-m", "lora_gradio", "generate", "--help"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "200"})
    flags = re.findall(r"^  (--[\w-]+)(?: [A-Z_{},0-9]+)?\s{2,}(.+)$", shown.stdout, re.MULTILINE)
    assert {flag for flag, _ in flags} >= {"--base", "--lora", "--prompt", "--seed", "--steps", "--cfg", "--width",
                                           "--strength-model", "--output", "--allow-pickle"}
    helps = dict(flags)
    assert "(default: 0)" in helps["--seed"] and "(default: 20)" in helps["--steps"]
    assert "(default" not in helps["--lora"]  # no "default: None"
    assert not shown.stderr


def test_resize_merge_bake_and_extract_from_the_command_line(tmp_path, capsys, demo_pipe):
    from test_lora_tools import deltas, relative
    from test_network_types import trained_file

    _, lora, _ = trained_file(demo_pipe, "locon", tmp_path / "anna.safetensors")
    small, mixed, baked, found = (tmp_path / f"{name}.safetensors" for name in ("small", "mixed", "baked", "found"))
    assert main(["resize", str(lora), "--rank", "2", "--output", str(small)]) == 0
    said = capsys.readouterr()
    assert said.out.strip() == str(small) and "rank 4 → 2, error" in said.err and "modules at rank 2" in said.err
    assert main(["merge", f"{lora}:0.5", f"{small}:-1", "--output", str(mixed)]) == 0
    a, b, m = deltas(lora), deltas(small), deltas(mixed)
    assert all(relative(m[name], 0.5 * a[name] - b[name]) < 2e-3 for name in a)
    assert main(["bake", "--base", "demo", "--lora", str(lora), "--strength-clip", "1", "--precision", "fp32",
                 "--output", str(baked)]) == 0
    assert "demo with anna.safetensors at 1/1 baked in, fp32" in capsys.readouterr().err
    assert main(["extract", "--base", "demo", "--tuned", str(baked), "--rank", "4", "--conv-rank", "2", "--output",
                 str(found)]) == 0
    recovered = deltas(found)
    assert all(relative(recovered[name], delta) < 2e-3 for name, delta in a.items())
    capsys.readouterr()
    assert main(["resize", str(lora), "--rank", "2", "--output", str(small)]) == 2
    assert "already exists: give another --output" in capsys.readouterr().err
    assert main(["resize", str(lora), "--rank", "2", "--method", "sv_fro", "--value", "nan", "--output",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "The sv_fro value must be more than 0 and at most 1" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
