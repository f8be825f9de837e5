"""The studio's LoRA tools: resize, merge, bake and extract, each a job whose result is a :class:`ToolReport` and a
new file in models/loras (a baked checkpoint in models/checkpoints). A file already there is never replaced."""

from __future__ import annotations

import threading
from pathlib import Path

from .. import lora_tools
from ..access import OPERATOR, Visitor
from ..atomic import disk_name
from ..errors import UserError
from ..events import Emit, status_events
from ..lora_svd import RankRule, ToolReport, check_weights
from .desk import Desk, exists

SUFFIX = ".safetensors"
_writing = threading.Lock()  # the check that a name is free and the write under it are one step


class Tools(Desk):
    """LoRA utilities over the workspace's files; a baked checkpoint is the operator's to write (gigabytes)."""

    def tool_output(self, folder: Path, name: str, fallback: str) -> Path:
        """Where a tool writes: ``name`` (else ``fallback``) as a safe file name in ``folder``; a taken name is
        refused before any work starts."""
        stem = disk_name((name or "").strip().removesuffix(SUFFIX) or fallback, "lora")
        path = folder / f"{stem}{SUFFIX}"
        if exists(path):
            raise UserError(f"{self.workspace.relative(path)} already exists: choose another name, or delete that "
                            "file first. A tool never replaces a file.")
        return path

    def tool_label(self, path: Path) -> str | None:
        """The Test tab's label of a file a tool wrote (loras/…); None for a checkpoint."""
        return next((label for label, found in self.workspace.lora_files().items() if found == path), None)

    def _start(self, title: str, path: Path, work: lora_tools.ToolWork, visitor: Visitor) -> str:
        """Run one tool as a job and write its file only once the work is complete."""
        def job(stop: threading.Event, emit: Emit) -> ToolReport:
            output = work(stop, emit)
            path.parent.mkdir(parents=True, exist_ok=True)
            with _writing:
                if exists(path):
                    raise UserError(f"{path.name} was written by someone else meanwhile: choose another name.")
                return lora_tools.write(path, output)

        return self.jobs.start("tool", title, job, owner=visitor.name)

    def start_resize(self, label: str, rule: RankRule, name: str = "", visitor: Visitor = OPERATOR) -> str:
        """Resize a LoRA of the workspace to ``rule`` into models/loras."""
        source = self.lora(label)
        if source is None:
            raise UserError("Pick the LoRA to resize.")
        rule.check()
        suffix = f"r{rule.rank}" if rule.method == "fixed" else f"{rule.method}{rule.value:g}"
        path = self.tool_output(self.workspace.loras_dir, name, f"{source.stem}-{suffix}")
        return self._start(f"Resize {source.name}", path,
                           lambda stop, emit: lora_tools.resize(source, rule, emit, stop), visitor)

    def start_merge(self, labels: list[str], weights: list[float], rule: RankRule | None, name: str = "",
                    visitor: Visitor = OPERATOR) -> str:
        """Merge LoRAs at weights (ranks side by side, or by SVD to ``rule``) into models/loras; no weights: 1 each."""
        weights = list(weights) or [1.0] * len(labels)
        if len(labels) != len(weights):
            raise UserError(f"Give one weight per LoRA: {len(labels)} files and {len(weights)} weights.")
        if len(labels) > lora_tools.MAX_MERGE:
            raise UserError(f"Merge up to {lora_tools.MAX_MERGE} files at once.")
        sources = [(self.lora(label), weight) for label, weight in zip(labels, weights, strict=True)]
        if any(path is None for path, _ in sources):
            raise UserError("Pick LoRA files to merge (the base model alone is not one).")
        check_weights([weight for _, weight in sources], "merge weight")
        if rule is not None:
            rule.check()
        fallback = "merged-" + "-".join(path.stem[:20] for path, _ in sources[:3])
        path = self.tool_output(self.workspace.loras_dir, name, fallback)
        return self._start(f"Merge {len(sources)} LoRAs", path,
                           lambda stop, emit: lora_tools.merge(sources, rule, emit, stop), visitor)

    def start_bake(self, base: str | None, label: str, strength_model: float, strength_clip: float,
                   dtype: str = "fp16", name: str = "", visitor: Visitor = OPERATOR) -> str:
        """Bake a LoRA at strengths into the base, as a checkpoint in models/checkpoints (the operator only)."""
        visitor.require_operator("bake a checkpoint (gigabytes in the shared models/checkpoints)")
        check_weights([strength_model, strength_clip], "strength")
        lora_tools.torch_dtype(dtype)
        spec, source = self.base(base), self.lora(label)
        if source is None:
            raise UserError("Pick the LoRA to bake into the base model.")
        base_stem = Path(spec.display_name).stem
        path = self.tool_output(self.workspace.checkpoints_dir, name, f"{base_stem}-{source.stem}")
        cache = self.free_cache(("pipeline", spec))

        def work(stop: threading.Event, emit: Emit) -> lora_tools.ToolOutput:
            with cache.pipeline(spec, "baking a checkpoint", on_wait=status_events(emit), stop=stop) as pipe:
                return lora_tools.bake(pipe, spec.display_name, [(source, strength_model, strength_clip)], dtype,
                                       emit, stop)

        return self._start(f"Bake {source.name} into {spec.display_name}", path, work, visitor)

    def start_extract(self, base: str | None, tuned: str, rule: RankRule, conv_rule: RankRule | None = None,
                      name: str = "", visitor: Visitor = OPERATOR) -> str:
        """Extract a LoRA from a fine-tuned checkpoint against the base, into models/loras."""
        rule.check()
        if conv_rule is not None:
            conv_rule.check("Conv rank")
        spec, fine = self.base(base), self.base(tuned)
        if fine.kind != "single_file":
            raise UserError("Pick the fine-tuned checkpoint: a .safetensors file in models/checkpoints.")
        source = Path(fine.location)
        path = self.tool_output(self.workspace.loras_dir, name, f"{source.stem}-extracted-r{rule.rank}")
        cache = self.free_cache(("pipeline", spec))

        def work(stop: threading.Event, emit: Emit) -> lora_tools.ToolOutput:
            with cache.pipeline(spec, "extracting a LoRA", on_wait=status_events(emit), stop=stop) as pipe:
                return lora_tools.extract(pipe, spec.display_name, source, rule, conv_rule, emit, stop)

        return self._start(f"Extract a LoRA from {source.name}", path, work, visitor)
