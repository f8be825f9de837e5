"""LoRA utilities: resize a file to a lower rank, merge several into one, bake one into a base checkpoint, extract
one from a fine-tune and its base. Each writes a file whose metadata says what was done, to what, at which settings.

How many ranks each module keeps, and the SVD behind it, is lora_svd.py's part.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import Stopped, UserError
from .events import Emit, JobEvent, ignore, progress
from .ldm_layout import ldm_key, pipeline_to_ldm
from .lora_map import LoraModule, fit_lora, module_table, read_lora, read_modules
from .lora_svd import ModuleResult, RankRule, ToolReport, check_weights, factor_module, relative_error, split
from .training.kohya import lora_delta, row_norms

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

TOOL_KEY = "lora_gradio_tool"  # metadata: what a tool did, as JSON (ss_training_comment says it in words)
UNCHANGED = 1e-5  # a module whose change is below this share of its weight's norm was not fine-tuned
DTYPES = ("fp16", "bf16", "fp32")
MAX_MERGE = 8  # files in one merge
ToolOutput = tuple[dict[str, "torch.Tensor"], dict[str, str], ToolReport]  # tensors, metadata, report
ToolWork = Callable[[threading.Event, Emit], ToolOutput]
Reader = Callable[[str, tuple[int, ...]], "torch.Tensor"]  # one weight of a file, by key and shape


def pairs(tensors: dict[str, torch.Tensor], name: str) -> dict[str, LoraModule]:
    """The file's modules that hold a LoRA pair; a file with LyCORIS LoHa/LoKr or one-sided modules is refused."""
    modules = read_modules(tensors)
    odd = [key for key, item in modules.items() if item.down is None or item.up is None]
    if odd:
        raise UserError(f"'{name}' has {len(odd)} modules that are not LoRA pairs (first: {odd[0]}): the tools "
                        "work on LoRA, LoCon and DoRA files, not LyCORIS LoHa or LoKr.")
    if not modules:
        raise UserError(f"'{name}' holds no LoRA modules.")
    return modules


def scale_of(item: LoraModule) -> float:
    """alpha / rank, 1 where the file gives no alpha."""
    return item.alpha_or_rank / item.rank


def resize(path: Path, rule: RankRule, emit: Emit = ignore,
           stop: threading.Event | None = None) -> ToolOutput:
    """A LoRA (LoCon and DoRA included) at a lower rank by SVD; each module keeps its alpha/rank ratio, DoRA its
    magnitudes. Returns the tensors, the metadata and the report (its path is set when the file is written)."""
    rule.check()
    tensors, metadata = read_lora(path)
    modules = pairs(tensors, path.name)
    out: dict[str, torch.Tensor] = {}
    report = ToolReport("resize", path)
    for done, (name, item) in enumerate(modules.items()):
        check_stop(stop)
        progress(emit, "Resizing: module {} of {}", done + 1, len(modules))
        ratio = scale_of(item)  # folded into up with its sign; stored again as alpha = |ratio| × the new rank
        conv = item.down.dim() == 4
        up, down = item.up.flatten(1).float() * ratio, item.down.flatten(1).float()
        made, result = factor_module(name, up, down, rule, abs(ratio) or 1.0, tuple(item.down.shape[1:]), conv,
                                     item.rank)
        out |= made
        report.modules.append(result)
        if item.dora_scale is not None:
            out[f"{name}.dora_scale"] = item.dora_scale.float()
    if any(key.endswith(".dora_scale") for key in out):
        report.notes.append("DoRA magnitudes are kept as they were.")
    comment = f"resized from {path.name} to {rule.describe()}"
    meta = tool_metadata(metadata, "resize", comment, report, {"from": path.name, "rule": rule.__dict__})
    return cast(out, tensors), meta, report


