"""The hand-off to ComfyUI: its two workflow formats (the graph a user drops onto the ComfyUI page, and the prompt
its API queues, both from one node list), installing a LoRA into its models folder, and queueing a prompt.

Facts of the formats (ComfyUI's documented node inputs and outputs; the frontend's workflow JSON, version 0.4):
- API format (``POST /prompt``, PNG text ``prompt``): ``{node id: {"class_type", "inputs": {name: value, or
  [source node id, output slot] for a link}}}``.
- UI format (``Load``, drag and drop, PNG text ``workflow``): nodes with a position, typed ``inputs`` (each with its
  link id) and ``outputs`` (each with its link ids), and ``widgets_values`` in the node's widget order; ``links`` is a
  list of ``[link id, source node, source slot, target node, target slot, type]``.
- In ``widgets_values`` the frontend stores a "control after generate" value right after KSampler's seed.
"""

from __future__ import annotations

import filecmp
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import copy_atomic, disk_name, write_text_atomic
from .errors import UserError
from .request import SAMPLERS, GenerateRequest

if TYPE_CHECKING:
    from .models import BaseModelSpec


@dataclass(frozen=True)
class NodeType:
    """A ComfyUI node class: its linked inputs, its widgets in the frontend's order, and its outputs."""

    inputs: tuple[tuple[str, str], ...]
    widgets: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]


NODE_TYPES = {
    "CheckpointLoaderSimple": NodeType((), ("ckpt_name",), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))),
    "LoraLoader": NodeType((("model", "MODEL"), ("clip", "CLIP")), ("lora_name", "strength_model", "strength_clip"),
                           (("MODEL", "MODEL"), ("CLIP", "CLIP"))),
    "CLIPSetLastLayer": NodeType((("clip", "CLIP"),), ("stop_at_clip_layer",), (("CLIP", "CLIP"),)),
    "CLIPTextEncode": NodeType((("clip", "CLIP"),), ("text",), (("CONDITIONING", "CONDITIONING"),)),
    "EmptyLatentImage": NodeType((), ("width", "height", "batch_size"), (("LATENT", "LATENT"),)),
    "KSampler": NodeType((("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")),
                         ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"), (("LATENT", "LATENT"),)),
    "VAEDecode": NodeType((("samples", "LATENT"), ("vae", "VAE")), (), (("IMAGE", "IMAGE"),)),
    "SaveImage": NodeType((("images", "IMAGE"),), ("filename_prefix",), ()),
}
SEED_CONTROL = {"KSampler": "seed"}  # the widget the frontend follows with "control after generate"
NODE_WIDTH, NODE_HEIGHT, COLUMN, ROW = 320, 140, 400, 200


@dataclass
class Node:
    """One node of the graph: its values by widget name, and its linked inputs as (source node id, output slot)."""

    id: int
    type: str
    values: dict[str, Any]
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    column: int = 0
    row: int = 0
    title: str | None = None


