"""What is written beside each saved LoRA so other tools pick it up: the A1111/Forge extra-networks card,
``<name>.json`` (activation text, weight, notes) and ``<name>.preview.png`` (its thumbnail), and the ComfyUI
workflow ``<name>.workflow.json`` that uses it.

Facts of the format: the card's user metadata is a JSON object with the keys ``description``, ``sd version``,
``activation text``, ``preferred weight`` and ``notes``; the thumbnail is the LoRA's file name with ``.preview.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from .config import TrainConfig


def card_paths(lora: Path) -> tuple[Path, Path]:
    """Where the card's JSON and preview of a LoRA file go."""
    stem = Path(lora).with_suffix("")
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".preview.png")


def write_card(lora: Path, config: TrainConfig, base_name: str, steps: int, epoch: int, images: int) -> Path:
    """The card's JSON: the trigger word as activation text, and the training summary as notes."""
    trigger = config.trigger_word
    card = {
        "description": f"{config.output_name}: an SD1.5 LoRA" + (f" for '{trigger}'" if trigger else ""),
        "sd version": "SD1",
        "activation text": trigger,
        "preferred weight": 1.0,
        "notes": (f"Trained with lora-gradio on {base_name}: epoch {epoch}, {steps} steps, "
                  f"{images} images per epoch, rank {config.rank}, alpha {config.alpha:g}, {config.optimizer} at "
                  f"{config.unet_lr:g}, resolution {config.resolution}."),
    }
    path = card_paths(lora)[0]
    write_text_atomic(path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return path


def write_preview(lora: Path, sample: Path) -> Path:
    """A sample image of that LoRA as its card thumbnail."""
    path = card_paths(lora)[1]
    write_bytes_atomic(path, Path(sample).read_bytes())
    return path


def write_workflow(lora: Path, config: TrainConfig, base_name: str, strength: float = 1.0) -> Path:
    """The ComfyUI graph for this LoRA with the run's first sample (prompt or trigger word, seed, size, sampler), the
    LoRA loaded at ``strength`` (model and clip)."""
    from dataclasses import replace

    from ..comfyui import build_graph, write_graph
    from .samples import sample_request

    request = replace(sample_request(config, 0, lora), strength_model=strength, strength_clip=strength)
    stem = Path(lora).with_suffix("")
    return write_graph(stem.with_name(stem.name + ".workflow.json"),
                       build_graph(request, base_name, request.width, request.height))


def recommend_strength(lora: Path, config: TrainConfig, base_name: str, strength: float) -> None:
    """The recommended file's card and workflow at the recommended strength, so A1111 and ComfyUI start there."""
    path = card_paths(lora)[0]
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        card = None
    if isinstance(card, dict):
        card["preferred weight"] = strength
        card["notes"] = f"{card.get('notes', '')} Recommended by lora-gradio at strength {strength:g}.".strip()
        write_text_atomic(path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    write_workflow(lora, config, base_name, strength)