def merge(sources: list[tuple[Path, float]], rule: RankRule | None, emit: Emit = ignore,
          stop: threading.Event | None = None) -> ToolOutput:
    """Several LoRAs at weights as one: their ranks side by side (``rule`` None: exact), or by SVD to the rule's rank.
    Applying the result at strength s equals applying each file at s × its weight."""
    import torch

    if len(sources) < 2:
        raise UserError("Merging needs at least two LoRA files.")
    check_weights([weight for _, weight in sources], "merge weight")
    if rule is not None:
        rule.check()
    read = [(path, weight, *read_lora(path)) for path, weight in sources]
    by_name: dict[str, list[tuple[float, LoraModule]]] = {}
    for path, weight, tensors, _ in read:
        modules = pairs(tensors, path.name)
        dora = [key for key, item in modules.items() if item.dora_scale is not None]
        if dora:
            raise UserError(f"'{path.name}' is a DoRA file: its magnitudes do not add up across files, so it cannot "
                            "be merged into a LoRA. Bake it into a checkpoint instead, or merge plain LoRA files.")
        for name, item in modules.items():
            by_name.setdefault(name, []).append((weight, item))
    out: dict[str, torch.Tensor] = {}
    report = ToolReport("merge", sources[0][0])
    for done, (name, items) in enumerate(by_name.items()):
        check_stop(stop)
        progress(emit, "Merging: module {} of {}", done + 1, len(by_name))
        tails = {tuple(item.down.flatten(1).shape[1:]) for _, item in items}
        outs = {item.up.shape[0] for _, item in items}
        if len(tails) > 1 or len(outs) > 1:
            raise UserError(f"The files do not fit each other at {name}: their shapes differ. Merge LoRAs made for "
                            "the same model.")
        first = items[0][1]
        up = torch.cat([item.up.flatten(1).float() * weight * scale_of(item) for weight, item in items], dim=1)
        down = torch.cat([item.down.flatten(1).float() for _, item in items], dim=0)
        conv, tail = first.down.dim() == 4, tuple(first.down.shape[1:])
        if rule is None:
            rank = down.shape[0]
            out |= {f"{name}.lora_down.weight": down.reshape(rank, *tail).contiguous(),
                    f"{name}.lora_up.weight": up[..., None, None].contiguous() if conv else up.contiguous(),
                    f"{name}.alpha": torch.tensor(float(rank))}
            report.modules.append(ModuleResult(name, rank, rank, 0.0))
        else:
            made, result = factor_module(name, up, down, rule, 1.0, tail, conv, down.shape[0])
            out |= made
            report.modules.append(result)
    names = " + ".join(f"{path.name} × {weight:g}" for path, weight in sources)
    how = "ranks side by side" if rule is None else f"SVD to {rule.describe()}"
    comment = f"merged {names} ({how})"
    metadata = shared_metadata([meta for *_, meta in read])
    settings = {"sources": [{"file": path.name, "weight": weight} for path, weight in sources],
                "rule": None if rule is None else rule.__dict__}
    return cast(out, read[0][2]), tool_metadata(metadata, "merge", comment, report, settings), report


def bake(pipe: StableDiffusionPipeline, base_name: str, loras: list[tuple[Path, float, float]], dtype: str,
         emit: Emit = ignore, stop: threading.Event | None = None) -> ToolOutput:
    """The base with each LoRA merged in at (strength_model, strength_clip), as ComfyUI merges them (DoRA too), as an
    original-layout SD1.x checkpoint that ComfyUI, A1111/Forge and this app load as a base model."""
    import torch

    target = torch_dtype(dtype)
    table = module_table(pipe)
    changed: dict[tuple[str, str], torch.Tensor] = {}
    report = ToolReport("bake", loras[0][0] if loras else Path(base_name))
    for path, strength_model, strength_clip in loras:
        check_weights([strength_model, strength_clip], "strength")
        tensors, metadata = read_lora(path)
        fit = fit_lora(tensors, metadata, pipe, path.name)
        strengths = {"unet": strength_model, "text_encoder": strength_clip}
        for done, (name, (component, module_path, item)) in enumerate(fit.applied.items()):
            check_stop(stop)
            progress(emit, f"Baking {path.name}: module {{}} of {{}}", done + 1, len(fit.applied))
            key = (component, f"{module_path}.weight")
            weight = changed.get(key, table[name][2].weight.detach().to("cpu", torch.float32))
            changed[key] = merged_weight(weight, item, strengths[component])
        report.notes.append(f"{path.name}: {fit.line()}")
    emit(JobEvent("status", "Writing the checkpoint"))
    state = {key: value.to("cpu", target) for key, value in pipeline_to_ldm(pipe).items()}
    layers = pipe.unet.config.layers_per_block
    for (component, key), weight in changed.items():
        state[ldm_key(component, key, layers)] = weight.to(target).contiguous()
    baked = [{"file": path.name, "strength_model": sm, "strength_clip": sc} for path, sm, sc in loras]
    words = ", ".join(f"{path.name} at {sm:g}/{sc:g}" for path, sm, sc in loras)
    metadata = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
                "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "modelspec.description": f"{base_name} with {words} (strength_model/strength_clip) baked in",
                TOOL_KEY: json.dumps({"tool": "bake", "base": base_name, "loras": baked, "dtype": dtype})}
    report.notes.insert(0, f"{base_name} with {words} baked in, {dtype}.")
    return state, metadata, report


