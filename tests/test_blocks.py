"""Block-wise ranks, alphas and learning rates: kohya's 25 blocks are the original layout's input, middle and output
blocks; a run on the demo model saves each block at the rank asked for, in names ComfyUI maps, and trains each
block at its rate."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lora_gradio.blocks import BLOCKS, block_index
from lora_gradio.ldm_layout import ldm_key
from lora_gradio.lora_map import inspect_lora
from lora_gradio.models import sd15_skeleton
from lora_gradio.training.config import BLOCK_COUNT, apply_overrides
from lora_gradio.training.kohya import network_args
from lora_gradio.training.kohya_config import read_kohya_config
from lora_gradio.training.loop import train
from lora_gradio.training.network import LOCON_CONV, LOCON_LINEAR


def test_the_25_blocks_are_the_original_layouts_blocks():
    unet = sd15_skeleton(False).unet
    seen = set()
    for path, _ in unet.named_modules():
        if not path.endswith(("to_q", "proj_out", *LOCON_LINEAR, *LOCON_CONV)):
            continue
        ldm = ldm_key("unet", f"{path}.weight").removeprefix("model.diffusion_model.").split(".")
        expected = {"input_blocks": int(ldm[1]), "middle_block": BLOCKS.index("MID"),
                    "output_blocks": BLOCKS.index("MID") + 1 + int(ldm[1])}[ldm[0]]
        assert block_index(path) == expected, path
        assert block_index("lora_unet_" + path.replace(".", "_")) == expected  # the kohya name says the same
        seen.add(expected)
    assert seen == set(range(1, BLOCK_COUNT))  # IN00 is conv_in alone, which no LoRA trains
    assert block_index("conv_in") is None and block_index("time_embedding.linear_1") is None


def per_block(tensors, suffix):
    """{block: {value}} of every UNet module's tensor ending in ``suffix``."""
    found = {}
    for key, value in tensors.items():
        if key.startswith("lora_unet_") and key.endswith(suffix):
            found.setdefault(BLOCKS[block_index(key)], set()).add(value)
    return found


def test_a_run_saves_each_block_at_its_rank_and_trains_it_at_its_rate(demo_spec, demo_data, quick_config, tmp_path):
    dims = [0, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 8, 6, 4, 4, 4, 4, 4, 4, 2, 2, 2, 0, 0, 0]
    alphas = [1.0] * 12 + [3.0] + [2.0] * 12
    rates = [1.0] * 12 + [0.5] + [1.0] * 6 + [0.25] * 6
    rates[5] = 0.0  # IN05 is not trained at all
    config = apply_overrides(quick_config, {"network_type": "locon", "rank": 4, "conv_rank": 2, "conv_alpha": 1,
                                            "block_dims": dims, "block_alphas": alphas, "block_lr": rates,
                                            "max_train_steps": 1, "save_dtype": "fp32", "unet_lr": 1e-3,
                                            "weight_decay": 0.0})
    result = train(config, demo_spec, demo_data, tmp_path / "run")
    tensors = load_file(result.lora_path)
    downs = {k.removesuffix(".lora_down.weight"): v for k, v in tensors.items()
             if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}
    convs = {name for name, down in downs.items() if down.dim() == 4 and down.shape[-1] == 3}
    assert convs and {len(downs[name]) for name in convs} == {2}  # LoCon's 3×3 convolutions: the conv rank
    linear = {}
    for name, down in downs.items():
        if name not in convs:
            linear.setdefault(BLOCKS[block_index(name)], set()).add(len(down))
    downsampler_only = {3, 6, 9}  # IN03, IN06, IN09 hold one 3×3 convolution and nothing else
    assert linear == {BLOCKS[i]: {dim} for i, dim in enumerate(dims)
                      if dim and rates[i] and i not in downsampler_only}
    trained = {BLOCKS[block_index(name)] for name in downs}
    assert "IN05" not in trained and "OUT10" in trained  # a rate of 0 leaves a block out; a rank of 0, its
    assert "OUT10" not in linear  # linear layers (kohya keeps LoCon's 3×3 convolutions at the conv rank)
    assert {b: {float(a) for a in v} for b, v in per_block(tensors, ".alpha").items()}["MID"] == {3.0, 1.0}

    # Adam's first step moves every trained up-weight by the learning rate: each block's is its own
    for block in ("IN01", "MID", "OUT05"):
        ups = [tensors[f"{name}.lora_up.weight"] for name in downs if BLOCKS[block_index(name)] == block]
        step = max(float(v.abs().max()) for v in ups)
        assert step == pytest.approx(1e-3 * rates[BLOCKS.index(block)], rel=0.05), block  # Adam's eps: a little under

    report = inspect_lora(result.lora_path)
    assert report.mapped_keys == report.keys  # every key lands on a module of the model, as ComfyUI maps them
    assert "  IN07 (down_blocks.2): rank 2, 8, alpha 1\n" in report.text()
    with safe_open(str(result.lora_path), "pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, dims)) and args["mid_lr_weight"] == "0.5"
    found = read_kohya_config(json.dumps({"network_module": "networks.lora", "network_args": [
        f"{key}={value}" for key, value in network_args(config).items()]}), "back.json")
    assert (found.settings["block_dims"], found.settings["block_alphas"], found.settings["block_lr"]) == (
        dims, alphas, rates)


def test_block_settings_are_checked_and_explained(quick_config):
    from lora_gradio.training.config import SettingsError

    with pytest.raises(SettingsError, match=r"block_dims .* has 24 values; give all 25"):
        apply_overrides(quick_config, {"block_dims": [4] * 24})
    with pytest.raises(SettingsError, match="block_lr"):
        apply_overrides(quick_config, {"block_lr": [float("nan")] * 25})
    assert torch.tensor(apply_overrides(quick_config, {"block_lr": ["0.5"] * 25}).block_lr).sum() == 12.5
