"""Configs people bring from kohya_ss and sd-scripts: files written by hand from their documented key names, each
key's mapping, the keys listed as not used, and a run's own sd-scripts export read back."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lora_gradio.errors import UserError
from lora_gradio.models import resolve_base
from lora_gradio.training.config import TrainConfig, apply_overrides
from lora_gradio.training.data import TrainData
from lora_gradio.training.kohya_config import read_kohya_files
from lora_gradio.training.kohya_export import SD_SCRIPTS_DATASET_FILE, SD_SCRIPTS_FILE
from lora_gradio.training.run_folder import RunFolder, RunJob

GALLERY = Path(__file__).parent / "kohya_configs"
ROOT = Path(__file__).resolve().parents[1]


def test_a_kohya_ss_gui_config_maps_every_setting_and_names_the_rest():
    found = read_kohya_files([GALLERY / "gui-locon.json"])
    assert found.kind == "kohya_ss GUI config"
    assert found.settings == {
        "network_type": "locon", "train_text_encoder": True, "output_name": "ohwx-woman", "rank": 32, "alpha": 16.0,
        "conv_rank": 8, "conv_alpha": 4.0, "unet_lr": 2e-4, "text_encoder_lr": 5e-5,
        "lr_scheduler": "cosine_with_restarts", "lr_cycles": 3, "epochs": 12, "batch_size": 2,
        "gradient_accumulation_steps": 1, "mixed_precision": "bf16", "save_dtype": "fp32", "seed": 1234,
        "clip_skip": 2, "min_snr_gamma": 5.0, "multires_noise_iterations": 6, "multires_noise_discount": 0.3,
        "optimizer": "adamw8bit", "weight_decay": 0.05,
        "max_grad_norm": 1.0, "scale_weight_norms": 0.0, "network_dropout": 0.1, "resolution": 768,
        "enable_buckets": True, "flip_augment": True, "shuffle_caption": True, "keep_tokens": 1,
        "caption_dropout": 0.05, "cache_latents_to_disk": True, "gradient_checkpointing": True, "sdpa": True,
        "sample_every_n_steps": 0, "sample_scheduler": "Euler a",
        "sample_prompts": ["ohwx woman, portrait photo --n blurry --w 512 --h 768 --d 7", "ohwx woman at the beach"],
        "save_every_n_epochs": 2,
        "prior_loss_weight": 1.0}
    assert found.folders == {"data": "/data/ohwx/img", "base": "runwayml/stable-diffusion-v1-5",
                             "output": "/data/ohwx/model"}
    assert found.not_used == {
        "lr_warmup": "10 (a percent of the steps: set Warm-up steps to that share of the run)",
        "noise_offset": "0.05 (the file's noise type is Multires, so this is off)",
        "optimizer_args betas": '"0.9,0.99"', "bucket_reso_steps": "64", "color_aug": "false"}
    summary = found.summary()
    assert "`multires_noise_iterations = 6`" in summary and "`rank = 32`" in summary
    assert found.config(TrainConfig(), {"epochs": 1}).epochs == 1  # --set stays on top


def test_an_sd_scripts_training_toml_reads_its_sections_network_args_and_shared_rate():
    found = read_kohya_files([GALLERY / "sd-scripts-training.toml"])
    assert found.kind == "sd-scripts training config"
    assert found.settings == {
        "network_type": "locon", "train_text_encoder": False, "rank": 16, "alpha": 8.0, "conv_rank": 4,
        "conv_alpha": 2.0, "unet_lr": 1.0, "text_encoder_lr": 1.0, "optimizer": "prodigy", "weight_decay": 0.01,
        "lr_scheduler": "constant", "lr_warmup_steps": 50, "output_name": "style-v2", "max_train_steps": 1600,
        "batch_size": 4, "mixed_precision": "fp16", "save_dtype": "fp16", "seed": 7, "gradient_checkpointing": True,
        "sdpa": True, "sample_every_n_steps": 200, "sample_scheduler": "Euler", "resolution": 512,
        "enable_buckets": True, "huber_c": 0.1, "loss_type": "smooth_l1",
        "block_dims": [2, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 12, 12, 12, 12, 8, 8, 8, 8, 4]}
    assert found.folders == {"base": "/models/v1-5-pruned-emaonly.safetensors"}
    assert set(found.not_used) == {"optimizer_args decouple",
                                   "optimizer_args use_bias_correction", "max_token_length", "sample_prompts",
                                   "min_bucket_reso"}
    assert found.not_used["sample_prompts"].endswith("(a file of prompts: paste its lines into Sample prompts)")


def test_a_dataset_toml_gives_the_folder_repeats_trigger_and_regularisation():
    found = read_kohya_files([GALLERY / "sd-scripts-dataset.toml"])
    assert found.settings == {"trigger_word": "sks girl", "shuffle_caption": True, "keep_tokens": 1,
                              "resolution": 640, "enable_buckets": False, "flip_augment": False, "batch_size": 3}
    assert found.repeats == 10
    assert found.folders == {"data": "/data/character/img", "regularization": "/data/character/reg"}
    assert found.not_used == {"caption_extension": '".caption" (captions are read from .txt files: rename them)'}


def test_values_this_app_cannot_take_are_listed_with_why_and_a_broken_file_is_named(tmp_path):
    odd = tmp_path / "odd.json"
    odd.write_text('{"network_dim": 0, "LoRA_type": "LyCORIS/LoHa", "optimizer": "Lion", "train_batch_size": "2"}')
    found = read_kohya_files([odd])
    assert found.settings == {"network_type": "lora", "batch_size": 2}
    assert "rank = 0: input should be greater than or equal to 1" in found.not_used["network_dim"]
    assert "trains LoRA, LoCon and DoRA" in found.not_used["LoRA_type"]
    assert "no counterpart here" in found.not_used["optimizer"]
    broken = tmp_path / "broken.toml"
    broken.write_text("network_dim = [16\n")
    with pytest.raises(UserError, match="neither a kohya_ss JSON config nor an sd-scripts TOML"):
        read_kohya_files([broken])


def test_a_runs_sd_scripts_export_reads_back_as_the_same_settings(tmp_path):
    """Every run folder holds the run as sd-scripts takes it; read back, it is the run's settings, and each setting
    sd-scripts has no key for is named in the file."""
    config = apply_overrides(TrainConfig(), {
        "network_type": "locon", "rank": 24, "alpha": 12, "conv_rank": 6, "conv_alpha": 3, "train_text_encoder": True,
        "unet_lr": 3e-4, "text_encoder_lr": 6e-5, "optimizer": "adamw8bit", "weight_decay": 0.02,
        "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 20, "lr_cycles": 2, "epochs": 7,
        "max_train_steps": 900, "batch_size": 3, "gradient_accumulation_steps": 2, "mixed_precision": "bf16",
        "save_dtype": "fp32", "seed": 99, "clip_skip": 2, "min_snr_gamma": 3, "noise_offset": 0.04,
        "prior_loss_weight": 0.5, "caption_dropout": 0.1, "shuffle_caption": True, "keep_tokens": 2,
        "flip_augment": True, "enable_buckets": False, "resolution": 640, "network_dropout": 0.05,
        "max_grad_norm": 0.5, "scale_weight_norms": 1.5, "save_every_n_epochs": 3, "sample_every_n_steps": 40,
        "sample_scheduler": "DDIM", "gradient_checkpointing": True, "cache_latents_to_disk": True,
        "output_name": "exported", "trigger_word": "zxq"})
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    data = TrainData(tmp_path / "images", None, tmp_path / "reg", 4)
    run.write_sd_scripts(RunJob(config, resolve_base("demo"), data))
    training = tomllib.loads((run.path / SD_SCRIPTS_FILE).read_text())
    assert training["dataset_config"] == str(run.path.resolve() / SD_SCRIPTS_DATASET_FILE)
    found = read_kohya_files([run.path / SD_SCRIPTS_FILE, run.path / SD_SCRIPTS_DATASET_FILE])
    again = found.config(TrainConfig())
    comment = (run.path / SD_SCRIPTS_FILE).read_text().splitlines()[1]
    for name, value in config.to_dict().items():  # each setting came back, or is named in the comment
        assert getattr(again, name) == value or f"{name} = " in comment, name
    assert "trigger_word = \"zxq\"" in comment and "unet_modules = " in comment
    assert found.repeats == 4
    assert found.folders == {"data": str(tmp_path / "images"), "regularization": str(tmp_path / "reg"),
                             "base": "demo", "output": str(run.path.resolve())}


def test_the_cli_trains_from_a_kohya_config_with_set_on_top(tmp_path):
    config = tmp_path / "kohya.json"
    data = tmp_path / "img"
    from lora_gradio.demo.shapes import make_demo_dataset

    make_demo_dataset(data, count=4)
    config.write_text(f'{{"train_data_dir": "{data}", "network_dim": 4, "network_alpha": 2, "epoch": 5, '
                      '"train_batch_size": 2, "mixed_precision": "no", "resolution": "64", "seed": "3", '
                      '"bucket_reso_steps": 32, "text_encoder_lr": 0, "learning_rate": 0.001}')
    done = subprocess.run([sys.executable, "-m", "lora_gradio", "train", "--preset", "demo", "--kohya-config",
                           str(config), "--set", "epochs=1", "--set", "sample_prompts=[]", "--output",
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Not used here: `bucket_reso_steps = 32`." in done.stderr
    job = RunFolder(tmp_path / "run").read_job()
    assert (job.config.rank, job.config.alpha, job.config.batch_size, job.config.seed) == (4, 2.0, 2, 3)
    assert job.config.epochs == 1 and job.config.train_text_encoder is False  # --set wins; a TE rate of 0
    assert job.data.images == data
    exported = tomllib.loads((tmp_path / "run" / SD_SCRIPTS_FILE).read_text())
    assert (exported["network_dim"], exported["max_train_epochs"], exported["network_train_unet_only"]) == (4, 1, True)