def merged_weight(weight: torch.Tensor, item: LoraModule, strength: float) -> torch.Tensor:
    """W + s·ΔW, or for DoRA W + s·((W + ΔW)·dora_scale/‖W‖ − W) over the output rows, as ComfyUI applies a file."""
    delta = lora_delta(item.down, item.up, scale_of(item), weight.shape)
    if item.dora_scale is None:
        return weight + strength * delta
    scale = item.dora_scale.float().flatten() / row_norms(weight)
    calc = (weight + delta) * scale.reshape(-1, *[1] * (weight.dim() - 1))
    return weight + strength * (calc - weight)


def extract(pipe: StableDiffusionPipeline, base_name: str, tuned: Path, rule: RankRule, conv_rule: RankRule | None,
            emit: Emit = ignore, stop: threading.Event | None = None) -> ToolOutput:
    """A LoRA from a fine-tuned SD1.x checkpoint and its base: each changed module's ΔW by SVD at the rule's rank
    (3×3 convs, as LoCon, only with ``conv_rule``). Biases and norms have no LoRA form and are left out."""
    import torch

    rule.check()
    if conv_rule is not None:
        conv_rule.check("Conv rank")
    layers = pipe.unet.config.layers_per_block
    out: dict[str, torch.Tensor] = {}
    report = ToolReport("extract", tuned)
    table = module_table(pipe)
    unchanged = convs = 0
    with tuned_weights(tuned, pipe) as read:
        for done, (name, (component, path, layer)) in enumerate(table.items()):
            check_stop(stop)
            progress(emit, "Extracting: module {} of {}", done + 1, len(table))
            key = ldm_key(component, f"{path}.weight", layers)
            base = layer.weight.detach().float()
            delta = read(key, tuple(base.shape)).to(base.device, torch.float32) - base
            if float(delta.norm()) <= UNCHANGED * float(base.norm()):
                unchanged += 1
                continue
            spatial = base.dim() == 4 and base.shape[2:] != (1, 1)
            chosen = conv_rule if spatial else rule
            if chosen is None:
                convs += 1
                continue
            u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
            u, s, vh = u.float().cpu(), s.float().cpu(), vh.float().cpu()
            keep = chosen.keep(s)
            down, up = split(u, s, vh, keep, 1.0, tuple(base.shape[1:]), base.dim() == 4)
            out |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(float(keep))}
            report.modules.append(ModuleResult(name, 0, keep, relative_error(s, keep)))
    if not out:
        raise UserError(f"'{tuned.name}' has the same UNet and text-encoder weights as {base_name}"
                        + (f" except {convs} 3×3 convs: set a conv rank to take them." if convs else
                           ": there is nothing to extract. Pick the fine-tune and the base it was made from."))
    report.notes.append(f"{unchanged} modules were unchanged and are left out.")
    if convs:
        report.notes.append(f"{convs} changed 3×3 convs are left out: set a conv rank to take them (LoCon).")
    rules = rule.describe() + ("" if conv_rule is None else f", 3×3 convs at {conv_rule.describe()}")
    comment = f"extracted from {tuned.name} against {base_name} at {rules}"
    settings = {"tuned": tuned.name, "base": base_name, "rule": rule.__dict__,
                "conv_rule": None if conv_rule is None else conv_rule.__dict__}
    metadata = {"ss_sd_model_name": base_name, "ss_network_train_unet_only": str(
        not any(m.name.startswith("lora_te") for m in report.modules))}
    return cast(out, None), tool_metadata(metadata, "extract", comment, report, settings), report


