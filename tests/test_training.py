"""The training loop on the tiny demo model: it learns, it exports faithfully, it stops, it is reproducible."""

import json
import statistics
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lora_gradio.cache import ModelCache
from lora_gradio.errors import UserError
from lora_gradio.inference import generate
from lora_gradio.request import GenerateRequest
from lora_gradio.training.config import UNET_ATTENTION, apply_overrides
from lora_gradio.training.loop import train
from lora_gradio.training.network import make_optimizer

ALL_UNET = [*UNET_ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
PROMPT = "lgdemo, a red circle on a plain background"


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, demo_spec):
    """Train hard on four images; keep the run, its cache and the in-memory model's output at the final save."""
    from lora_gradio.demo.shapes import make_demo_dataset

    root = tmp_path_factory.mktemp("overfit")
    data = make_demo_dataset(root / "data", count=8)
    for extra in sorted(data.glob("*"))[8:]:
        extra.unlink()
    from lora_gradio.training.config import load_preset

    config = apply_overrides(load_preset("demo")[0], {
        "network_type": "lora", "epochs": 40, "unet_lr": 5e-3, "text_encoder_lr": 1e-3, "rank": 32, "alpha": 32,
        "batch_size": 2, "unet_modules": ALL_UNET, "train_text_encoder": True, "save_every_n_epochs": 20,
        "output_name": "fit", "lr_scheduler": "cosine", "ema_decay": 0.0,  # the trained weights themselves
        "sample_prompts": [PROMPT], "sample_steps": 4, "seed": 7, "trigger_word": "lgdemo"})
    cache = ModelCache()
    samples = []
    result = train(config, demo_spec, data, root / "out", cache=cache,
                   on_event=lambda event: samples.extend(event.paths) if event.kind == "samples" else None)
    return result, cache, samples[-1]  # the last sample: the trained model in memory, before any file round trip


def test_overfit_lowers_the_loss(overfit):
    result, _, _ = overfit
    assert result.steps == 80 and not result.stopped
    first, last = statistics.mean(result.losses[:10]), statistics.mean(result.losses[-10:])
    assert last < 0.75 * first, (first, last)


def test_saves_every_n_epochs_and_at_the_end(overfit):
    result, _, _ = overfit
    assert [p.name for p in result.saved] == ["fit-000020.safetensors", "fit.safetensors", "sample-grid.png"]
    with Image.open(result.saved[-1]) as grid:  # epochs 0, 20 and 40 down, the one prompt across
        assert "epochs 0, 20, 40 (rows" in grid.text["grid"] and PROMPT in grid.text["grid"]
        assert grid.height > 3 * 64 and grid.width > 64


def test_strength_zero_equals_base_and_one_changes_the_image(overfit, demo_spec, one_thread):
    result, cache, _ = overfit
    request = GenerateRequest(PROMPT, seed=3, steps=4)
    base = np.asarray(generate(cache, demo_spec, request), dtype=np.int16)
    zero = generate(cache, demo_spec, GenerateRequest(PROMPT, seed=3, steps=4, lora=result.lora_path,
                                                      strength_model=0.0, strength_clip=0.0))
    full = generate(cache, demo_spec, GenerateRequest(PROMPT, seed=3, steps=4, lora=result.lora_path))
    assert np.array_equal(np.asarray(zero, dtype=np.int16), base)
    assert np.abs(np.asarray(full, dtype=np.int16) - base).mean() > 2.0
    assert cache.loads == 1  # training and every generation shared one base model


def test_exported_file_reproduces_the_in_memory_model(overfit, demo_spec):
    from PIL import Image

    result, _, in_memory = overfit
    reloaded = generate(ModelCache(), demo_spec, GenerateRequest(PROMPT, seed=7, steps=4, lora=result.lora_path))
    with Image.open(in_memory) as sample:
        difference = np.abs(np.asarray(sample, dtype=np.int16) - np.asarray(reloaded, dtype=np.int16))
    assert difference.max() <= 6 and difference.mean() < 1  # fp16 weights in the file


