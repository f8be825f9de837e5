"""Any SD1.x LoRA file, in the layouts people share, as kohya-named modules mapped onto a pipeline's own modules.

Layouts (key names are facts of each format):
- kohya and LyCORIS LoCon: ``lora_unet_{path}.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
- diffusers/peft: ``unet.{path}.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.{path}…``, alpha = rank
  unless an ``.alpha`` tensor is present;
- old diffusers: ``unet.{path}.lora.down.weight``, ``{path}.processor.to_q_lora.down.weight`` (attention
  processors) and ``text_encoder.{path}.lora_linear_layer.down.weight``.
Every module of a file is either applied or named with the reason it was not. Attaching what fits to a pipeline is
lora_attach.py's work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .blocks import BLOCKS, block_index
from .errors import UserError
from .training.kohya import kohya_module_name

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

KOHYA = re.compile(r"^(lora_(?:unet|te\d?)_\w+)\.(lora_down|lora_up)\.weight$")
KOHYA_ALPHA = re.compile(r"^(lora_(?:unet|te\d?)_\w+)\.alpha$")
KOHYA_DORA = re.compile(r"^(lora_(?:unet|te\d?)_\w+)\.dora_scale$")
PEFT = re.compile(r"^(?:base_model\.model\.)?(unet|text_encoder)\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
PEFT_ALPHA = re.compile(r"^(unet|text_encoder)\.(.+)\.alpha$")
OLD = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
OLD_PROCESSOR = re.compile(r"^(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
ROLE = {"lora_down": "down", "lora_A": "down", "down": "down", "lora_up": "up", "lora_B": "up", "up": "up"}
SD2_MARKS = ("_te_text_model_encoder_layers_12_", "_te_text_model_encoder_layers_22_")  # SD1's CLIP has 12 layers


@dataclass
class LoraModule:
    """One LoRA pair by its kohya name; ``alpha`` None means alpha = rank (scale 1)."""

    name: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None  # DoRA's magnitude, on the output axis as ComfyUI reads it
    extra: list[str] = field(default_factory=list)  # keys of this module in no layout we apply
    keys: list[str] = field(default_factory=list)  # every key of the file that belongs to this module
    layout: str = ""  # kohya, diffusers/peft or old diffusers

    @property
    def rank(self) -> int:
        """The LoRA rank: rows of the down matrix."""
        return int(self.down.shape[0])

    @property
    def alpha_or_rank(self) -> float:
        """The alpha the file gives, else the rank (kohya's default: scale 1)."""
        return self.alpha if self.alpha is not None else float(self.rank)


@dataclass
class LoraFit:
    """Which modules of a file go where on this pipeline, and which are not applied, with the reason."""

    applied: dict[str, tuple[str, str, LoraModule]]  # kohya name -> (component, module path, weights)
    not_applied: dict[str, str]
    misfits: list[str] = field(default_factory=list)  # modules that exist here with other shapes, and why

    @property
    def dora_components(self) -> set[str]:
        """The components with DoRA layers: their strength blends outputs (see :func:`set_strengths`)."""
        return {component for component, _, item in self.applied.values() if item.dora_scale is not None}

    def parts(self) -> str:
        """How many applied modules each component has: '16 UNet, 8 text encoder'."""
        components = [component for component, _, _ in self.applied.values()]
        return f"{components.count('unet')} UNet, {components.count('text_encoder')} text encoder"

    def line(self) -> str:
        """'All 24 modules applied (16 UNet, 8 text encoder).' or which were not, and why."""
        parts = self.parts()
        if not self.not_applied:
            return f"All {len(self.applied)} LoRA modules applied ({parts})."
        total = len(self.applied) + len(self.not_applied)
        missed = "; ".join(f"{name}: {why}" for name, why in list(self.not_applied.items())[:5])
        more = f"; and {len(self.not_applied) - 5} more" if len(self.not_applied) > 5 else ""
        return f"{len(self.applied)} of {total} LoRA modules applied ({parts}). Not applied: {missed}{more}."


def read_modules(tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """Group a file's tensors into modules by kohya name, whatever the layout."""
    modules: dict[str, LoraModule] = {}

    def module(name: str, key: str, layout: str = "") -> LoraModule:
        item = modules.setdefault(name, LoraModule(name))
        item.keys.append(key)
        item.layout = layout or item.layout
        return item

    for key, tensor in tensors.items():
        if found := KOHYA.match(key):
            setattr(module(found.group(1), key, "kohya"), ROLE[found.group(2)], tensor)
        elif found := KOHYA_ALPHA.match(key):
            module(found.group(1), key).alpha = float(tensor)
        elif found := KOHYA_DORA.match(key):
            module(found.group(1), key).dora_scale = tensor
        elif found := PEFT.match(key):
            name = kohya_module_name(found.group(1), found.group(2))
            setattr(module(name, key, "diffusers/peft"), ROLE[found.group(3)], tensor)
        elif found := PEFT_ALPHA.match(key):
            module(kohya_module_name(found.group(1), found.group(2)), key).alpha = float(tensor)
        elif found := OLD_PROCESSOR.match(key):
            path = f"{found.group(1)}.{found.group(2)}" + (".0" if found.group(2) == "to_out" else "")
            setattr(module(kohya_module_name("unet", path), key, "old diffusers"), ROLE[found.group(3)], tensor)
        elif found := OLD.match(key):
            name = kohya_module_name(found.group(1) or "unet", found.group(2))
            setattr(module(name, key, "old diffusers"), ROLE[found.group(3)], tensor)
        else:
            module(key.split(".")[0], key).extra.append(key)
    return modules


def architecture(modules: dict[str, LoraModule], metadata: dict[str, str]) -> str:
    """The model family a LoRA was made for, from its metadata and its module names: SD1.x, SD2 or SDXL."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl") or any("input_blocks" in k or "_te1_" in k or "_te2_" in k for k in modules):
        return "SDXL"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2") or any(
            mark in key for key in modules for mark in SD2_MARKS):
        return "SD2"
    return "SD1.x"


def check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Refuse a file with NaN or infinite weights: it renders black images, whatever the strength."""
    import torch

    broken = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise UserError(f"'{name}' holds NaN or infinite values in {len(broken)} of its {len(tensors)} tensors "
                        f"(first: {broken[0]}): it was saved from a training run that diverged, or it is damaged. "
                        "Use an earlier epoch, or download it again.")


def module_table(pipe: StableDiffusionPipeline) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """Every kohya module name this pipeline can take, mapped to (component, module path, module); a layer that
    holds adapters already (another file's) is there by its own path, as the layer it wraps."""
    import torch

    table = {}
    for component in ("unet", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and ".base_layer" not in path \
                    and ".lora_" not in path:
                table[kohya_module_name(component, path)] = (component, path, layer)
    return table


def fitted(item: LoraModule, target: torch.nn.Module) -> LoraModule | str:
    """The pair shaped for ``target`` (a 1×1 conv takes linear weights and back), as a new module; the reason when
    it cannot fit. The file's own module is left as it was read."""
    import torch

    if item.down is None or item.up is None:
        return "only one of its two matrices is in the file"
    down, up = item.down, item.up
    conv = isinstance(target, torch.nn.Conv2d)
    if conv and down.dim() == 2 and target.kernel_size == (1, 1):
        down, up = down[..., None, None], up[..., None, None]
    if not conv and down.dim() == 4 and down.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    if conv:
        expected_down = (item.rank, target.in_channels, *target.kernel_size)
        expected_up = (target.out_channels, item.rank, 1, 1)
    else:
        expected_down, expected_up = (item.rank, target.in_features), (target.out_features, item.rank)
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        return (f"its shapes {tuple(down.shape)} and {tuple(up.shape)} do not fit this model's "
                f"{tuple(target.weight.shape)} weight")
    out, scale, extra = expected_up[0], item.dora_scale, list(item.extra)
    if scale is not None and (scale.numel() != out or scale.shape[0] != out):
        extra.append(f"{item.name}.dora_scale")  # LyCORIS's input-axis layout, which peft cannot hold
        scale = None
    return replace(item, down=down, up=up, dora_scale=scale, extra=extra)


def match_modules(modules: dict[str, LoraModule], table: dict[str, tuple[str, str, torch.nn.Module]]) -> LoraFit:
    """Which modules land on a module of the model with fitting shapes, which do not exist there, which misfit."""
    fit = LoraFit({}, {})
    for key, item in modules.items():
        if item.down is None and item.up is None:
            kinds = ", ".join(k.split(".", 1)[1] for k in item.extra)
            fit.not_applied[key] = f"{kinds}: a kind of weight this app does not load (LyCORIS LoHa/LoKr, say)"
        elif key not in table:
            fit.not_applied[key] = "no such module in an SD1.x model"
        elif isinstance(shaped := fitted(item, table[key][2]), str):
            fit.misfits.append(f"{key}: {shaped}")
        else:
            fit.applied[key] = (*table[key][:2], shaped)
            if shaped.extra:
                fit.not_applied[f"{key} (extra)"] = f"{', '.join(shaped.extra)} not applied (only the LoRA pair is)"
    return fit


LYCORIS_KINDS = {"hada_": "LoHa", "lokr_": "LoKr"}  # key parts of LyCORIS's other network kinds
SD15_CHANNELS = [320, 640, 1280, 1280]  # the UNet's block widths in full-size SD1.5


def fit_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str], pipe: StableDiffusionPipeline,
             name: str) -> LoraFit:
    """Map a file's modules onto the pipeline; refuse it when it is for another model or holds broken weights."""
    check_finite(tensors, name)
    modules = read_modules(tensors)
    if all(item.down is None and item.up is None for item in modules.values()):  # not one LoRA pair
        lycoris = sorted({LYCORIS_KINDS[kind] for item in modules.values() for key in item.extra
                          for kind in LYCORIS_KINDS if f".{kind}" in key})
        if lycoris:
            raise UserError(f"'{name}' is a LyCORIS {' and '.join(lycoris)} file: this app applies LoRA, LoCon and "
                            "DoRA files. Use it in ComfyUI or A1111/Forge, which load LoHa and LoKr.")
        raise UserError(f"'{name}' holds no LoRA weights: none of its {len(tensors)} tensors is part of a LoRA pair "
                        "(lora_down/lora_up or lora_A/lora_B). It may be a checkpoint or an embedding instead.")
    fit = match_modules(modules, module_table(pipe))
    family = architecture(modules, metadata)
    if family == "SD2":
        raise UserError(f"'{name}' is an SD2 LoRA: it does not fit this SD1.x base model. Use an SD1.x LoRA.")
    if fit.misfits and pipe.unet.config.block_out_channels != SD15_CHANNELS and \
            not match_modules(read_modules(tensors), sd15_table()).misfits:
        raise UserError(f"'{name}' is a LoRA for full-size SD1.5, and the base model here is the tiny demo model "
                        "(SD1.5's layout with far fewer channels), which cannot take it. Pick a real SD1.5 "
                        "checkpoint as the base model to test it.")
    if fit.misfits or not fit.applied:
        hint = "SDXL" if family == "SDXL" else "another model (or another rank layout)"
        first = fit.misfits[0] if fit.misfits else next(iter(fit.not_applied), "no LoRA weights")
        count = len(fit.misfits) or len(fit.not_applied)
        raise UserError(f"'{name}' does not fit this SD1.x base model: {count} of its {len(modules)} modules do not "
                        f"fit (first: {first}). It was probably trained for {hint}; use an SD1.x LoRA.")
    return fit


def read_metadata(path: Path) -> dict[str, str]:
    """A LoRA file's metadata alone (the header is read, not the tensors); empty for a file that has none."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:
        raise UserError(f"'{Path(path).name}' is not a readable .safetensors LoRA ({exc}).") from exc


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, with a clear message for files that are not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file '{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # the library's own words ("header too large") would not help anyone
        with path.open("rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80" or head == b"PK":  # a pickle, bare or in PyTorch's zip
            raise UserError(f"'{path.name}' is a PyTorch pickle file under a .safetensors name. Pickle files are "
                            "refused, since loading one can run any code: get the .safetensors version of it.") from exc
        raise UserError(f"'{path.name}' is not a readable .safetensors LoRA: its header is damaged or the file is cut "
                        "off (an interrupted download?). Download or copy it again.") from exc
    return tensors, metadata


BLOCK = re.compile(r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+|[a-z_]+?)_")
METADATA_SHOWN = 300  # characters of each metadata value in the report (tag frequencies can be long)


@dataclass
class LoraInspection:
    """What a LoRA file holds and how it maps onto SD1.5 (or the demo model, for a LoRA trained on it): the Test
    tab's inspector and ``inspect``."""

    name: str
    layout: str
    family: str
    fit: LoraFit
    blocks: dict[str, tuple[set[int], set[float]]]
    metadata: dict[str, str]
    keys: int
    mapped_keys: int
    broken: int  # tensors with NaN or infinite values
    target: str = "SD1.5"  # the architecture the keys were mapped onto

    def text(self) -> str:
        """The report as plain text (metadata is shown as text, never as markup)."""
        share = 100 * self.mapped_keys / self.keys if self.keys else 0
        lines = [self.name, f"Layout: {self.layout}", f"Made for: {self.family}", f"Modules: {self.fit.parts()}",
                 f"Keys that map onto {self.target}: {self.mapped_keys} of {self.keys} ({share:.0f}%)"]
        if self.broken:
            lines.append(f"NaN or infinite values in {self.broken} tensors: this file renders black images.")
        problems = [*self.fit.misfits, *(f"{key}: {why}" for key, why in self.fit.not_applied.items())]
        lines += ["Not mapped:", *(f"  {p}" for p in problems)] if problems else []
        lines.append("Rank and alpha per block:")
        for block, (ranks, alphas) in self.blocks.items():
            alpha = ", ".join(f"{a:g}" for a in sorted(alphas))
            lines.append(f"  {block}: rank {', '.join(map(str, sorted(ranks)))}, alpha {alpha}")
        lines.append("Metadata:" if self.metadata else "Metadata: none")
        for key, value in sorted(self.metadata.items()):
            shown = value if len(value) <= METADATA_SHOWN else f"{value[:METADATA_SHOWN]}… ({len(value)} characters)"
            lines.append(f"  {key}: {shown}")
        return "\n".join(lines)


def block_of(key: str, component: str) -> tuple[int, str]:
    """The block a module belongs to, for the per-block ranks, as kohya numbers the 25 (block_dims' order) with the
    diffusers block it lies in: ``IN04 (down_blocks.1)``, ``MID (mid_block)``; ``text encoder``; and its place in
    that order."""
    if component == "text_encoder":
        return len(BLOCKS) + 1, "text encoder"
    found, index = BLOCK.match(key), block_index(key)
    place = found.group(1).replace("s_", "s.") if found else "other"
    return (index, f"{BLOCKS[index]} ({place})") if index is not None else (len(BLOCKS), place)


@lru_cache(maxsize=2)
def sd15_table(demo: bool = False) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """The module table of the full SD1.5 architecture (or the demo model's), built once on the meta device."""
    from .models import sd15_skeleton

    return module_table(sd15_skeleton(demo))


def inspect_lora(path: Path) -> LoraInspection:
    """Read a LoRA file and map it onto the architecture it was made for (built on the meta device), loading no
    model: the demo model's when its metadata says it was trained on the demo, else the full SD1.5."""
    import torch

    from .models import DEMO

    tensors, metadata = read_lora(path)
    modules = read_modules(tensors)
    demo = metadata.get("ss_sd_model_name") == DEMO
    fit = match_modules(modules, sd15_table(demo))
    layouts = sorted({m.layout for m in modules.values() if m.layout}) or ["no LoRA layout this app reads"]
    layout = " + ".join(layouts)
    if any(m.down is not None and m.down.dim() == 4 and m.down.shape[2:] != (1, 1) for m in modules.values()):
        layout += " with conv layers (LoCon)"
    if any(m.dora_scale is not None for _, _, m in fit.applied.values()):
        layout += " with DoRA magnitudes"
    if metadata.get("ss_network_module", "").startswith("lycoris"):
        layout += f", made with {metadata['ss_network_module']}"
    blocks: dict[str, tuple[set[int], set[float]]] = {}
    for (_, block), _, item in sorted((block_of(key, component), key, item)
                                      for key, (component, _, item) in fit.applied.items()):
        ranks, alphas = blocks.setdefault(block, (set(), set()))
        ranks.add(item.rank)
        alphas.add(item.alpha_or_rank)
    mapped = sum(len(item.keys) - len(item.extra) for _, _, item in fit.applied.values())
    broken = sum(1 for t in tensors.values() if t.is_floating_point() and not torch.isfinite(t).all())
    return LoraInspection(Path(path).name, layout, architecture(modules, metadata), fit, blocks, metadata,
                          len(tensors), mapped, broken, "the demo model" if demo else "SD1.5")