def build_graph(request: GenerateRequest, checkpoint: str, width: int, height: int,
                filename_prefix: str = "lora-gradio") -> list[Node]:
    """Load Checkpoint → (CLIP Set Last Layer) → Load LoRA → two CLIP Text Encodes → Empty Latent → KSampler →
    VAE Decode → Save Image, left to right, for one image; checkpoint and LoRA go by the file names ComfyUI lists
    them under. Without a LoRA the checkpoint feeds the rest directly; CLIP skip 2 adds the layer node."""
    sampler = SAMPLERS[request.scheduler]
    nodes = [Node(1, "CheckpointLoaderSimple", {"ckpt_name": checkpoint}, title="Load Checkpoint (base)")]
    model, clip = (1, 0), (1, 1)
    if request.clip_skip > 1:
        nodes.append(Node(9, "CLIPSetLastLayer", {"stop_at_clip_layer": -request.clip_skip}, {"clip": clip},
                          row=1, title="CLIP skip"))
        clip = (9, 0)
    if request.lora is not None:
        nodes.append(Node(2, "LoraLoader", {"lora_name": Path(request.lora).name,
                                            "strength_model": request.strength_model,
                                            "strength_clip": request.strength_clip},
                          {"model": model, "clip": clip}, column=1, title="Load LoRA (lora-gradio)"))
        model, clip = (2, 0), (2, 1)
    nodes += [
        Node(3, "CLIPTextEncode", {"text": request.prompt}, {"clip": clip}, column=2, title="Positive prompt"),
        Node(4, "CLIPTextEncode", {"text": request.negative_prompt}, {"clip": clip}, column=2, row=1,
             title="Negative prompt"),
        Node(5, "EmptyLatentImage", {"width": width, "height": height, "batch_size": 1},
             column=2, row=2),
        Node(6, "KSampler", {"seed": request.seed, "steps": request.steps, "cfg": request.cfg,
                             "sampler_name": sampler.comfyui_sampler,
                             "scheduler": sampler.comfyui_scheduler, "denoise": 1.0},
             {"model": model, "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)}, column=3),
        Node(7, "VAEDecode", {}, {"samples": (6, 0), "vae": (1, 2)}, column=4),
        Node(8, "SaveImage", {"filename_prefix": filename_prefix}, {"images": (7, 0)}, column=5),
    ]
    return nodes


def api_prompt(nodes: list[Node]) -> dict[str, Any]:
    """The API format of a graph: what ``POST /prompt`` takes, and the PNG ``prompt`` text."""
    return {str(node.id): {"class_type": node.type,
                           "inputs": {**node.values, **{name: [str(src), slot] for name, (src, slot)
                                                        in node.links.items()}},
                           "_meta": {"title": node.title or node.type}}
            for node in nodes}


def ui_workflow(nodes: list[Node]) -> dict[str, Any]:
    """The UI format of a graph: what ComfyUI opens from a file or a dropped PNG."""
    links: list[list[Any]] = []
    outgoing: dict[tuple[int, int], list[int]] = {}
    incoming: dict[tuple[int, str], int] = {}
    for node in nodes:
        for name, (source, slot) in node.links.items():
            kind = NODE_TYPES[next(n.type for n in nodes if n.id == source)].outputs[slot][1]
            link_id = len(links) + 1
            target_slot = [n for n, _ in NODE_TYPES[node.type].inputs].index(name)
            links.append([link_id, source, slot, node.id, target_slot, kind])
            outgoing.setdefault((source, slot), []).append(link_id)
            incoming[(node.id, name)] = link_id
    rendered = []
    for order, node in enumerate(nodes):
        kind = NODE_TYPES[node.type]
        widgets: list[Any] = []
        for name in kind.widgets:
            widgets.append(node.values[name])
            if SEED_CONTROL.get(node.type) == name:
                widgets.append("fixed")
        entry = {
            "id": node.id, "type": node.type, "pos": [50 + node.column * COLUMN, 50 + node.row * ROW],
            "size": [NODE_WIDTH, NODE_HEIGHT], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": incoming[(node.id, name)]} for name, typ in kind.inputs],
            "outputs": [{"name": name, "type": typ, "links": outgoing.get((node.id, slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(kind.outputs)],
            "properties": {"Node name for S&R": node.type}, "widgets_values": widgets,
        }
        if node.title:
            entry["title"] = node.title
        rendered.append(entry)
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": rendered, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def write_graph(path: Path, nodes: list[Node], api: bool = False) -> Path:
    """Save a graph as ComfyUI reads it: the UI format (drop onto the page, or Load), or with ``api`` the format
    ``/prompt`` takes."""
    graph = api_prompt(nodes) if api else ui_workflow(nodes)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(path), json.dumps(graph, indent=2, ensure_ascii=False) + "\n")
    return Path(path)


def api_from_ui(workflow: dict[str, Any]) -> dict[str, Any]:
    """Read a UI-format graph back into the API format (what ComfyUI's frontend does before it queues)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        kind = NODE_TYPES[node["type"]]
        values = list(node["widgets_values"])
        if node["type"] in SEED_CONTROL:
            del values[kind.widgets.index(SEED_CONTROL[node["type"]]) + 1]
        inputs: dict[str, Any] = dict(zip(kind.widgets, values, strict=True))
        for slot in node["inputs"]:
            _, source, source_slot, _, _, _ = links[slot["link"]]
            inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


DEFAULT_URL = "http://127.0.0.1:8188"  # where ComfyUI listens unless told otherwise


def models_folder(folder: Path) -> Path:
    """ComfyUI's ``models`` folder, given the install or the models folder itself."""
    folder = Path(folder).expanduser()
    if (folder / "models").is_dir():
        return folder / "models"
    if (folder / "loras").is_dir() or (folder / "checkpoints").is_dir():
        return folder
    raise UserError(f"'{folder}' is not a ComfyUI folder: it has no 'models' folder (nor 'loras' or "
                    "'checkpoints'). Give the ComfyUI install folder, or its 'models' folder.")


def install_lora(lora: Path, models: Path, replace: bool = False) -> str:
    """Copy a LoRA into ComfyUI's ``models/loras``, atomically; the same file there is a no-op, and a different
    file of the same name is replaced only when asked. Returns what happened, in a sentence."""
    loras = Path(models) / "loras"
    target = loras / disk_name(Path(lora).name)
    if target.resolve() == Path(lora).resolve():
        return f"{target.name} is already in ComfyUI's models/loras: this workspace shares ComfyUI's models folder."
    if target.is_file():
        if filecmp.cmp(target, lora, shallow=False):
            return f"{target.name} is already in ComfyUI's models/loras (the same file); nothing to do."
        if not replace:
            raise UserError(f"ComfyUI's models/loras already has a different {target.name}. Replace it (tick "
                            "'Replace a different file' or pass --replace), or rename your LoRA first.")
    loras.mkdir(parents=True, exist_ok=True)
    copy_atomic(lora, target)
    return f"Copied to ComfyUI's models/loras as {target.name}: pick it in the Load LoRA node (refresh the page)."


def checkpoint_note(base: BaseModelSpec, models: Path) -> str | None:
    """When the base model file is not among ComfyUI's checkpoints: say so, and how to link it there."""
    if base.kind != "single_file":
        return None
    if (Path(models) / "checkpoints" / Path(base.location).name).exists():
        return None
    return (f"The base model {base.display_name} is not in ComfyUI's models/checkpoints. Link it there (no copy of "
            "the gigabytes) with 'Link the base model', or copy it yourself.")


def link_checkpoint(base: BaseModelSpec, models: Path) -> str:
    """A symbolic link to the base model file in ComfyUI's ``models/checkpoints``."""
    if base.kind != "single_file":
        raise UserError(f"{base.display_name} is not a single checkpoint file, so ComfyUI cannot load it from "
                        "models/checkpoints. Use a .safetensors checkpoint.")
    link = Path(models) / "checkpoints" / Path(base.location).name
    if link.exists():
        return f"{link.name} is already in ComfyUI's models/checkpoints."
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(base.location).resolve(), link)
    return f"Linked {link.name} into ComfyUI's models/checkpoints."


def queue(url: str, prompt: dict[str, Any], timeout: float = 10) -> str:
    """POST an API-format prompt to a running ComfyUI; its answer, or its error word for word."""
    body = json.dumps({"prompt": prompt, "client_id": "lora-gradio"}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/prompt", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            queued = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        raise UserError(f"ComfyUI refused the workflow (HTTP {exc.code}): {comfy_error(exc.read())}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"ComfyUI does not answer at {url} ({reason}). Start ComfyUI there, or start this app with "
                        "--comfyui-url pointing at it.") from exc
    return f"Queued in ComfyUI at {url}: prompt {queued.get('prompt_id')}, number {queued.get('number')}."


def comfy_error(body: bytes) -> str:
    """ComfyUI's error answer as text: its message and details, then each node's errors."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:2000]
    if not isinstance(answer, dict):
        return str(answer)[:2000]
    error = answer.get("error") or {}
    parts = [": ".join(p for p in (error.get("message"), error.get("details")) if p)] if isinstance(error, dict) \
        else [str(error)]
    for node, found in (answer.get("node_errors") or {}).items():
        for item in found.get("errors", []):
            parts.append(f"node {node} ({found.get('class_type', '?')}): "
                         + ": ".join(p for p in (item.get("message"), item.get("details")) if p))
    return "; ".join(p for p in parts if p) or body.decode(errors="replace")[:2000]
