"""Base-model loading: the offline single-file path, diffusers folders, and refusals with clear reasons."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from lora_gradio.cache import ModelCache
from lora_gradio.errors import UserError
from lora_gradio.models import SD15_CONFIG_DIR, load_pipeline, resolve_base


def test_bundled_tokenizer_matches_openai_clip_ids():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    vocab = json.loads((SD15_CONFIG_DIR / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408
    assert vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77


def test_tiny_ldm_single_file_loads_offline_with_identical_weights(tiny_checkpoint, demo_pipe):
    path, config = tiny_checkpoint
    spec = resolve_base(str(path))
    assert spec.kind == "single_file"
    loaded = load_pipeline(spec, config_dir=config)
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(demo_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            assert torch.equal(value, got[key].reshape(value.shape)), f"{name}.{key} differs"


def test_diffusers_folder_loads(tmp_path, demo_pipe):
    demo_pipe.save_pretrained(tmp_path / "model")
    spec = resolve_base(str(tmp_path / "model"))
    assert spec.kind == "diffusers"
    loaded = load_pipeline(spec)
    assert torch.equal(loaded.unet.conv_in.weight, demo_pipe.unet.conv_in.weight)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"model_index.json"):
        resolve_base(str(tmp_path))


def test_missing_base_file_names_the_path():
    with pytest.raises(UserError, match=r"'models/nope\.safetensors' not found"):
        resolve_base("models/nope.safetensors")


def test_repo_id_resolves_to_hub_spec():
    spec = resolve_base("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert spec.kind == "hub" and spec.display_name == "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_checkpoints_refused_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(UserError, match=r"can run code.*--allow-pickle"):
        resolve_base(str(path))
    assert resolve_base(str(path), allow_pickle=True).allow_pickle


def _fake_checkpoint(path, keys):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return resolve_base(str(path))


@pytest.mark.parametrize(("keys", "found"), [
    ({"conditioner.embedders.1.model.ln_final.weight": (4,), "model.diffusion_model.input_blocks.0.0.weight":
      (320, 4, 3, 3)}, "SDXL"),
    ({"cond_stage_model.model.ln_final.weight": (4,), "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)},
     "SD2"),
    ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": (4, 4)}, "a LoRA file"),
    ({"encoder.conv_in.weight": (4, 3, 3, 3), "decoder.conv_out.weight": (3, 4, 3, 3)}, "a VAE"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 9, 3, 3), "cond_stage_model.transformer.x": (1,),
      "first_stage_model.x": (1,)}, "inpainting"),
])
def test_non_sd1_safetensors_are_named_and_refused(tmp_path, keys, found):
    spec = _fake_checkpoint(tmp_path / "model.safetensors", keys)
    with pytest.raises(UserError, match=found) as info:
        load_pipeline(spec)
    assert "SD1.x" in str(info.value)


def test_random_bytes_safetensors_refused(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"\x00garbage")
    with pytest.raises(UserError, match=r"not a readable .safetensors"):
        load_pipeline(resolve_base(str(path)))


def test_cache_loads_once_per_base(demo_spec, tmp_path):
    cache = ModelCache()
    with cache.pipeline(demo_spec, "a test") as first:
        assert cache.status().user == "a test" and cache.loads == 1
    with cache.pipeline(demo_spec, "a test") as again:
        assert again is first and cache.loads == 1
    assert cache.holds == ("pipeline", demo_spec)
    del first, again  # the cache can only free what nobody else holds
    cache.release()
    assert cache.holds is None and cache.status().alive == 0
    with cache.pipeline(demo_spec, "a test"):
        assert cache.loads == 2


class TrainerCallback:
    """Stands for the Python objects training tools pickle beside the weights."""


def test_a_checkpoint_with_nan_weights_is_refused_by_name(tmp_path, demo_pipe, tiny_checkpoint):
    from lora_gradio.ldm_layout import pipeline_to_ldm

    state = pipeline_to_ldm(demo_pipe)
    key = next(k for k in state if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, tmp_path / "diverged.safetensors")
    with pytest.raises(UserError, match=r"'diverged.safetensors' holds NaN or infinite weights in 1 tensors of its "
                                        r"unet \(first: .*\): the file is damaged"):
        load_pipeline(resolve_base(str(tmp_path / "diverged.safetensors")), tiny_checkpoint[1])


def test_an_allowed_pickle_that_diffusers_refuses_says_what_to_do(tmp_path, demo_pipe, tiny_checkpoint):
    from lora_gradio.ldm_layout import pipeline_to_ldm

    torch.save({"state_dict": pipeline_to_ldm(demo_pipe), "callbacks": TrainerCallback()}, tmp_path / "old.ckpt")
    with pytest.raises(UserError, match=r"'old.ckpt' is a pickle checkpoint that diffusers refuses to unpickle.*"
                                        r"Get the .safetensors version"):
        load_pipeline(resolve_base(str(tmp_path / "old.ckpt"), allow_pickle=True), tiny_checkpoint[1])
