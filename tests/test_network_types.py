"""LoCon and DoRA: the keys ComfyUI maps on the full SD1.5 architecture, a file round trip, and ComfyUI's strengths."""

import copy
import json
import math
import re

import pytest
import torch

from lora_gradio.lora_attach import KEEP_ATTACHED, attach, detach, set_strengths
from lora_gradio.models import SD15_CONFIG_DIR
from lora_gradio.training import kohya
from lora_gradio.training.config import TrainConfig
from lora_gradio.training.network import add_lora_adapters
from lora_gradio.views import pipeline_view

# written here from kohya's LoCon rule, independently of the trainer: inside ResBlocks and down/upsamplers
LOCON_PATH = re.compile(r"^(down_blocks|mid_block|up_blocks)\..*(resnets\.\d+\.(conv1|conv2|conv_shortcut|"
                        r"time_emb_proj)|(downsamplers|upsamplers)\.0\.conv)$")


def comfyui_names(unet, text_encoder):
    """The LoRA module names ComfyUI maps for SD1.x: 'lora_unet_' + every diffusers UNet weight's path, and
    'lora_te_text_model_' + every CLIP weight's path below text_model."""
    names = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_")
             for key in unet.state_dict() if key.endswith(".weight")}
    names |= {"lora_te_text_model_" + key.removeprefix("text_model.").removesuffix(".weight").replace(".", "_")
              for key in text_encoder.state_dict() if key.endswith(".weight")}
    return names


def full_sd15():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    return unet, text_encoder


@pytest.mark.parametrize("network_type", ["locon", "dora"])
def test_full_sd15_files_hold_only_keys_comfyui_maps(network_type):
    unet, text_encoder = full_sd15()
    mapped = comfyui_names(unet, text_encoder)
    locon = {"lora_unet_" + path.replace(".", "_") for path, _ in unet.named_modules() if LOCON_PATH.match(path)}
    assert len(locon) == 22 * 3 + 14 + 6  # 22 ResBlocks (conv1, conv2, time_emb_proj), 14 shortcuts, 6 resamplers
    config = TrainConfig(rank=8, alpha=4, conv_rank=4, conv_alpha=2, network_type=network_type,
                         train_text_encoder=True)
    add_lora_adapters(unet, text_encoder, config)
    unet.to_empty(device="cpu")  # untouched memory: the keys and shapes are what this test reads
    text_encoder.to_empty(device="cpu")
    tensors = kohya.lora_state_dict({"unet": unet, "text_encoder": text_encoder}, torch.float16)
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert modules <= mapped
    attention = {m for m in modules if "transformer_blocks" in m or m.startswith("lora_te_")}
    assert len(attention) == 16 * 2 * 4 + 12 * 4
    if network_type == "locon":
        assert modules - attention == locon
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert tensors[f"{conv}.lora_down.weight"].shape == (4, 320, 3, 3)
        assert tensors[f"{conv}.lora_up.weight"].shape == (320, 4, 1, 1)
        assert float(tensors[f"{conv}.alpha"]) == 2.0
        assert tensors["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape == (8, 320, 1, 1)
        assert tensors["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"].shape == (4, 1280, 3, 3)
        assert not any(key.endswith("dora_scale") for key in tensors)
    else:
        assert modules == attention
        for module in modules:
            up = tensors[f"{module}.lora_up.weight"]
            assert tensors[f"{module}.dora_scale"].shape == (up.shape[0], 1)  # the output axis, as ComfyUI reads it
        assert len(tensors) == 4 * len(modules)


def randomise(models):
    """Move every LoRA layer away from its start, so the file holds a real change (and DoRA a real magnitude)."""
    from peft.tuners.lora import LoraLayer

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in models:
            for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
                for weights in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    weights.copy_(torch.randn(weights.shape, generator=generator) * 0.3)
                if "default" in layer.lora_magnitude_vector:
                    magnitude = layer.lora_magnitude_vector["default"].weight
                    magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=generator))


def outputs(pipe):
    """The text encoder's and the UNet's outputs for fixed inputs (the UNet fed fixed context, to separate them)."""
    ids = pipe.tokenizer("lgdemo, a red circle", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0], pipe.unet(sample, 10, context).sample


