"""ComfyUI workflow JSON checked against the node inputs ComfyUI documents, in both of its formats."""

import json
from pathlib import Path

import pytest

from lora_gradio.comfyui import api_from_ui, api_prompt, build_graph, ui_workflow
from lora_gradio.request import GenerateRequest

REQUEST = GenerateRequest("ohwx, portrait", "blurry", seed=1234, steps=25, cfg=6.5, scheduler="DPM++ 2M Karras",
                          lora=Path("outputs/anna/anna.safetensors"), strength_model=0.8, strength_clip=0.6)
# ComfyUI's documented inputs: linked inputs (name, type), then widget values in the frontend's order, and outputs.
DOCUMENTED = {
    "CheckpointLoaderSimple": ([], ["dreamshaper_8.safetensors"], ["MODEL", "CLIP", "VAE"]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], ["anna.safetensors", 0.8, 0.6], ["MODEL", "CLIP"]),
    "EmptyLatentImage": ([], [512, 768, 1], ["LATENT"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [1234, "fixed", 25, 6.5, "dpmpp_2m", "karras", 1.0], ["LATENT"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE")], ["lora-gradio"], []),
}


def by_type(workflow, kind):
    return [n for n in workflow["nodes"] if n["type"] == kind]


def test_each_node_has_comfyuis_inputs_widget_order_and_outputs():
    workflow = ui_workflow(build_graph(REQUEST, "dreamshaper_8.safetensors", 512, 768))
    for kind, (inputs, widgets, outputs) in DOCUMENTED.items():
        (node,) = by_type(workflow, kind)
        assert [(i["name"], i["type"]) for i in node["inputs"]] == inputs, kind
        assert node["widgets_values"] == widgets, kind
        assert [o["type"] for o in node["outputs"]] == outputs, kind
    texts = sorted(n["widgets_values"][0] for n in by_type(workflow, "CLIPTextEncode"))
    assert texts == ["blurry", "ohwx, portrait"]
    assert by_type(workflow, "LoraLoader")[0]["title"] == "Load LoRA (lora-gradio)"


@pytest.mark.parametrize("lora", ["anna.safetensors", None])
def test_links_nodes_and_ids_agree(lora):
    request = GenerateRequest("a cat", lora=Path(lora) if lora else None)
    workflow = ui_workflow(build_graph(request, "base.safetensors", 512, 512))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(link_ids)) == len(link_ids) and workflow["last_link_id"] == max(link_ids)
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        out, into = nodes[source]["outputs"][source_slot], nodes[target]["inputs"][target_slot]
        assert out["type"] == into["type"] == kind
        assert link_id in out["links"] and into["link"] == link_id
    used_in = sorted(i["link"] for n in nodes.values() for i in n["inputs"])
    used_out = sorted(link for n in nodes.values() for o in n["outputs"] for link in o["links"])
    assert used_in == used_out == sorted(link_ids)
    assert ("LoraLoader" in {n["type"] for n in nodes.values()}) == (lora is not None)
    columns = [n["pos"][0] for n in sorted(nodes.values(), key=lambda n: n["order"])]
    assert columns == sorted(columns)  # left to right in the order the graph runs


def test_the_api_format_is_the_same_graph():
    nodes = build_graph(REQUEST, "dreamshaper_8.safetensors", 512, 768)
    prompt = api_prompt(nodes)
    assert api_from_ui(json.loads(json.dumps(ui_workflow(nodes)))) == prompt
    sampler = prompt["6"]["inputs"]
    assert sampler["model"] == ["2", 0] and sampler["positive"] == ["3", 0] and sampler["seed"] == 1234
    assert prompt["2"]["inputs"] == {"lora_name": "anna.safetensors", "strength_model": 0.8, "strength_clip": 0.6,
                                     "model": ["1", 0], "clip": ["1", 1]}


@pytest.mark.parametrize(("ours", "sampler", "scheduler"), [
    ("Euler", "euler", "normal"), ("Euler a", "euler_ancestral", "normal"),
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("DDIM", "ddim", "ddim_uniform")])
def test_samplers_map_to_comfyuis_names(ours, sampler, scheduler):
    inputs = api_prompt(build_graph(GenerateRequest("p", scheduler=ours), "b", 512, 512))["6"]["inputs"]
    assert (inputs["sampler_name"], inputs["scheduler"]) == (sampler, scheduler)


def test_test_tab_images_and_samples_carry_the_workflow_that_made_them(demo_spec, tmp_path):
    from PIL import Image

    from lora_gradio.cache import ModelCache
    from lora_gradio.inference import generate, save_png
    from lora_gradio.request import GenerateRequest
    from lora_gradio.training.config import TrainConfig
    from lora_gradio.training.run_folder import RunFolder
    from lora_gradio.training.samples import render_samples

    request = GenerateRequest("lgdemo, a red circle", "blurry", seed=5, steps=2, scheduler="Euler a")
    cache = ModelCache()
    path = save_png(generate(cache, demo_spec, request), tmp_path / "test.png")
    with cache.pipeline(demo_spec, "samples") as pipe:
        config = TrainConfig(sample_prompts=["lgdemo"], seed=9, sample_steps=2, resolution=64, clip_skip=2,
                             sample_negative_prompt="blurry", sample_cfg=5, sample_scheduler="DDIM", sample_width=72)
        (sample,) = render_samples(pipe, config, RunFolder(tmp_path / "run"), 3, "base.safetensors",
                                   tmp_path / "run" / "anna-000003.safetensors")
    with Image.open(path) as image:
        workflow, prompt = json.loads(image.text["workflow"]), json.loads(image.text["prompt"])
    assert api_from_ui(workflow) == prompt
    assert prompt["6"]["inputs"]["seed"] == 5 and prompt["6"]["inputs"]["sampler_name"] == "euler_ancestral"
    assert prompt["1"]["inputs"]["ckpt_name"] == "demo" and "2" not in prompt  # no LoRA, no LoRA node
    with Image.open(sample) as image:
        sample_prompt = json.loads(image.text["prompt"])
        assert image.size == (72, 64) and sample.name == "epoch0003-0.png"
        assert "Steps: 2, Sampler: DDIM, CFG scale: 5.0, Seed: 9, Size: 72x64" in image.text["parameters"]
        assert "Negative prompt: blurry" in image.text["parameters"] and "Clip skip: 2" in image.text["parameters"]
    assert sample_prompt["2"]["inputs"]["lora_name"] == "anna-000003.safetensors"
    assert sample_prompt["9"] == {"class_type": "CLIPSetLastLayer", "inputs": {"stop_at_clip_layer": -2,
                                  "clip": ["1", 1]}, "_meta": {"title": "CLIP skip"}}
    assert sample_prompt["2"]["inputs"]["clip"] == ["9", 0] and sample_prompt["4"]["inputs"]["text"] == "blurry"
    assert sample_prompt["6"]["inputs"]["sampler_name"] == "ddim" and sample_prompt["6"]["inputs"]["cfg"] == 5
    assert sample_prompt["1"]["inputs"]["ckpt_name"] == "base.safetensors"
    assert api_from_ui(json.loads(image.text["workflow"])) == sample_prompt
