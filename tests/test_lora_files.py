"""Third-party LoRA files in the Test tab: every layout people share, each module applied or named, bad ones refused."""

import re

import pytest
import torch
from safetensors.torch import save_file

from lora_gradio.cache import ModelCache
from lora_gradio.errors import UserError
from lora_gradio.inference import generate
from lora_gradio.lora_attach import attach, detach, set_strengths
from lora_gradio.lora_map import module_table
from lora_gradio.request import GenerateRequest
from lora_gradio.views import pipeline_view

TEXT = [f"layers_{i}_{part}" for i in (0, 1) for part in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                                                           "self_attn_out_proj", "mlp_fc1", "mlp_fc2")]
UNET = ["down_blocks_0_resnets_0_conv1", "up_blocks_1_resnets_0_conv1", "down_blocks_0_attentions_0_proj_in",
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "mid_block_attentions_0_transformer_blocks_0_attn2_to_k"]


def pairs(pipe, rank=4, seed=0):
    """Random LoRA pairs in kohya's shapes for the text-encoder attention + MLP and UNet conv + attention modules
    above: {kohya name: (component, path, down, up)}."""
    generator = torch.Generator().manual_seed(seed)
    table = module_table(pipe)
    names = [f"lora_te_text_model_encoder_{n}" for n in TEXT] + [f"lora_unet_{n}" for n in UNET]
    found = {}
    for name in names:
        component, path, module = table[name]
        if isinstance(module, torch.nn.Conv2d):
            down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
        found[name] = (component, path, torch.randn(down_shape, generator=generator) * 0.5,
                       torch.randn(up_shape, generator=generator) * 0.5)
    return found


def kohya_file(pipe, path, **extra):
    tensors = {}
    for name, (_, _, down, up) in pairs(pipe).items():
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    save_file({**tensors, **extra}, path)
    return path


def peft_file(pipe, path):
    tensors = {}
    for _, (component, module_path, down, up) in pairs(pipe).items():
        prefix = f"{component}.{module_path}"
        if component == "text_encoder" and not module_path.startswith("text_model."):
            prefix = f"text_encoder.text_model.{module_path}"  # as diffusers writes it
        tensors |= {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}
    save_file(tensors, path)
    return path