def trained_file(demo_pipe, network_type, path):
    """A LoRA of every network type as training leaves it: in memory on a view, and saved in fp16."""
    trained = pipeline_view(demo_pipe)
    config = TrainConfig(rank=4, alpha=2, conv_rank=2, conv_alpha=4, network_type=network_type,
                         train_text_encoder=True)
    add_lora_adapters(trained.unet, trained.text_encoder, config)
    randomise([trained.unet, trained.text_encoder])
    trained.unet.eval()
    tensors = kohya.lora_state_dict({"unet": trained.unet, "text_encoder": trained.text_encoder}, torch.float16)
    metadata = {"ss_network_args": json.dumps(kohya.network_args(config))}
    return trained, kohya.save_lora(path, tensors, metadata), tensors


@pytest.mark.parametrize("network_type", ["lora", "locon", "dora"])
def test_a_saved_file_reproduces_the_trained_model_and_strength_0_is_the_base(demo_pipe, tmp_path, network_type):
    trained, path, _ = trained_file(demo_pipe, network_type, tmp_path / f"{network_type}.safetensors")
    expected_text, expected_unet = outputs(trained)
    base_text, base_unet = outputs(demo_pipe)
    view = pipeline_view(demo_pipe)
    try:
        fit = attach(view, path, "t")
        assert not fit.not_applied
        assert fit.dora_components == ({"unet", "text_encoder"} if network_type == "dora" else set())
        set_strengths(view, fit, {"unet": 1.0, "text_encoder": 1.0})
        text, unet = outputs(view)
        assert not torch.allclose(unet, base_unet, atol=1e-3)  # the LoRA does something ...
        torch.testing.assert_close(text, expected_text, atol=2e-2, rtol=2e-2)  # ... what it did in memory, in fp16
        torch.testing.assert_close(unet, expected_unet, atol=2e-2, rtol=2e-2)
        set_strengths(view, fit, {"unet": 0.0, "text_encoder": 0.0})
        text, unet = outputs(view)
        torch.testing.assert_close(text, base_text, atol=1e-6, rtol=0)
        torch.testing.assert_close(unet, base_unet, atol=1e-6, rtol=0)
    finally:
        detach(view)


def test_files_kept_attached_render_as_if_each_were_alone(demo_pipe, tmp_path):
    """The Test tab keeps the last few files attached and switches between them: each renders exactly as on a view
    that holds it alone, whatever was active before (DoRA or not, with a text-encoder part or not), no LoRA is the
    clean base, and the oldest file is let go once more are used."""
    from safetensors.torch import save_file

    paths = {kind: trained_file(demo_pipe, kind, tmp_path / f"{kind}.safetensors")[1] for kind in ("dora", "locon")}
    _, paths["lora"], tensors = trained_file(demo_pipe, "lora", tmp_path / "lora.safetensors")
    paths["unet-only"] = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, paths["unet-only"])
    paths["doubled"] = tmp_path / "doubled.safetensors"
    save_file({k: v * 2 if "lora_up" in k else v for k, v in tensors.items()}, paths["doubled"])
    strengths = {"unet": 0.5, "text_encoder": 0.7}
    alone = {}
    for kind, path in paths.items():
        view = pipeline_view(demo_pipe)
        set_strengths(view, attach(view, path, "t"), strengths)
        alone[kind] = outputs(view)
    base = outputs(demo_pipe)
    view = pipeline_view(demo_pipe)
    try:
        for kind in ("dora", "locon", "unet-only", "dora", None, "lora", "doubled", "locon", "unet-only", "dora"):
            fit = attach(view, paths.get(kind), "t")
            if fit is not None:
                set_strengths(view, fit, strengths)
            for got, expected in zip(outputs(view), alone[kind] if kind else base, strict=True):
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, kind=kind: f"{kind}: {m}")
        assert len(view.unet.peft_config) == KEEP_ATTACHED  # five files used: the one used longest ago was let go
    finally:
        detach(view)