@contextmanager
def tuned_weights(path: Path, pipe: StableDiffusionPipeline) -> Iterator[Reader]:
    """A reader of the fine-tune's weights one at a time, by LDM key, shaped as the base's (an attention projection
    stored as a 1×1 conv fits a linear layer); the file is checked first and never read whole."""
    from safetensors import safe_open

    from .models import describe_checkpoint, read_safetensors_shapes

    if path.suffix.lower() != ".safetensors":
        raise UserError(f"'{path.name}' is not a .safetensors checkpoint: extraction reads single-file SD1.x "
                        "checkpoints (.safetensors), the form fine-tunes are shared in.")
    shapes = read_safetensors_shapes(path)
    found = describe_checkpoint(shapes, pipe.unet.config.cross_attention_dim)
    if found:
        raise UserError(f"'{path.name}' is {found}: extraction needs an SD1.x fine-tune of the base model.")
    with safe_open(str(path), framework="pt") as handle:
        def read(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            stored = shapes.get(key)
            if stored is None or math.prod(stored) != math.prod(shape):
                raise UserError(f"'{path.name}' is not a fine-tune of this base model: its {key} is "
                                f"{stored or 'missing'}, the base's is {shape}. Pick the base it was made from.")
            return handle.get_tensor(key).reshape(shape)

        yield read


def torch_dtype(name: str) -> torch.dtype:
    """fp16, bf16 or fp32 as a torch dtype (training's own table); anything else is refused by name."""
    from .training.setup import DTYPES as TORCH_DTYPES

    if name not in DTYPES:
        raise UserError(f"Unknown precision '{name}': use fp16, bf16 or fp32.")
    return TORCH_DTYPES[name]


def cast(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The new tensors in the precision of the file they came from (fp16 for an extraction), contiguous."""
    import torch

    dtype = next((t.dtype for t in (like or {}).values() if t.is_floating_point()), torch.float16)
    return {key: value.to(dtype).contiguous() for key, value in tensors.items()}


def shared_metadata(metadatas: list[dict[str, str]]) -> dict[str, str]:
    """The metadata every merged file agrees on that still holds for the merge (the base, the version, CLIP skip)."""
    keys = ("ss_sd_model_name", "ss_base_model_version", "ss_v2", "ss_clip_skip", "modelspec.resolution")
    first = metadatas[0]
    return {key: first[key] for key in keys if key in first and all(m.get(key) == first[key] for m in metadatas)}


def tool_metadata(metadata: dict[str, str], tool: str, comment: str, report: ToolReport,
                  settings: dict) -> dict[str, str]:
    """A file's metadata after a tool: what still holds of its own, the largest rank as ``ss_network_dim`` (alpha at
    the file's alpha/rank ratio), and what the tool did, in words and as JSON."""
    rank = max((m.rank for m in report.modules), default=0)
    kept = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}  # hashes: written anew
    try:
        ratio = float(kept["ss_network_alpha"]) / float(kept["ss_network_dim"]) if tool == "resize" else 1.0
    except (KeyError, ValueError, ZeroDivisionError):
        ratio = 1.0
    before = kept.get("ss_training_comment", "")
    done = {"tool": tool, **settings, "modules": len(report.modules),
            "max_error": round(max((m.error for m in report.modules), default=0.0), 6)}
    return {**kept, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{ratio * rank:g}", "ss_v2": kept.get("ss_v2", "False"),
            "ss_base_model_version": kept.get("ss_base_model_version", "sd_v1"), "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "ss_training_comment": f"{before}; {comment}" if before else comment, TOOL_KEY: json.dumps(done)}


def write(path: Path, output: ToolOutput) -> ToolReport:
    """Write a tool's file atomically (a LoRA with its hashes, or a checkpoint) and return its report."""
    from safetensors.torch import save_file

    from .atomic import atomic_path
    from .training.kohya import save_lora

    tensors, metadata, report = output
    path = Path(path)
    if report.tool == "bake":
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata)
    else:
        save_lora(path, tensors, metadata)
    report.path, report.seconds = path, time.perf_counter() - report.began
    return report


def check_stop(stop: threading.Event | None) -> None:
    """End a tool's work between modules when Stop was pressed: nothing is written."""
    if stop is not None and stop.is_set():
        raise Stopped("Stopped: nothing was written.")