def text_features(pipe):
    ids = pipe.tokenizer("lgdemo, a red circle", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def unet_output(pipe):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(sample, 10, context).sample


@pytest.fixture
def view(demo_pipe):
    pipe = pipeline_view(demo_pipe)
    yield pipe
    detach(pipe)


@pytest.mark.parametrize("layout", [kohya_file, peft_file])
def test_a_third_party_lora_applies_every_module_at_comfyui_strengths(view, demo_pipe, tmp_path, layout):
    fit = attach(view, layout(demo_pipe, tmp_path / "civitai.safetensors"), "t")
    assert fit.line() == f"All {len(TEXT) + len(UNET)} LoRA modules applied ({len(UNET)} UNet, {len(TEXT)} text " \
                         "encoder)."
    base_text, base_unet = text_features(demo_pipe), unet_output(demo_pipe)
    set_strengths(view, fit, {"unet": 1.0, "text_encoder": 0.0})
    assert torch.equal(text_features(view), base_text)
    assert not torch.allclose(unet_output(view), base_unet, atol=1e-4)
    set_strengths(view, fit, {"unet": 0.0, "text_encoder": 1.0})
    assert not torch.allclose(text_features(view), base_text, atol=1e-4)
    assert torch.allclose(unet_output(view), base_unet, atol=1e-6)
    assert torch.equal(text_features(demo_pipe), base_text)  # the cached base is never changed


def test_the_layouts_agree_and_alpha_scales_like_kohya(view, demo_pipe, tmp_path):
    """A kohya file with alpha 2 at rank 4 (scale 0.5) equals the peft file (scale 1) at strength 0.5."""
    set_strengths(view, attach(view, kohya_file(demo_pipe, tmp_path / "k.safetensors"), "t"),
                  {"unet": 1.0, "text_encoder": 1.0})
    kohya_text = text_features(view)
    set_strengths(view, attach(view, peft_file(demo_pipe, tmp_path / "p.safetensors"), "t"),
                  {"unet": 0.5, "text_encoder": 0.5})
    assert torch.allclose(text_features(view), kohya_text, atol=1e-5)


def test_the_old_diffusers_layout_loads(view, demo_pipe, tmp_path):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    save_file({f"unet.{name}.processor.to_q_lora.down.weight": torch.randn(4, 32),
               f"unet.{name}.processor.to_q_lora.up.weight": torch.randn(32, 4),
               f"unet.{name}.to_k.lora.down.weight": torch.randn(4, 32),
               f"unet.{name}.to_k.lora.up.weight": torch.randn(32, 4)}, tmp_path / "old.safetensors")
    assert attach(view, tmp_path / "old.safetensors", "t").line() == "All 2 LoRA modules applied (2 UNet, 0 text " \
                                                                     "encoder)."


def test_modules_that_are_not_applied_are_named(view, demo_pipe, tmp_path):
    loha = {"lora_unet_down_blocks_0_resnets_0_conv2.hada_w1_a": torch.randn(32, 4),
            "lora_unet_down_blocks_0_resnets_0_conv2.hada_w1_b": torch.randn(4, 288)}
    fit = attach(view, kohya_file(demo_pipe, tmp_path / "mixed.safetensors", **loha), "t")
    assert fit.line().startswith(f"{len(TEXT) + len(UNET)} of {len(TEXT) + len(UNET) + 1} LoRA modules applied")
    assert "lora_unet_down_blocks_0_resnets_0_conv2: hada_w1_a, hada_w1_b: a kind of weight this app does not " \
           "load" in fit.line()


@pytest.mark.parametrize(("change", "message"), [
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.full((32, 4, 1, 1), float("nan"))},
     r"holds NaN or infinite values in 1 of its \d+ tensors \(first: lora_unet_down_blocks_0_resnets_0_conv1"),
    ({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 1024)},
     r"1 of its 17 modules do not fit \(first: lora_te_text_model_encoder_layers_0_mlp_fc1: its shapes \(4, 1024\)"),
    ({"lora_te_text_model_encoder_layers_22_self_attn_q_proj.lora_down.weight": torch.randn(4, 1024),
      "lora_te_text_model_encoder_layers_22_self_attn_q_proj.lora_up.weight": torch.randn(1024, 4)},
     r"is an SD2 LoRA: it does not fit this SD1.x base model"),
])
def test_broken_or_foreign_loras_are_refused_and_the_view_stays_clean(view, demo_pipe, tmp_path, change, message):
    path = kohya_file(demo_pipe, tmp_path / "bad.safetensors", **change)
    base_text = text_features(demo_pipe)
    with pytest.raises(UserError, match=message):
        attach(view, path, "t")
    assert torch.equal(text_features(view), base_text) and not view.get_list_adapters()


def test_the_test_tab_reports_what_was_applied(demo_spec, demo_pipe, tmp_path):
    image = generate(ModelCache(), demo_spec, GenerateRequest(
        "lgdemo", steps=2, lora=kohya_file(demo_pipe, tmp_path / "civitai.safetensors"), strength_clip=0.0))
    assert image.info["lora"].startswith(f"All {len(TEXT) + len(UNET)} LoRA modules applied")


def full_sd15_file(path, layout, extra=None):
    """A rank-1 LoRA on every attention module of the full SD1.5 (names and shapes from the meta-device model) and
    on its UNet conv and text-encoder MLP layers, in one of the shared layouts."""
    from lora_gradio.lora_map import sd15_table

    tensors = {}
    for name, (component, module_path, module) in sd15_table().items():
        attention = any(part in module_path for part in ("attn1.", "attn2.", "self_attn."))
        if layout == "old diffusers" and (component != "unet" or not attention):
            continue  # that layout only ever held UNet attention
        if not attention and not module_path.endswith(("conv1", "conv2", "fc1", "fc2")):
            continue
        conv = isinstance(module, torch.nn.Conv2d)
        down = torch.zeros((1, module.in_channels, *module.kernel_size) if conv else (1, module.in_features))
        up = torch.zeros((module.out_channels, 1, 1, 1) if conv else (module.out_features, 1))
        if layout == "kohya":
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.ones(())}
        elif layout == "diffusers/peft":
            prefix = f"{component}.{'text_model.' if component == 'text_encoder' else ''}{module_path}"
            tensors |= {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}
        else:
            tensors |= {f"unet.{module_path}.lora.down.weight": down, f"unet.{module_path}.lora.up.weight": up}
    save_file({**tensors, **(extra or {})}, path, metadata={"ss_base_model_version": "sd_v1", "ss_note": "<b>x</b>"})
    return path