def comfyui_merge(model, tensors, strength, prefix):
    """Merge a kohya file into a copy of ``model`` as ComfyUI's LoRA and DoRA weight patch does, written here
    from its formula: W + s·(W·dora_scale/‖W‖ scaled over the output rows, after adding up·down·alpha/rank)."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for path, module in merged.named_modules():
            name = prefix + path.removeprefix("text_model.").replace(".", "_")
            if f"{name}.lora_down.weight" not in tensors:
                continue
            down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
            alpha = float(tensors[f"{name}.alpha"]) / down.shape[0]
            weight = module.weight
            diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha
            calc = weight + diff
            if f"{name}.dora_scale" in tensors:
                norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
                scale = tensors[f"{name}.dora_scale"].float()
                calc = calc * (scale / norm.reshape(scale.shape))
            module.weight.copy_(weight + strength * (calc - weight))
    return merged


@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_dora_strengths_mean_what_they_mean_in_comfyui(demo_pipe, tmp_path, strength):
    _, path, tensors = trained_file(demo_pipe, "dora", tmp_path / "dora.safetensors")
    merged = copy.copy(demo_pipe)
    merged.unet = comfyui_merge(demo_pipe.unet, tensors, strength, "lora_unet_")
    merged.text_encoder = comfyui_merge(demo_pipe.text_encoder, tensors, strength, "lora_te_text_model_")
    expected_text, expected_unet = outputs(merged)
    view = pipeline_view(demo_pipe)
    try:
        set_strengths(view, attach(view, path, "t"), {"unet": strength, "text_encoder": strength})
        text, unet = outputs(view)
        torch.testing.assert_close(text, expected_text, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(unet, expected_unet, atol=2e-3, rtol=2e-3)
    finally:
        detach(view)


@pytest.mark.parametrize("network_type", ["locon", "dora"])
def test_a_run_trains_and_saves_each_network_type(demo_spec, demo_data, quick_config, tmp_path, network_type):
    from safetensors import safe_open

    from lora_gradio.training.config import apply_overrides
    from lora_gradio.training.loop import train

    config = apply_overrides(quick_config, {"network_type": network_type, "network_dropout": 0.1, "conv_rank": 2,
                                            "conv_alpha": 1, "epochs": 2})
    result = train(config, demo_spec, demo_data, tmp_path)
    assert all(math.isfinite(loss) for loss in result.losses)
    with safe_open(str(result.lora_path), "pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert metadata["ss_network_dropout"] == "0.1"
    assert json.loads(metadata["ss_network_args"]) == kohya.network_args(config)
    ups = {key: tensor for key, tensor in tensors.items() if key.endswith("lora_up.weight")}
    # the mid block's self-attention sees one position at 64 px: a softmax over one key gives q and k no gradient
    single = ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k")
    assert all(tensor.abs().sum() > 0 for key, tensor in ups.items() if not key.startswith(single))  # every other
    assert len(ups) > len(single) * 10
    if network_type == "locon":
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[:2] == (2, 32)
        assert float(tensors["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == 1.0
    else:
        scales = [key for key in tensors if key.endswith(".dora_scale")]
        assert len(scales) == len(ups)


def test_an_input_axis_dora_scale_is_named_as_not_applied(demo_pipe, tmp_path):
    """LyCORIS's other layout (one scale per input column) cannot be held by peft: the pair applies, the scale is
    named, nothing is silently misread."""
    from safetensors.torch import save_file

    _, _, tensors = trained_file(demo_pipe, "dora", tmp_path / "dora.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    columns = tensors[f"{name}.lora_down.weight"].shape[1]
    tensors[f"{name}.dora_scale"] = torch.ones(1, columns, dtype=torch.float16)
    save_file(tensors, tmp_path / "input-axis.safetensors")
    view = pipeline_view(demo_pipe)
    try:
        fit = attach(view, tmp_path / "input-axis.safetensors", "t")
        assert fit.not_applied == {f"{name} (extra)": f"{name}.dora_scale not applied (only the LoRA pair is)"}
        assert name in fit.applied and fit.applied[name][2].dora_scale is None
    finally:
        detach(view)
