"""The app's backend in one object: a workspace, its model cache and its jobs.

The Gradio tabs and the public API endpoints call these methods and nothing else, so a script can do all that the
page does: ``studio.start_training(studio.plan_training("anna", "demo", {"epochs": 4}))``. Methods that start,
change or delete something take the :class:`Visitor` who asks; a script on the server is the operator.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import captioning, comfyui, imports, inference, quality, served
from .access import OPERATOR, Access, Visitor
from .dataset import list_images, read_manifest
from .errors import UserError
from .estimate import TIMINGS_FILE, Estimate, Timings, device_name, estimate, format_duration
from .events import Emit, JobEvent
from .inference import short
from .jobs import JobRunner, start_resume, start_training
from .lora_map import inspect_lora, read_metadata
from .models import DEMO, PICKLE_SUFFIXES, RANDOM_SD15, REPO_ID, BaseModelSpec, ModelCache, default_side, resolve_base
from .training.config import PRESETS_DIR, TrainConfig, list_presets, load_preset, make_config, save_preset
from .training.data import TrainData
from .training.loop import TrainResult
from .training.run_folder import RunFolder, RunJob, list_runs
from .workspace import DATASET_NAME, MODEL_SUFFIXES, Workspace

NO_LORA = "(no LoRA: the base model)"
TEST_IMAGES = "test-images"  # the Test tab's images, a folder per visitor
YOURS = " (yours)"  # a preset saved in this workspace, as the preset list names it


@dataclass(frozen=True)
class Limits:
    """What one visitor's request may ask of the server; the page states them up front."""

    max_images: int = 1000  # per dataset
    max_grid_cells: int = 36
    max_image_side: int = 1024  # pixels, for Test-tab images and grids
    max_steps: int = 100  # sampling steps per image
    max_upload_mb: int = 200  # per uploaded file (Gradio refuses larger ones)
    max_train_minutes: int = 120  # estimated length of a run started by anyone but the operator
    max_samples: int = 200  # sample images a run started by anyone but the operator may render
    keep_uploads_hours: float = 24  # uploads not imported by then are removed ...
    uploads_budget_mb: int = 4096  # ... and the oldest first while all of them take more than this

    def check_training(self, estimate: Estimate, visitor: Visitor) -> None:
        """Refuse a run of anyone but the operator past the time or sample cap, naming the number and the flag."""
        if visitor.operator:
            return
        minutes = (estimate.seconds or 0) / 60
        if minutes > self.max_train_minutes:
            raise UserError(f"This run is estimated at about {format_duration(estimate.seconds or 0)}, and this "
                            f"server lets visitors train up to {self.max_train_minutes} min a run (its operator "
                            "sets that with --max-train-minutes). Train fewer epochs or steps, or render fewer "
                            "samples.")
        if estimate.samples > self.max_samples:
            raise UserError(f"This run would render {estimate.samples} sample images, and this server allows "
                            f"visitors {self.max_samples} a run (its operator sets that with --max-samples). Sample "
                            "less often, or with fewer prompts.")

    def check(self, request: inference.GenerateRequest, images: int = 1) -> None:
        """Refuse a generation or a grid past the server's limits, naming the limit."""
        sides = [s for s in (request.width, request.height) if s]
        problems = [text for ok, text in (
            (all(s <= self.max_image_side for s in sides), f"images up to {self.max_image_side} px a side"),
            (request.steps <= self.max_steps, f"up to {self.max_steps} steps"),
            (images <= self.max_grid_cells, f"grids up to {self.max_grid_cells} images ({images} asked)"),
        ) if not ok]
        if problems:
            raise UserError("This server allows " + "; ".join(problems) + ".")

    def describe(self) -> str:
        """The limits as one line for the page."""
        return (f"Limits on this server: {self.max_images} images per dataset, uploads up to {self.max_upload_mb} MB "
                f"a file, images up to {self.max_image_side} px and {self.max_steps} steps, grids up to "
                f"{self.max_grid_cells} images.")

    def describe_training(self) -> str:
        """The training limits as one line for the Train tab."""
        return (f"Runs started by anyone but the operator: up to {self.max_train_minutes} min (estimated) and "
                f"{self.max_samples} sample images each.")


