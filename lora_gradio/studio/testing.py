"""The studio's Test tab: LoRA files of the workspace, images and grids in each visitor's own folder, and the
hand-off to ComfyUI."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import comfyui, inference
from ..access import OPERATOR, Visitor
from ..errors import UserError
from ..events import Emit, JobEvent
from ..lora_map import inspect_lora, read_metadata
from ..models import PICKLE_SUFFIXES, default_side
from ..request import GenerateRequest, short
from ..threads import on_own_thread
from ..training.result import TrainResult
from ..training.run_folder import RunFolder
from .desk import Desk, exists, stamp

NO_LORA = "(no LoRA: the base model)"
TEST_IMAGES = "test-images"  # the Test tab's images, a folder per visitor


@dataclass(frozen=True)
class GridResult:
    """A grid job's saved PNG, or none when a Stop ended it."""

    path: Path | None
    stopped: bool = False


@dataclass(frozen=True)
class GeneratedImage:
    """A Test-tab image on disk, its A1111-style parameters, and which modules of its LoRA were applied."""

    path: Path
    parameters: str
    lora: str


class Testing(Desk):
    """Test-tab images and grids, LoRA files and ComfyUI."""

    def test_images_dir(self, visitor: Visitor = OPERATOR) -> Path:
        """Where a visitor's Test-tab images and grids are kept: a folder of their own under outputs/test-images."""
        key = "operator" if visitor.name is None else hashlib.sha256(visitor.name.encode()).hexdigest()[:16]
        return self.workspace.outputs_dir / TEST_IMAGES / key

    def test_image(self, name: str, visitor: Visitor = OPERATOR) -> Path | None:
        """One of the visitor's own Test-tab images by its file name; None when it is not there (any more)."""
        path = self.test_images_dir(visitor) / Path(str(name)).name
        return path if path.suffix == ".png" and exists(path) and path.is_file() else None

    def lora(self, label: str | None) -> Path | None:
        """The LoRA file behind a label of :meth:`Workspace.lora_files`; None for no LoRA."""
        if not label or label == NO_LORA:
            return None
        files = self.workspace.lora_files()
        if label not in files and Path(label).suffix.lower() in PICKLE_SUFFIXES:
            raise UserError(f"LoRA {short(label)} is a pickle file: the app loads .safetensors LoRAs only, since "
                            "loading a pickle can run any code. Use the .safetensors version of it.")
        if label not in files:
            raise UserError(f"LoRA '{label}' is not in this workspace (outputs/ or models/loras); refresh the list.")
        return files[label]

    def clear_test_images(self, visitor: Visitor = OPERATOR) -> str:
        """Delete the visitor's Test-tab images and grids (everyone's, for the operator) and their served links."""
        folder = self.workspace.outputs_dir / TEST_IMAGES if visitor.operator else self.test_images_dir(visitor)
        images = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
        for path in images:
            path.unlink(missing_ok=True)
        self.forget_deleted()
        return f"Deleted {sum(p.suffix == '.png' for p in images)} test images."

    def newest_lora(self) -> str:
        """The label of the newest run's last saved LoRA (its final file, when it finished), so the Test tab opens
        on what was just trained."""
        files = self.workspace.lora_files()  # newest run first, each run's final file last
        runs = [path.parent for label, path in files.items() if not label.startswith("loras/")]
        return [k for k, path in files.items() if path.parent == runs[0]][-1] if runs else NO_LORA

    def lora_trigger(self, label: str | None) -> str:
        """A LoRA's trigger word, from its metadata (``modelspec.trigger_phrase``) or else its run's settings."""
        path = self.lora(label)
        if path is None:
            return ""
        word = read_metadata(path).get("modelspec.trigger_phrase", "")
        run = RunFolder(path.parent)
        return word or (run.read_job().config.trigger_word if run.job_file.is_file() else "")

    def lora_prompt(self, label: str | None) -> str:
        """The prompt to try a LoRA with: its run's first sample prompt, else its trigger word and a plain subject;
        "" for a file that went away or is damaged."""
        try:
            path = self.lora(label)
            run = RunFolder(path.parent) if path is not None else None
            prompts = run.read_job().config.prompts() if run is not None and run.job_file.is_file() else []
            trigger = "" if prompts else self.lora_trigger(label)  # the file's metadata, read only when needed
        except UserError:
            return ""
        return prompts[0] if prompts else f"{trigger}, portrait photo" if trigger else ""

    def lora_clip_skip(self, label: str | None) -> int:
        """The CLIP skip a LoRA was trained with (``ss_clip_skip``), 1 or 2; 1 when the file does not say."""
        path = self.lora(label)
        recorded = read_metadata(path).get("ss_clip_skip", "") if path is not None else ""
        return 2 if recorded.isdigit() and int(recorded) >= 2 else 1

    def start_grid(self, base: str | None, request: GenerateRequest, labels: list[str],
                   strengths: list[float], visitor: Visitor = OPERATOR) -> str:
        """Render an epochs × strengths grid in the background; its result is a :class:`GridResult`. The sizes are
        checked before any LoRA is looked up."""
        request.validate()
        self.limits.check(request, len(labels) * len(strengths))
        spec = self.base(base)
        loras = [(label, self.lora(label)) for label in labels]
        folder = self.test_images_dir(visitor)

        def work(stop: threading.Event, emit: Emit) -> GridResult:
            image = inference.compare_grid(self.free_cache(("pipeline", spec)), spec, request, loras, strengths, stop,
                                           emit)
            if image is None:
                return GridResult(None, stopped=True)
            return GridResult(inference.save_png(image, folder / f"grid-{stamp()}.png"))

        return self.jobs.start("grid", "Comparison grid", work, owner=visitor.name)

    def generate(self, base: str | None, request: GenerateRequest,
                 on_wait: Callable[[str], None] | None = None, visitor: Visitor = OPERATOR) -> GeneratedImage:
        """One image, saved with its parameters in the visitor's folder of outputs/test-images. It is rendered on a
        thread of its own: a server's request threads live on, and their OpenMP pools would slow every later job."""
        request.validate()
        self.limits.check(request)
        spec = self.base(base)
        cache = self.free_cache(("pipeline", spec))
        image = on_own_thread(lambda: inference.generate(cache, spec, request, on_wait))
        path = inference.save_png(image, self.test_images_dir(visitor) / f"{stamp()}-{request.seed}.png")
        return GeneratedImage(path, image.info["parameters"], image.info.get("lora", ""))

    def graph(self, base: str | None, request: GenerateRequest) -> list[comfyui.Node]:
        """The ComfyUI graph that makes a Test-tab image, with the base and LoRA by their file names, at the size
        the Test tab renders (the model's own when the request leaves it at 0)."""
        request.validate()
        spec = self.base(base)
        side = default_side(spec)
        return comfyui.build_graph(request, spec.display_name, request.width or side, request.height or side)

    def workflow(self, base: str | None, request: GenerateRequest, api: bool = False,
                 visitor: Visitor = OPERATOR) -> Path:
        """The ComfyUI workflow (UI format, or API format) for a Test-tab image, named after its LoRA and saved in
        the visitor's folder of outputs/test-images."""
        name = request.lora.stem if request.lora is not None else "base-model"
        path = self.test_images_dir(visitor) / f"workflow-{stamp()}" / f"{name}{'.api' if api else ''}.workflow.json"
        return comfyui.write_graph(path, self.graph(base, request), api)

    def queue_in_comfyui(self, base: str | None, request: GenerateRequest) -> str:
        """Queue the Test tab's image in the ComfyUI this app's operator pointed it at (never a visitor's URL)."""
        return comfyui.queue(self.comfyui_url, comfyui.api_prompt(self.graph(base, request)))

    def comfyui_models(self) -> Path:
        """The models folder of the ComfyUI install the workspace shares; a message when none is set."""
        shared = self.workspace.settings.get("models_dir")
        if not shared:
            raise UserError("No ComfyUI folder is set: give the path of your ComfyUI install in Workspace settings "
                            "(at the top of the page), then send the LoRA again.")
        return Path(shared)

    def send_to_comfyui(self, label: str | None, base: str | None, replace: bool = False,
                        visitor: Visitor = OPERATOR) -> str:
        """Install a LoRA into the shared ComfyUI's models/loras, and say when its base model is missing there; only
        the operator replaces a file already there."""
        if replace:
            visitor.require_operator("replace a file in ComfyUI's models/loras")
        models = self.comfyui_models()
        lora = self.lora(label)
        if lora is None:
            raise UserError("Pick the LoRA to send to ComfyUI.")
        note = comfyui.checkpoint_note(self.base(base), models)
        return comfyui.install_lora(lora, models, replace) + (f" {note}" if note else "")

    def install_trained(self, result: TrainResult, emit: Emit) -> None:
        """When the workspace shares a ComfyUI models folder, a finished run's LoRA goes into its models/loras."""
        shared = self.workspace.settings.get("models_dir")
        if not shared:
            return
        try:
            emit(JobEvent("status", "ComfyUI: " + comfyui.install_lora(result.lora_path, Path(shared))))
        except (UserError, OSError) as exc:
            emit(JobEvent("warning", f"The LoRA was not copied into ComfyUI: {exc}"))

    def link_base_into_comfyui(self, base: str | None) -> str:
        """Link the base model file into the shared ComfyUI's models/checkpoints."""
        return comfyui.link_checkpoint(self.base(base), self.comfyui_models())

    def inspect(self, label: str | None) -> str:
        """The LoRA inspector's report for a LoRA of this workspace, as plain text."""
        lora = self.lora(label)
        if lora is None:
            raise UserError("Pick a LoRA to inspect.")
        return on_own_thread(lambda: inspect_lora(lora).text())  # its finiteness check runs kernels, as images do