@pytest.mark.parametrize("layout", ["kohya", "diffusers/peft", "old diffusers"])
def test_the_inspector_maps_every_key_of_each_layout_onto_sd15(tmp_path, layout):
    from lora_gradio.lora_map import inspect_lora

    report = inspect_lora(full_sd15_file(tmp_path / "full.safetensors", layout))
    assert report.keys > 100 and report.mapped_keys == report.keys
    assert report.family == "SD1.x" and report.layout.startswith(layout)
    text = report.text()
    assert f"Keys that map onto SD1.5: {report.keys} of {report.keys} (100%)" in text and "Not mapped" not in text
    assert "  IN01 (down_blocks.0): rank 1, alpha 1" in text and "  ss_note: <b>x</b>" in text  # metadata as text
    assert text.index("IN01 (down_blocks.0)") < text.index("MID (mid_block)") < text.index("OUT11 (up_blocks.3)")
    if layout != "old diffusers":
        assert "  text encoder: rank 1, alpha 1" in text
    if layout == "kohya":
        assert "with conv layers (LoCon)" in report.layout


def test_the_inspector_names_keys_that_do_not_map(tmp_path):
    from lora_gradio.lora_map import inspect_lora

    foreign = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(1, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 1),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1024),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 1)}
    text = inspect_lora(full_sd15_file(tmp_path / "mixed.safetensors", "kohya", foreign)).text()
    assert "Made for: SDXL" in text
    assert "  lora_unet_input_blocks_1_1_proj_in: no such module in an SD1.x model" in text
    assert "  lora_te_text_model_encoder_layers_0_mlp_fc1: its shapes (1, 1024) and (3072, 1) do not fit" in text


def test_the_inspector_reads_a_demo_lora_against_the_demo_model(demo_spec, demo_data, quick_config, tmp_path):
    import subprocess
    import sys

    from lora_gradio.lora_map import inspect_lora
    from lora_gradio.training.loop import train

    result = train(quick_config, demo_spec, demo_data, tmp_path / "run")
    report = inspect_lora(result.lora_path)
    text = report.text()
    assert f"Keys that map onto the demo model: {report.keys} of {report.keys} (100%)" in text
    assert "Not mapped" not in text and "do not fit" not in text and report.keys > 100
    printed = subprocess.run([sys.executable, "-m", "lora_gradio", "inspect", str(result.lora_path)],
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and "(100%)" in printed.stdout and "do not fit" not in printed.stdout
    assert "torchvision" not in printed.stderr  # no warnings about backends the inspector never uses


@pytest.mark.parametrize(("kind", "message"), [
    ("full", r"is a LoRA for full-size SD1.5, and the base model here is the tiny demo model"),
    ("loha", r"is a LyCORIS LoHa file: this app applies LoRA, LoCon and DoRA files"),
    ("lokr", r"is a LyCORIS LoKr file"),
    ("none", r"holds no LoRA weights: none of its 2 tensors is part of a LoRA pair"),
    ("pickle", r"is a PyTorch pickle file under a .safetensors name. Pickle files are refused"),
    ("cut", r"is not a readable .safetensors LoRA: its header is damaged or the file is cut off"),
])
def test_each_kind_of_unusable_file_is_named_for_what_it_is(view, tmp_path, kind, message):
    path = tmp_path / f"{kind}.safetensors"
    conv = "lora_unet_down_blocks_0_resnets_0_conv2"
    if kind == "full":
        full_sd15_file(path, "kohya")
    elif kind in ("loha", "lokr"):
        save_file({f"{conv}.hada_w1_a" if kind == "loha" else f"{conv}.lokr_w1": torch.randn(4, 4),
                   f"{conv}.alpha": torch.tensor(4.0)}, path)
    elif kind == "none":
        save_file({"model.diffusion_model.out.0.weight": torch.zeros(4), "cond_stage_model.x": torch.zeros(1)}, path)
    elif kind == "pickle":
        torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)
    else:
        save_file({f"{conv}.lora_down.weight": torch.zeros(4, 32)}, tmp_path / "whole.safetensors")
        path.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:20])
    with pytest.raises(UserError, match=message) as refused:
        attach(view, path, "t")
    assert not re.search(r"header too large|meta tensor|Error\(|\(first: no", str(refused.value))  # no library text