@dataclass(frozen=True)
class TrainingPlan:
    """A validated run before it starts: settings, base model, data and the estimate."""

    config: TrainConfig
    base: BaseModelSpec
    data: TrainData
    estimate: Estimate


@dataclass(frozen=True)
class GeneratedImage:
    """A Test-tab image on disk, its A1111-style parameters, and which modules of its LoRA were applied."""

    path: Path
    parameters: str
    lora: str


class Studio:
    """One workspace, one model cache and one job runner, shared by every visitor of the app."""

    def __init__(self, workspace: Workspace, cache: ModelCache | None = None, jobs: JobRunner | None = None,
                 limits: Limits | None = None, comfyui_url: str = comfyui.DEFAULT_URL, access: Access | None = None,
                 upload_dir: Path | None = None) -> None:
        self.workspace = workspace
        self.comfyui_url = comfyui_url
        self.limits = limits or Limits()
        self.cache = cache or ModelCache()
        self.jobs = jobs or JobRunner()
        self.access = access or Access()
        self.upload_dir = upload_dir or workspace.root / ".cache" / "gradio"  # the one folder the server serves

    def test_images_dir(self, visitor: Visitor = OPERATOR) -> Path:
        """Where a visitor's Test-tab images and grids are kept: a folder of their own under outputs/test-images."""
        key = "operator" if visitor.name is None else hashlib.sha256(visitor.name.encode()).hexdigest()[:16]
        return self.workspace.outputs_dir / TEST_IMAGES / key

    def test_image(self, name: str, visitor: Visitor = OPERATOR) -> Path | None:
        """One of the visitor's own Test-tab images by its file name; None when it is not there (any more)."""
        path = self.test_images_dir(visitor) / Path(str(name)).name
        return path if path.suffix == ".png" and exists(path) and path.is_file() else None

    def base(self, choice: str | None) -> BaseModelSpec:
        """The base model a visitor picked: ``demo``, a file or folder in models/checkpoints, a hub repo id, or a
        path inside the workspace or an allowed folder. Anything else is refused before it is opened."""
        name = (choice or DEMO).strip() or DEMO
        if name in (DEMO, RANDOM_SD15):
            return resolve_base(name)
        listed = self.workspace.checkpoints_dir / name
        if Path(name).name == name and exists(listed):
            return resolve_base(str(self.workspace.check_allowed(listed, "Base model")))
        if self.is_hub_id(name) and not name.lower().endswith(MODEL_SUFFIXES):
            return BaseModelSpec("hub", name)
        return resolve_base(str(self.workspace.check_allowed(name, "Base model")))

    def is_hub_id(self, name: str) -> bool:
        """Whether ``name`` means a hub repository (owner/name), not a folder the server would open instead."""
        if not REPO_ID.match(name):
            return False
        return not exists(Path(name))  # the libraries prefer a local folder of that name

    def create_dataset(self, name: str, visitor: Visitor = OPERATOR) -> str:
        """Create an empty dataset, owned by whoever created it; an existing one is left as it is."""
        if not self.dataset_exists(name):
            folder = self.workspace.dataset_dir(name, create=True)
            if visitor.name is not None:
                self.workspace.set_dataset_settings(folder.name, owner=visitor.name)
        return self.workspace.dataset_dir(name).name

    def load_demo_dataset(self, visitor: Visitor = OPERATOR) -> str:
        """Create the demo dataset (rings, a shape the demo base has never seen) as an ordinary dataset of this
        visitor's, under the first free name; returns that name."""
        from .demo.shapes import DEMO_TRIGGER, make_demo_dataset

        taken = set(self.workspace.list_datasets())
        free = [n for n in ("demo-rings", *(f"demo-rings-{i}" for i in range(2, MAX_DEMO_DATASETS + 1)))
                if n not in taken]
        if not free:
            raise UserError(f"There are {MAX_DEMO_DATASETS} demo datasets already: use one of them, or delete one "
                            "(Dataset tab, Delete this dataset…) before loading another.")
        name = free[0]
        self.create_dataset(name, visitor)
        make_demo_dataset(self.images_dir(name))
        self.workspace.set_dataset_settings(name, DEMO_TRIGGER)
        return name

    def dataset_exists(self, name: str) -> bool:
        """Whether a dataset of that (valid) name exists."""
        try:
            self.workspace.dataset_dir(name)
        except UserError:
            return False
        return True

    def set_trigger_word(self, dataset: str | None, word: str, visitor: Visitor = OPERATOR) -> None:
        """Keep a dataset's trigger word as it is typed, so the Caption, Train and Test tabs all use it."""
        self.dataset_to_change(dataset, visitor)
        if len(word) > 100:
            raise UserError("A trigger word of over 100 characters: use one short, rare word, such as ohwx.")
        self.workspace.set_dataset_settings(str(dataset), word)

    def dataset_to_change(self, dataset: str | None, visitor: Visitor = OPERATOR) -> Path:
        """The images folder of a dataset that this visitor may change: theirs, or any for the operator."""
        images = self.images_dir(dataset)
        visitor.require(self.workspace.dataset_settings(dataset).get("owner"), f"Dataset '{dataset}'")
        return images

    def delete_dataset(self, dataset: str | None, visitor: Visitor = OPERATOR) -> str:
        """Delete a dataset (its copies of the images, captions and training copies); never the originals."""
        images = self.dataset_to_change(dataset, visitor)
        shutil.rmtree(images.parent)
        self.forget_deleted()
        return f"Deleted dataset {images.parent.name}."

    def remove_images(self, dataset: str | None, names: list[str], visitor: Visitor = OPERATOR) -> list[str]:
        """Remove images (and their captions) from a dataset this visitor may change."""
        images = self.dataset_to_change(dataset, visitor)
        gone = quality.remove_images(images, names)
        self.forget_deleted()
        return gone

    def import_folder(self, dataset: str | None, folder: str, visitor: Visitor = OPERATOR) -> imports.ImportReport:
        """Import a folder on the server (inside the workspace or an allowed folder) into a dataset; the walk stops
        at the stated number of files and seconds."""
        source = self.workspace.check_allowed(folder.strip(), "Folder")
        images = self.dataset_to_change(dataset, visitor)
        if not source.is_dir():
            raise UserError(f"{short(folder)} is not a folder on this server.")
        return imports.import_folder(source, images, self.limits.max_images)

    def set_models_dir(self, folder: str, visitor: Visitor = OPERATOR) -> str:
        """Share checkpoints and LoRAs with a ComfyUI install (a folder that passes the path rule); empty: none."""
        visitor.require_operator("change the workspace settings")
        self.workspace.use_models_dir(folder.strip() or None)
        return (f"Checkpoints: `{self.workspace.relative(self.workspace.checkpoints_dir)}`; LoRAs: "
                f"`{self.workspace.relative(self.workspace.loras_dir)}`.")

    def import_uploads(self, dataset: str | None, files: list[Path], visitor: Visitor = OPERATOR,
                       ) -> imports.ImportReport:
        """Import uploaded images, captions and zips into a dataset."""
        if len(files) > 2 * self.limits.max_images:  # an image and its caption each
            raise UserError(f"{len(files)} files at once: this server takes up to {self.limits.max_images} images a "
                            "dataset. Upload fewer, or a zip.")
        return imports.import_sources(files, self.dataset_to_change(dataset, visitor), self.limits.max_images)

    def housekeeping(self) -> str:
        """Remove shown files whose source is gone, and uploads past the age or the size budget."""
        links = self.forget_deleted()
        uploads = served.clean_uploads(self.upload_dir, self.limits.keep_uploads_hours * 3600,
                                       self.limits.uploads_budget_mb * 2**20)
        return f"{links} stale links and {uploads} old uploads removed."

    def forget_deleted(self) -> int:
        """Stop serving what was just deleted (its old URLs answer 404); returns how many links went."""
        return served.forget_deleted(self.upload_dir)

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

    def plan_training(self, dataset: str | None, base: str | None, settings: dict[str, Any] | TrainConfig,
                      regularization: str | None = None, repeats: int = 1) -> TrainingPlan:
        """Validate settings (unknown keys are named) and estimate; the sample prompts keep ``{trigger}``, filled in
        as they are rendered.
        ``regularization`` names a second dataset of class images; ``repeats`` is how often an epoch shows each
        image of ``dataset``."""
        if not dataset:
            raise UserError("Choose a dataset above (and add images in the Dataset tab) before training.")
        config = settings if isinstance(settings, TrainConfig) else make_config(dict(settings))
        if config.output_name == TrainConfig().output_name:  # not named: after the dataset, so runs do not collide
            config = replace(config, output_name=lora_name(dataset))
        spec = self.base(base)
        images, prepared = self.workspace.training_data(dataset)
        if not images.is_dir() or not list_images(images):
            raise UserError(f"Dataset '{dataset}' has no images yet: add photos in the Dataset tab (drop them, a zip, "
                            "or a folder of this server), then train.")
        regular = self.workspace.training_data(regularization)[0] if regularization else None
        data = TrainData(images, prepared, regular, repeats)
        known = self.timings.costs(spec.display_name, device_name())
        loaded = self.cache.holds == ("pipeline", spec)
        return TrainingPlan(config, spec, data, estimate(config, data, spec.kind == DEMO, known, loaded))

    def start_training(self, plan: TrainingPlan, visitor: Visitor = OPERATOR) -> str:
        """Start the planned run in a new folder under outputs/, recorded as the visitor's; returns the job id that
        Stop needs. A visitor other than the operator trains within the server's time and sample caps."""
        self.limits.check_training(plan.estimate, visitor)
        run_dir = self.workspace.outputs_dir / f"{plan.config.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        dataset = plan.data.images.parent.name
        if visitor.owns(self.workspace.dataset_settings(dataset).get("owner")):  # another's dataset stays theirs
            self.workspace.set_dataset_settings(dataset, plan.config.trigger_word, plan.data.repeats)

        return start_training(self.jobs, self.cache, plan.config, plan.base, plan.data, run_dir, visitor.name,
                              self.after_run(plan), plan.estimate.steps)

    def after_run(self, plan: TrainingPlan) -> Callable[[TrainResult, Emit], None]:
        """What follows a finished run: its time against the estimate shown before it, then the ComfyUI copy."""

        def finish(result: TrainResult, emit: Emit) -> None:
            self.compare_with_estimate(plan, result, emit)
            self.install_trained(result, emit)

        return finish

    @property
    def timings(self) -> Timings:
        """What runs measured on this machine, for the estimates."""
        return Timings(self.workspace.root / TIMINGS_FILE)

    def compare_with_estimate(self, plan: TrainingPlan, result: TrainResult, emit: Emit) -> None:
        """Keep what the finished run measured, and say how far its time was from the estimate shown before it."""
        self.timings.record(plan.base.display_name, device_name(), result.costs)
        guess = plan.estimate
        if guess.seconds is None or not guess.seconds:
            return
        off = (result.seconds - guess.seconds) / guess.seconds
        verdict = "within the estimate" if abs(result.seconds - guess.seconds) <= (guess.margin or 0) else \
            "outside the estimate"
        emit(JobEvent("status", f"Took {format_duration(result.seconds)}; the estimate was about "
                                f"{format_duration(guess.seconds)} (±{format_duration(guess.margin or 0)}): "
                                f"{abs(off):.0%} {'longer' if off > 0 else 'shorter'}, {verdict}. Later estimates "
                                "use what this run measured."))

    def run_folder(self, run: str | None, what: str = "resume") -> RunFolder:
        """A run of outputs/ by its folder name, as the list of runs shows it; never a path elsewhere."""
        if not run:
            raise UserError(f"Pick a run to {what}.")
        if Path(run).name != run or run in (".", "..") or len(run) > 255 or "\0" in run:
            raise UserError(f"{short(run)} is not a run name: {what} takes the name of a folder in outputs/, as the "
                            "list of runs shows it.")
        if not exists(self.workspace.outputs_dir / run):
            raise UserError(f"There is no run {short(run)} in outputs/: pick one from the list of runs.")
        folder = RunFolder(self.workspace.outputs_dir / run)
        folder.read_job()  # a clear message when it is not a run
        return folder

    def resume_training(self, run: str | None, visitor: Visitor = OPERATOR) -> str:
        """Continue an interrupted run of outputs/ by its folder name (the visitor's own, or any for the operator);
        returns the job id that Stop needs."""
        folder = self.run_folder(run)
        job = folder.read_job()
        visitor.require(job.owner, f"Run '{folder.path.name}'")
        self.check_job(job)
        return start_resume(self.jobs, self.cache, folder.path, visitor.name, self.after_run(self.plan_rest(folder)))

    def plan_rest(self, folder: RunFolder) -> TrainingPlan:
        """An interrupted run's estimate for the part still to train: the whole run's, in proportion to the steps
        left, so a resumed run is compared with an estimate too."""
        job = folder.read_job()
        known = self.timings.costs(job.base.display_name, device_name())
        loaded = self.cache.holds == ("pipeline", job.base)
        whole = estimate(job.config, job.data, job.base.kind == DEMO, known, loaded)
        left = max(0, whole.steps - folder.summary().steps) / whole.steps if whole.steps else 1.0
        rest = replace(whole, seconds=whole.seconds * left if whole.seconds is not None else None,
                       margin=whole.margin * left if whole.margin is not None else None)
        return TrainingPlan(job.config, job.base, job.data, rest)

    def training_run(self) -> str | None:
        """The folder name of the run training now, if any."""
        state = self.jobs.latest("training")
        return Path(state.run_dir).name if state.active and state.run_dir else None

    def runs(self) -> list[list[str]]:
        """Every run, newest first: name, status, date, steps and recent loss."""
        running = self.training_run()
        return [run.row(run.name == running) for run in list_runs(self.workspace.outputs_dir)]

    def delete_run(self, run: str | None, visitor: Visitor = OPERATOR) -> str:
        """Delete a run's folder (its LoRA files, samples and resume state) and every served link to them; the
        visitor's own runs only, any for the operator, and never the one training now."""
        folder = self.run_folder(run, "delete")
        visitor.require(folder.read_job().owner, f"Run '{folder.path.name}'")
        if folder.path.name == self.training_run():
            raise UserError(f"Run '{run}' is training now. Stop it first, then delete it.")
        shutil.rmtree(folder.path)
        self.forget_deleted()
        return f"Deleted run {folder.path.name}."

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

    def lora_clip_skip(self, label: str | None) -> int:
        """The CLIP skip a LoRA was trained with (``ss_clip_skip``), 1 or 2; 1 when the file does not say."""
        path = self.lora(label)
        recorded = read_metadata(path).get("ss_clip_skip", "") if path is not None else ""
        return 2 if recorded.isdigit() and int(recorded) >= 2 else 1

    def check_job(self, job: RunJob) -> None:
        """A run's recorded base model and data must pass today's rules, whatever its job.json says."""
        if job.base.allow_pickle:
            raise UserError("This run was recorded with a pickle base model, which the app does not load. Resume it "
                            "from the command line if you trust the file.")
        if job.base.kind in ("single_file", "diffusers"):
            resolve_base(str(self.workspace.check_allowed(job.base.location, "The run's base model")))
        for folder in (job.data.images, job.data.prepared, job.data.regularization):
            if folder is not None:
                self.workspace.check_allowed(folder, "The run's dataset folder")

    def start_caption(self, dataset: str | None, source: str, options: captioning.CaptionOptions,
                      visitor: Visitor = OPERATOR) -> str:
        """Caption a dataset in the background with a BLIP hub id or a local folder inside the allowed ones."""
        source = source.strip()
        if not source:
            raise UserError("Type the path of a local BLIP folder, or pick a BLIP model to download.")
        if not self.is_hub_id(source):
            source = str(self.workspace.check_allowed(source, "The BLIP folder"))
        images = self.dataset_to_change(dataset, visitor)
        self.workspace.set_dataset_settings(str(dataset), options.trigger_word)
        return self.jobs.start("captioning", f"Captioning {dataset}", lambda stop, emit: captioning.caption_dataset(
            self.cache, source, images, options, progress=progress_events(emit, "Captioned {} of {} images"),
            stop=stop, on_wait=status_events(emit)), exclusive=f"captioning {dataset}", owner=visitor.name)

    def start_prepare(self, dataset: str | None, resolution: float, center_crop: bool, visitor: Visitor = OPERATOR,
                      ) -> str:
        """Write a dataset's training copies in the background."""
        images = self.dataset_to_change(dataset, visitor)
        if not math.isfinite(resolution) or not 64 <= resolution <= 2048 or resolution % 64:
            raise UserError(f"Training resolution {resolution}: use a multiple of 64 from 64 to 2048.")
        return self.jobs.start("prepare", f"Preparing {dataset}", lambda stop, emit: quality.prepare_dataset(
            images, images.parent / "prepared", int(resolution), center_crop,
            progress=progress_events(emit, "Prepared {} of {} images"), stop=stop), exclusive=f"preparing {dataset}",
            owner=visitor.name)

    def prepare_again(self, dataset: str | None, visitor: Visitor = OPERATOR) -> str:
        """Refresh a dataset's training copies with the settings of its last Prepare."""
        images = self.images_dir(dataset)
        manifest = read_manifest(images.parent / "prepared")
        if not manifest:
            raise UserError(f"Dataset '{dataset}' has no training copies yet: use Prepare in the Dataset tab.")
        return self.start_prepare(dataset, manifest["resolution"], manifest["center_crop"], visitor)

    def start_grid(self, base: str | None, request: inference.GenerateRequest, labels: list[str],
                   strengths: list[float], visitor: Visitor = OPERATOR) -> str:
        """Render an epochs × strengths grid in the background; its result is the saved PNG's path. The sizes are
        checked before any LoRA is looked up."""
        request.validate()
        self.limits.check(request, len(labels) * len(strengths))
        spec = self.base(base)
        loras = [(label, self.lora(label)) for label in labels]
        folder = self.test_images_dir(visitor)

        def work(stop: threading.Event, emit: Emit) -> str:
            image = inference.compare_grid(self.cache, spec, request, loras, strengths, stop, emit)
            return str(inference.save_png(image, folder / f"grid-{stamp()}.png"))

        return self.jobs.start("grid", "Comparison grid", work, owner=visitor.name)

    def generate(self, base: str | None, request: inference.GenerateRequest,
                 on_wait: Callable[[str], None] | None = None, visitor: Visitor = OPERATOR) -> GeneratedImage:
        """One image, saved with its parameters in the visitor's folder of outputs/test-images."""
        request.validate()
        self.limits.check(request)
        image = inference.generate(self.cache, self.base(base), request, on_wait)
        path = inference.save_png(image, self.test_images_dir(visitor) / f"{stamp()}-{request.seed}.png")
        return GeneratedImage(path, image.info["parameters"], image.info.get("lora", ""))

    def graph(self, base: str | None, request: inference.GenerateRequest) -> list[comfyui.Node]:
        """The ComfyUI graph that makes a Test-tab image, with the base and LoRA by their file names, at the size
        the Test tab renders (the model's own when the request leaves it at 0)."""
        request.validate()
        spec = self.base(base)
        side = default_side(spec)
        return comfyui.build_graph(request, spec.display_name, request.width or side, request.height or side)

    def workflow(self, base: str | None, request: inference.GenerateRequest, api: bool = False,
                 visitor: Visitor = OPERATOR) -> Path:
        """The ComfyUI workflow (UI format, or API format) for a Test-tab image, named after its LoRA and saved in
        the visitor's folder of outputs/test-images."""
        name = request.lora.stem if request.lora is not None else "base-model"
        path = self.test_images_dir(visitor) / f"workflow-{stamp()}" / f"{name}{'.api' if api else ''}.workflow.json"
        return comfyui.write_graph(path, self.graph(base, request), api)

    def queue_in_comfyui(self, base: str | None, request: inference.GenerateRequest) -> str:
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
        return inspect_lora(lora).text()

    def presets(self) -> dict[str, Path]:
        """Every preset a visitor may load, by the name the preset list shows: the built-in ones, then this
        workspace's own (marked as yours)."""
        choices = {name: PRESETS_DIR / f"{name}.toml" for name in list_presets()}
        if self.workspace.presets_dir.is_dir():
            choices.update({f"{name}{YOURS}": self.workspace.presets_dir / f"{name}.toml"
                            for name in list_presets(self.workspace.presets_dir)})
        return choices

    def preset(self, name: str | None) -> tuple[TrainConfig, str]:
        """A preset's settings and description by its name; never a path, and the same answer for any unknown
        name, whether or not such a file exists somewhere."""
        choices = self.presets()
        label = str(name or "").strip()
        path = choices.get(label) or choices.get(f"{label}{YOURS}")
        if path is None:
            raise UserError(f"No preset has that name: pick one of {', '.join(choices)}.")
        return load_preset(str(path))

    def save_preset(self, name: str, config: TrainConfig, visitor: Visitor = OPERATOR) -> str:
        """Save settings as a preset of this workspace; only the operator replaces one that exists."""
        name = (name or "").strip()
        if not DATASET_NAME.match(name) or name in (".", ".."):
            raise UserError("Name the preset with letters, digits, spaces, '.', '-' or '_' (up to 64 characters).")
        path = self.workspace.presets_dir / f"{name}.toml"
        if path.exists():
            visitor.require_operator(f"replace the saved preset '{name}' (save it under another name)")
        save_preset(config, path, "Saved from the app.")
        return f"{name}{YOURS}"

    def public(self, text: str) -> str:
        """Text for a visitor, with the server's own folders shown relative to the workspace."""
        root = re.escape(str(self.workspace.root))
        return re.sub(root + r"(?![\w.-])", "workspace", re.sub(root + re.escape(os.sep), "", text))

    def images_dir(self, dataset: str | None) -> Path:
        """The images folder of a dataset; a clear message when none is chosen."""
        if not dataset:
            raise UserError("Choose or create a dataset first (above the tabs).")
        return self.workspace.dataset_dir(dataset) / "images"


MAX_DEMO_DATASETS = 20  # Load demo dataset is a public endpoint: it must not fill the disk


def lora_name(dataset: str) -> str:
    """A LoRA file name from a dataset's name: spaces and other characters a file name avoids become '-'."""
    return re.sub(r"[^\w.-]", "-", dataset.strip()).lstrip(".-")[:100] or TrainConfig().output_name


def exists(path: Path) -> bool:
    """Whether a visitor's path names something (a link counts); a NUL byte or an over-long name names nothing."""
    try:
        return os.path.lexists(path)
    except (ValueError, OSError):
        return False


def stamp() -> str:
    """A file-name time stamp that sorts, unique per call even within one second."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.perf_counter_ns() % 10**6:06d}"


def progress_events(emit: Emit, text: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that reports as job events."""
    return lambda done, total: emit(JobEvent("progress", text.format(done, total), step=done, total_steps=total))


def status_events(emit: Emit) -> Callable[[str], None]:
    """An ``on_wait`` callback that shows the cache's queue position as the job's message."""
    return lambda text: emit(JobEvent("status", text))
