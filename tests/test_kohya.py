"""The kohya file format: exact key names on the full SD1.5 architecture, hashes, refusal of foreign LoRAs."""

import hashlib
import json
import re

import pytest
import torch

from lora_gradio.errors import UserError
from lora_gradio.lora_map import fit_lora
from lora_gradio.models import SD15_CONFIG_DIR
from lora_gradio.training import kohya
from lora_gradio.training.config import TrainConfig
from lora_gradio.training.network import add_lora_adapters

UNET_ATTENTION = re.compile(r"^(down_blocks|mid_block|up_blocks)\..*\.transformer_blocks\.\d+\.attn[12]\."
                            r"(to_q|to_k|to_v|to_out\.0)$")
TEXT_ATTENTION = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def expected_kohya_names(unet, text_encoder):
    """The naming rule, written here independently of the exporter."""
    names = set()
    for path, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and UNET_ATTENTION.match(path):
            names.add("lora_unet_" + path.replace(".", "_"))
    for path, module in text_encoder.named_modules():
        match = TEXT_ATTENTION.match(path)
        if isinstance(module, torch.nn.Linear) and match:
            names.add(f"lora_te_text_model_encoder_layers_{match.group(1)}_self_attn_{match.group(2)}")
    return names


def test_full_sd15_key_set_is_exactly_kohyas():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    expected = expected_kohya_names(unet, text_encoder)
    assert len(expected) == 16 * 2 * 4 + 12 * 4  # 16 transformer blocks x 2 attentions x 4, 12 CLIP layers x 4

    add_lora_adapters(unet, text_encoder, TrainConfig(rank=8, alpha=4, train_text_encoder=True))
    exported = {name for name, _ in kohya.lora_layers({"unet": unet, "text_encoder": text_encoder})}
    assert exported == expected
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in exported
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in exported
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in exported


def test_hashes_follow_the_addnet_rule():
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(4, 8), "lora_unet_x.alpha": torch.tensor(4.0)}
    data = kohya.encode_lora_file(tensors, {"ss_network_dim": "4", "note": "not hashed"})
    from safetensors.torch import load, save

    hashed = save(tensors, {"ss_network_dim": "4"})
    header = int.from_bytes(hashed[:8], "little")
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert meta["sshs_model_hash"] == hashlib.sha256(hashed[8 + header:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(hashed[0x100000:0x110000]).hexdigest()[:8]
    assert torch.equal(load(data)["lora_unet_x.lora_down.weight"], tensors["lora_unet_x.lora_down.weight"])


def test_sdxl_lora_is_refused_on_sd15(demo_pipe):
    tensors = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(UserError, match=r"does not fit this SD1.x base model.*SDXL"):
        fit_lora(tensors, {}, demo_pipe, "xl.safetensors")


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous good file")

    def broken_replace(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(UserError, match=r"No space left"):
        kohya.save_lora(target, {"a.alpha": torch.tensor(1.0)}, {})
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