def test_each_saved_lora_has_an_a1111_card_its_own_sample_and_a_comfyui_workflow(overfit):
    import json

    from lora_gradio.comfyui import api_from_ui

    result, _, last_sample = overfit
    for lora, epoch in ((result.saved[0], 20), (result.lora_path, 40)):
        card = json.loads(lora.with_name(lora.stem + ".json").read_text(encoding="utf-8"))
        assert card["activation text"] == "lgdemo" and card["sd version"] == "SD1"
        assert card["preferred weight"] == 1.0 and card["description"].startswith("fit: an SD1.5 LoRA")
        assert f"epoch {epoch}, {epoch * 2} steps" in card["notes"] and "rank 32, alpha 32" in card["notes"]
        graph = api_from_ui(json.loads(lora.with_name(lora.stem + ".workflow.json").read_text(encoding="utf-8")))
        assert graph["2"]["inputs"]["lora_name"] == lora.name and graph["3"]["inputs"]["text"] == PROMPT
        assert graph["1"]["inputs"]["ckpt_name"] == "demo" and graph["6"]["inputs"]["seed"] == 7
        preview = lora.with_name(lora.stem + ".preview.png").read_bytes()
        assert preview == (lora.parent / "samples" / f"epoch{epoch:04d}-0.png").read_bytes()
    assert result.lora_path.with_name("fit.preview.png").read_bytes() == Path(last_sample).read_bytes()


def test_file_follows_kohya_conventions(overfit):
    result, _, _ = overfit
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
        alpha = handle.get_tensor("lora_unet_mid_block_attentions_0_proj_in.alpha")
        down = handle.get_tensor("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight")
    assert alpha.item() == 32 and down.dtype == torch.float16 and down.shape[0] == 32
    assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight" in keys
    assert {k.rsplit(".", 2 if k.endswith("weight") else 1)[1] for k in keys} == {"lora_down", "lora_up", "alpha"}
    for field in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                  "ss_output_name", "ss_sd_model_name", "ss_training_started_at", "ss_training_finished_at",
                  "ss_num_train_images", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_unet_lr",
                  "ss_text_encoder_lr", "ss_optimizer", "ss_resolution", "ss_tag_frequency", "sshs_model_hash",
                  "sshs_legacy_hash"):
        assert isinstance(metadata[field], str) and metadata[field] != "", field
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_network_dim"] == "32" and metadata["ss_network_alpha"] == "32.0"
    assert metadata["ss_steps"] == "80" and metadata["ss_epoch"] == "40" and metadata["ss_num_train_images"] == "4"
    assert metadata["ss_max_train_steps"] == "80" and int(metadata["ss_session_id"]) >= 0
    assert json.loads(metadata["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 4}}
    buckets = json.loads(metadata["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 4 and all(len(b["resolution"]) == 2 for b in buckets.values())
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "fit" and metadata["modelspec.trigger_phrase"] == "lgdemo"
    assert metadata["modelspec.resolution"] == "64x64" and metadata["modelspec.date"].startswith("20")


def test_stop_is_honoured_within_a_step_and_saves(demo_spec, demo_data, quick_config, tmp_path):
    stop = threading.Event()
    config = apply_overrides(quick_config, {"epochs": 5, "batch_size": 1})

    def on_event(event):
        if event.kind == "step" and event.step == 3:
            stop.set()

    result = train(config, demo_spec, demo_data, tmp_path, on_event=on_event, stop=stop)
    assert result.stopped and result.steps == 3
    with safe_open(str(result.lora_path), "pt") as handle:
        assert handle.metadata()["ss_steps"] == "3"


def test_same_seed_same_run_and_every_option_trains(demo_spec, demo_data, quick_config, tmp_path, one_thread):
    config = apply_overrides(quick_config, {
        "mixed_precision": "bf16", "gradient_checkpointing": True, "noise_offset": 0.1, "min_snr_gamma": 5,
        "shuffle_caption": True, "keep_tokens": 1, "caption_dropout": 0.2, "flip_augment": True,
        "optimizer": "adafactor", "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 1,
        "gradient_accumulation_steps": 2, "batch_size": 2, "epochs": 2, "save_dtype": "bf16"})
    first = train(config, demo_spec, demo_data, tmp_path / "a")
    second = train(config, demo_spec, demo_data, tmp_path / "b")
    assert first.steps == 4 and all(np.isfinite(first.losses))
    assert first.losses == second.losses


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor", "prodigy"])
def test_each_optimizer_takes_a_step(name):
    from lora_gradio.training.config import TrainConfig

    param = torch.nn.Parameter(torch.ones(64, 64))
    optimizer = make_optimizer(TrainConfig(optimizer=name), [{"params": [param], "lr": 0.5 if name == "prodigy"
                                                              else 1e-2}])
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert not torch.equal(param.detach(), torch.ones(64, 64))


def test_nan_loss_stops_and_keeps_earlier_saves(demo_spec, demo_data, quick_config, tmp_path, monkeypatch):
    config = apply_overrides(quick_config, {"epochs": 3, "batch_size": 4})
    real_mse = torch.nn.functional.mse_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_mse(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(torch.nn.functional, "mse_loss", poisoned)
    with pytest.raises(UserError, match=r"diverged.*Lower the learning rate"):
        train(config, demo_spec, demo_data, tmp_path / "out")
    # the last good epoch stays, and the run can resume from it with a lower learning rate
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "lora-000001.json", "lora-000001.safetensors", "lora-000001.workflow.json", "progress.json",
        "resume-state.pt"]


def test_max_train_steps_overrides_the_epochs(demo_spec, demo_data, quick_config, tmp_path):
    from lora_gradio.estimate import estimate
    from lora_gradio.training.data import TrainData

    config = apply_overrides(quick_config, {"epochs": 50, "batch_size": 2, "max_train_steps": 6})
    assert estimate(config, TrainData(demo_data), demo=True).steps == 6  # 8 images in batches of 2: 4 steps an epoch
    totals = set()
    result = train(config, demo_spec, demo_data, tmp_path, on_event=lambda e: totals.add(
        (e.total_steps, e.total_epochs)) if e.kind == "step" else None)
    assert result.steps == 6 and result.epochs == 2 and totals == {(6, 2)}
    assert [p.name for p in result.saved] == ["lora-000001.safetensors", "lora.safetensors"]
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_steps"], metadata["ss_max_train_steps"], metadata["ss_num_epochs"]) == ("6", "6", "2")


def update_norms(path):
    """Each LoRA layer's update norm, |up · down| · alpha / rank, read from a kohya file, and its metadata."""
    norms = []
    with safe_open(str(path), "pt") as handle:
        for key in (k for k in handle.keys() if k.endswith(".lora_down.weight")):  # noqa: SIM118
            module = key.removesuffix(".lora_down.weight")
            down, up = handle.get_tensor(key), handle.get_tensor(f"{module}.lora_up.weight")
            scale = handle.get_tensor(f"{module}.alpha").item() / down.shape[0]
            norms.append(((up.flatten(1) @ down.flatten(1)).norm() * scale).item())
        return norms, handle.metadata()


def test_scale_weight_norms_caps_every_layer_in_the_saved_file(demo_spec, demo_data, quick_config, tmp_path):
    config = apply_overrides(quick_config, {"epochs": 2, "unet_lr": 5e-2, "text_encoder_lr": 5e-2,
                                            "scale_weight_norms": 0.05, "save_dtype": "fp32"})
    norms, metadata = update_norms(train(config, demo_spec, demo_data, tmp_path / "capped").lora_path)
    assert metadata["ss_scale_weight_norms"] == "0.05" and 0.04 < max(norms) <= 0.05 * 1.001
    free = train(apply_overrides(config, {"scale_weight_norms": 0}), demo_spec, demo_data, tmp_path / "free")
    norms, metadata = update_norms(free.lora_path)
    assert metadata["ss_scale_weight_norms"] == "None" and max(norms) > 0.1  # the same run grows past the cap


def test_samples_every_n_steps_appear_at_those_steps(demo_spec, demo_data, quick_config, tmp_path):
    from lora_gradio.training.run_folder import RunFolder

    config = apply_overrides(quick_config, {"epochs": 2, "batch_size": 2, "sample_every_n_steps": 2,
                                            "sample_prompts": [PROMPT], "sample_steps": 2, "save_every_n_epochs": 0})
    events = []
    result = train(config, demo_spec, demo_data, tmp_path, on_event=events.append)
    per_epoch = result.steps // 2
    expected = [step for step in range(2, result.steps, 2)]  # the last step's samples are the final ones
    assert len(expected) >= 2
    shown = [(event.step, event.epoch, Path(event.paths[0]).name) for event in events if event.kind == "samples"]
    assert shown[0] == (0, 0, "epoch0000-0.png")
    assert shown[1:-1] == [(step, (step - 1) // per_epoch + 1, f"step{step:08d}-0.png") for step in expected]
    assert shown[-1] == (result.steps, 2, "epoch0002-0.png")
    assert sorted(RunFolder(tmp_path).step_samples()) == expected


def test_clip_skip_2_trains_on_the_second_to_last_layer(demo_spec, demo_data, quick_config, tmp_path):
    """The same run with CLIP skip 2 conditions the UNet on other embeddings, so it learns otherwise."""
    config = apply_overrides(quick_config, {"epochs": 1, "train_text_encoder": False})
    first = train(config, demo_spec, demo_data, tmp_path / "one")
    skipped = train(apply_overrides(config, {"clip_skip": 2}), demo_spec, demo_data, tmp_path / "two")
    assert first.losses != skipped.losses
    with safe_open(str(skipped.lora_path), "pt") as handle:
        assert handle.metadata()["ss_clip_skip"] == "2"


def test_clip_skip_2_changes_the_test_tab_image_and_is_in_its_parameters(demo_spec):
    cache = ModelCache()
    one = generate(cache, demo_spec, GenerateRequest(PROMPT, steps=2))
    two = generate(cache, demo_spec, GenerateRequest(PROMPT, steps=2, clip_skip=2))
    assert np.abs(np.asarray(one, float) - np.asarray(two, float)).mean() > 1
    assert "Clip skip" not in one.info["parameters"] and ", Clip skip: 2" in two.info["parameters"]


def test_regularisation_images_balance_against_the_training_images(tmp_path):
    from lora_gradio.dataset import TrainImage
    from lora_gradio.training.data import prior_images

    def counts(regular, total):
        return [(image.path.name, image.repeats) for image in prior_images(regular, total)]

    three = [TrainImage(Path(f"r{i}.png"), "a photo of a woman") for i in range(3)]
    assert counts(three, 7) == [("r0.png", 3), ("r1.png", 2), ("r2.png", 2)]  # too few: each shown more often
    assert counts(three, 2) == [("r0.png", 1), ("r1.png", 1)]  # too many: as many as the epoch needs
    assert counts([TrainImage(Path("x.png"), "", repeats=5)], 3) == [("x.png", 5)]  # a folder's repeats hold
    assert all(image.prior for image in prior_images(three, 4))


def test_the_prior_loss_term_is_applied_and_weighted(demo_spec, demo_data, quick_config, tmp_path):
    """With the same seed the first step sees the same images, noise and timesteps whatever the weight, so its loss is
    (training part + weight × regularisation part) / n: linear in the weight, and changed by it."""
    from lora_gradio.demo.shapes import make_demo_dataset
    from lora_gradio.estimate import estimate
    from lora_gradio.training.data import TrainData

    regular = make_demo_dataset(tmp_path / "class", trigger_word="", count=8)
    data = TrainData(demo_data, regularization=regular)
    config = apply_overrides(quick_config, {"batch_size": 16, "epochs": 1})
    first = {}
    for weight in (0.0, 1.0, 3.0):
        run = train(apply_overrides(config, {"prior_loss_weight": weight, "max_train_steps": 1}), demo_spec, data,
                    tmp_path / f"w{weight}")
        first[weight] = run.losses[0]
    assert first[1.0] != pytest.approx(first[0.0], rel=1e-3)  # the regularisation images count ...
    assert first[3.0] - first[1.0] == pytest.approx(2 * (first[1.0] - first[0.0]), rel=1e-4)  # ... by their weight

    config = apply_overrides(config, {"batch_size": 2})
    alone, both = estimate(config, TrainData(demo_data), demo=True), estimate(config, data, demo=True)
    assert (alone.steps, both.steps, both.images, both.prior) == (4, 8, 8, 8)  # an epoch shows 8 of each
    result = train(config, demo_spec, data, tmp_path / "full")
    assert result.steps == 8
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_num_reg_images"] == "8" and metadata["ss_num_train_images"] == "8"
    assert json.loads(metadata["ss_reg_dataset_dirs"]) == {"class": {"n_repeats": 1, "img_count": 8}}
    assert metadata["ss_prior_loss_weight"] == "1.0"


def test_regularisation_images_must_be_another_dataset(demo_data):
    from lora_gradio.training.data import TrainData

    with pytest.raises(UserError, match="must be another dataset"):
        TrainData(demo_data, regularization=demo_data)
    with pytest.raises(UserError, match="repeats = 0: use a whole number from 1 to 1000"):
        TrainData(demo_data, repeats=0)


def test_latents_kept_on_disk_are_reused_and_a_changed_image_is_encoded_again(demo_spec, demo_data, quick_config,
                                                                              tmp_path):
    config = apply_overrides(quick_config, {"cache_latents_to_disk": True, "max_train_steps": 1})

    def latents_line(run, settings=config):
        events = []
        train(settings, demo_spec, demo_data, tmp_path / run, on_event=events.append)
        return next(e.message for e in events if e.message.startswith("Latents:"))

    assert latents_line("first") == "Latents: 0 read from the disk cache, 8 encoded and stored"
    assert latents_line("second") == "Latents: 8 read from the disk cache, 0 encoded and stored"
    Image.new("RGB", (96, 96), (5, 5, 5)).save(sorted(demo_data.glob("*.png"))[0])
    assert latents_line("changed") == "Latents: 7 read from the disk cache, 1 encoded and stored"
    bigger = apply_overrides(config, {"resolution": 128})
    assert latents_line("bigger", bigger) == "Latents: 0 read from the disk cache, 8 encoded and stored"
    assert not (tmp_path / "first" / ".latent-cache").exists()  # it lives with the images, for every run


def test_another_vae_never_reads_the_latent_cache(demo_pipe, demo_data, tmp_path):
    import copy

    from lora_gradio.dataset import scan_training_folder
    from lora_gradio.training.data import LatentStore, cache_latents

    images = scan_training_folder(demo_data).images
    other = copy.deepcopy(demo_pipe.vae)
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.01)

    def run(vae):
        store = LatentStore(tmp_path, vae, torch.float32)
        cached = cache_latents(vae, images, 64, True, True, torch.device("cpu"), torch.float32, store)
        return store, cached

    first, encoded = run(demo_pipe.vae)
    entries = sorted(tmp_path.glob("*.safetensors"))
    again, read = run(demo_pipe.vae)
    assert (first.written, again.read, again.written) == (8, 8, 0)
    assert all(torch.equal(a, b) for x, y in zip(encoded, read, strict=True)
               for a, b in zip(x.latent_params, y.latent_params, strict=True))
    changed, _ = run(other)
    assert (changed.read, changed.written) == (0, 8)
    entries[0].write_bytes(b"damaged")
    mended, _ = run(demo_pipe.vae)
    assert (mended.read, mended.written) == (7, 1)


def test_a_run_saved_on_another_kind_of_device_resumes_with_a_warning(demo_spec, demo_data, quick_config, tmp_path):
    """A CUDA generator's state (16 bytes) cannot seed a CPU generator: the run goes on and says why it differs."""
    from lora_gradio.training.run_folder import RunFolder

    stop = threading.Event()
    config = apply_overrides(quick_config, {"epochs": 2, "batch_size": 2})
    train(config, demo_spec, demo_data, tmp_path, stop=stop,
          on_event=lambda event: stop.set() if event.kind == "step" and event.step == 2 else None)
    folder = RunFolder(tmp_path)
    state = folder.load_state()
    folder.save_state({**state, "generator": torch.zeros(16, dtype=torch.uint8)})
    events = []
    result = train(config, demo_spec, demo_data, tmp_path, resume=True, on_event=events.append)
    assert result.steps == 8 and not result.stopped
    assert any("saved on another kind of device" in e.message for e in events if e.kind == "warning")
