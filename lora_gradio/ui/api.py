"""The public API: named endpoints with declared inputs, making the same :class:`Studio` calls as the page.

Long work (captioning, Prepare, grids) runs as a job, as from the page; these endpoints wait for it and return its
result. Training returns at once with the job id that ``/train_stop`` needs.
"""

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from ..access import Visitor
from ..jobs import JobState
from ..request import GenerateRequest, short
from ..studio import DEFAULT_BLIP, QUEUE_COLUMNS, CaptionOptions, RankRule, Studio
from .common import MODEL, api_errors, public_text, shown, uploaded, visitor_of

KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
REQUEST = inspect.Parameter("request", KEYWORD, annotation=gr.Request)
IMAGE_PARAMETERS = [  # what /generate, /workflow and /comfyui_queue take, in this order (then clip_skip)
    inspect.Parameter("prompt", KEYWORD, annotation=str),
    *(inspect.Parameter(name, KEYWORD, default=default, annotation=type(default)) for name, default in (
        ("negative_prompt", ""), ("seed", 0), ("steps", 20), ("cfg", 7.0), ("width", 0), ("height", 0),
        ("scheduler", "Euler"), ("lora", ""), ("strength_model", 1.0), ("strength_clip", 1.0), ("base", "demo")))]
CLIP_SKIP = inspect.Parameter("clip_skip", KEYWORD, default=1, annotation=int)


def plain(value: Any) -> Any:
    """A job's result or state, or a list of outcomes, as JSON values (dataclasses as objects, paths as strings
    relative to the workspace: an answer never shows the server's own layout)."""
    def convert(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return dataclasses.asdict(item)
        return str(item)

    def public(item: Any) -> Any:
        if isinstance(item, str):
            return public_text(item)
        if isinstance(item, list):
            return [public(i) for i in item]
        if isinstance(item, dict):
            return {key: public(i) for key, i in item.items()}
        return item

    return public(json.loads(json.dumps(value, default=convert)))


def register(studio: Studio) -> None:
    """Add every public endpoint to the Blocks being built. Each one that starts, changes or deletes something
    acts for the visitor behind the request (the page's events check the same)."""

    def visitor(request: gr.Request) -> Visitor:
        return visitor_of(studio, request)

    def finished(job_id: str) -> JobState:
        state = studio.jobs.wait(job_id)
        if state.status != "done":
            raise gr.Error(public_text(state.message), print_exception=False)
        return state

    def imported(job_id: str) -> dict:
        """An import job's summary line and each file's outcome, once it has ended."""
        report = finished(job_id).result
        return {"summary": report.summary(), "files": plain(report.shown)}

    def image_endpoint(*extra: inspect.Parameter) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """An endpoint over the image settings of IMAGE_PARAMETERS (then ``extra``, then clip_skip), declared once:
        the decorated body gets the visitor's request, the checked GenerateRequest, the base and the extras."""
        def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
            names = [p.name for p in extra]
            signature = inspect.Signature([REQUEST, *IMAGE_PARAMETERS, *extra, CLIP_SKIP],
                                          return_annotation=inspect.signature(body).return_annotation)

            def endpoint(*args: Any, **kwargs: Any) -> Any:
                given = signature.bind(*args, **kwargs)
                given.apply_defaults()
                values = given.arguments
                wanted = GenerateRequest.checked(
                    values["prompt"], values["negative_prompt"], values["seed"], values["steps"], values["cfg"],
                    values["width"] or None, values["height"] or None, values["scheduler"],
                    studio.lora(values["lora"]), values["strength_model"], values["strength_clip"],
                    values["clip_skip"])
                return body(values["request"], wanted, values["base"], *(values[name] for name in names))

            endpoint.__name__, endpoint.__doc__, endpoint.__signature__ = body.__name__, body.__doc__, signature
            endpoint.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
            endpoint.__annotations__["return"] = signature.return_annotation
            return endpoint

        return decorate

    def train_start(request: gr.Request, dataset: str, base: str = "demo", settings: dict | None = None,
                    regularization: str = "", repeats: int = 1, validation: str = "") -> dict:
        """Start training on a dataset. ``settings`` holds TrainConfig fields (a preset's, from /preset, changed as
        you like); an unknown key is refused by name. ``regularization`` names another dataset of class images
        (prior preservation); ``repeats`` is how often an epoch shows each image; ``validation`` names a dataset of
        the same subject to measure overfitting on (without it, ``validation_images`` of this one are held out).
        The returned estimate says which. Keep the returned job_id: /train_stop needs it."""
        plan = studio.plan_training(dataset, base, settings or {}, regularization or None, repeats,
                                    validation or None)
        job_id = studio.start_training(plan, visitor(request))
        state = studio.jobs.view(job_id)
        return {"job_id": job_id, "run": Path(state.run_dir).name, "estimate": plan.estimate.markdown(),
                "queued": state.position, "message": studio.queue_line(state)}

    def train_stop(request: gr.Request, job_id: str) -> str:
        """Stop the training job started with this id (by this login, or any as the operator); it saves what was
        learned."""
        studio.jobs.stop(job_id, visitor(request))
        return "stopping"

    def train_resume(request: gr.Request, run: str) -> dict:
        """Continue an interrupted run (its folder name under outputs/), through the queue like a new one; returns
        the new job id and its place in the queue (0: it trains now)."""
        job_id = studio.resume_training(run, visitor(request))
        state = studio.jobs.view(job_id)
        return {"job_id": job_id, "run": Path(run).name, "queued": state.position,
                "message": studio.queue_line(state)}

    def queue(request: gr.Request) -> list[dict]:
        """The training queue, as every visitor sees it: what trains now, then what waits, in order, with who
        added each run ("(you)" on your own), its steps and its expected start."""
        return [dict(zip(QUEUE_COLUMNS, row, strict=True)) for row in studio.queue_rows(visitor(request))]

    def queue_cancel(request: gr.Request, run: str) -> str:
        """Take a waiting run out of the queue: your own, or any as the operator. (A run that trains already stops
        with /train_stop.)"""
        return studio.cancel_queued(run, visitor(request))

    def queue_move(request: gr.Request, run: str, position: int) -> str:
        """Put a waiting run at ``position`` in the queue (1: next to start); the operator only."""
        return studio.move_in_queue(run, position, visitor(request))

    def job_status(job_id: str = "", since: int = 0) -> dict:
        """A job's state (without an id: the current training job's), with losses from index ``since`` on."""
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise gr.Error(f"since = {short(since)}: use a whole number from 0 (the first loss to return).",
                           print_exception=False)
        return plain(studio.jobs.view(job_id, since) if job_id else studio.jobs.latest("training", since))

    def preset(name: str = "seed-recommended") -> dict:
        """A preset's settings by its name (a built-in one, or one saved in this workspace), ready to change and
        pass to /train_start."""
        return studio.preset(name)[0].to_dict()

    def import_kohya_config(files: list[FileData], preset: str = "seed-recommended") -> dict:
        """Settings from kohya_ss GUI .json or sd-scripts training and dataset .toml files (upload with
        ``handle_file``): ``settings`` (the preset's, the files' on top, ready for /train_start), ``repeats``, the
        ``folders`` they name, and ``not_used``: every key with no counterpart here, with its value."""
        config, found = studio.import_kohya_config(uploaded(files), preset)
        return {"settings": config.to_dict(), "repeats": found.repeats, "folders": found.folders,
                "not_used": found.not_used, "summary": found.summary()}

    @image_endpoint()
    def generate(request: gr.Request, wanted: GenerateRequest, base: str) -> dict:
        """One image; ``lora`` is a label from the Test tab's list (run/file or loras/file), empty for none. The
        answer's ``lora`` says which of the file's modules were applied."""
        made = studio.generate(base, wanted, visitor=visitor(request))
        return {"image": FileData(path=shown(made.path)), "parameters": made.parameters, "lora": made.lora}

    @image_endpoint(inspect.Parameter("api_format", KEYWORD, default=False, annotation=bool))
    def workflow(request: gr.Request, wanted: GenerateRequest, base: str, api_format: bool) -> FileData:
        """The ComfyUI workflow for these settings: the UI format (drop it onto ComfyUI) or, with ``api_format``,
        what ComfyUI's ``/prompt`` takes."""
        return FileData(path=shown(studio.workflow(base, wanted, api_format, visitor(request))))

    @image_endpoint()
    def comfyui_queue(request: gr.Request, wanted: GenerateRequest, base: str) -> str:
        """Queue the workflow for these settings in the ComfyUI the operator set (--comfyui-url); ComfyUI's answer,
        or its error word for word."""
        return studio.queue_in_comfyui(base, wanted)

    def comfyui_install(request: gr.Request, lora: str, base: str = "demo", replace: bool = False) -> str:
        """Copy a LoRA of this workspace into the shared ComfyUI's models/loras (see Workspace settings); only the
        operator replaces a file already there."""
        return studio.send_to_comfyui(lora, base, replace, visitor(request))

    def inspect_lora(lora: str) -> str:
        """The LoRA inspector's report (layout, model family, ranks, metadata, unmapped keys) as plain text."""
        return studio.inspect(lora)

    def grid(request: gr.Request, loras: list[str], strengths: list[float], prompt: str, negative_prompt: str = "",
             seed: int = 0, steps: int = 20, cfg: float = 7.0, scheduler: str = "Euler", base: str = "demo",
             clip_skip: int = 1) -> dict:
        """A grid of LoRA files (rows) by strengths (columns, applied to model and clip alike)."""
        wanted = GenerateRequest.checked(prompt, negative_prompt, seed, steps, cfg, scheduler=scheduler,
                                         clip_skip=clip_skip)
        state = finished(studio.start_grid(base, wanted, list(loras or []), list(strengths or []),
                                           visitor(request)))
        return {"image": FileData(path=shown(state.result.path))}

    def caption(request: gr.Request, dataset: str, model: str = DEFAULT_BLIP, trigger_word: str = "",
                prefix: str = "", suffix: str = "", style: str = "sentence", overwrite: bool = False,
                max_length: int = 40, batch_size: int = 8, detail: str = "detailed", general_threshold: float = 0.35,
                character_threshold: float = 0.85, ratings: bool = False, underscores: bool = False,
                blacklist: str = "") -> dict:
        """Captions for a dataset; ``model`` is a hub id or a local folder inside the allowed ones, of BLIP,
        Florence-2 (``detail``: short, detailed, paragraph) or a WD tagger (the thresholds, ``ratings``,
        ``underscores`` and a comma-separated ``blacklist``)."""
        options = CaptionOptions(trigger_word, prefix, suffix, max_length, style, overwrite, batch_size, detail,
                                 general_threshold, character_threshold, ratings, underscores, blacklist)
        return plain(finished(studio.start_caption(dataset, model, options, visitor(request))).result)

    def prepare(request: gr.Request, dataset: str, resolution: int = 512, center_crop: bool = False) -> dict:
        """Write the dataset's training copies at ``resolution``."""
        result = finished(studio.start_prepare(dataset, resolution, center_crop, visitor(request))).result
        return {"prepared": result.done, "skipped": result.skipped}

    def import_folder(request: gr.Request, dataset: str, folder: str) -> dict:
        """Import a server folder (inside the workspace or one the operator allowed) into a dataset: a summary line
        and each file's outcome."""
        return imported(studio.start_import_folder(dataset, folder, visitor(request)))

    def import_files(request: gr.Request, dataset: str, files: list[FileData]) -> dict:
        """Import uploaded images, ``.txt`` captions and zips into a dataset: a summary line and each file's
        outcome (upload with gradio_client's ``handle_file``)."""
        return imported(studio.start_import_uploads(dataset, uploaded(files), visitor(request)))

    def create_dataset(request: gr.Request, name: str) -> str:
        """Create an empty dataset (a folder under datasets/), yours to change and delete; returns its name."""
        return studio.create_dataset(name, visitor(request))

    def load_demo_dataset(request: gr.Request) -> str:
        """Create the demo dataset (20 captioned rings the demo base can learn), yours; returns its name."""
        return studio.load_demo_dataset(visitor(request))

    def delete_dataset(request: gr.Request, name: str) -> str:
        """Delete a dataset of yours (the operator: any) with its images, captions and training copies."""
        return studio.delete_dataset(name, visitor(request))

    def set_models_dir(request: gr.Request, folder: str) -> str:
        """Share models with a ComfyUI install's models folder (inside the allowed folders); empty for none. Only
        the operator changes it."""
        return studio.set_models_dir(folder, visitor(request))

    def download_lora(lora: str) -> FileData:
        """A LoRA file of this workspace by its label (run/file.safetensors or loras/file.safetensors)."""
        path = studio.lora(lora)
        if path is None:
            raise gr.Error("Name a LoRA file, such as run-name/lora.safetensors.", print_exception=False)
        return FileData(path=shown(path))

    def runs() -> list[dict]:
        """Every training run, newest first: its name, status, date, steps, recent loss, lowest validation loss
        (with its epoch) and the recommended epoch and strength."""
        return [dict(zip(("run", "status", "date", "steps", "loss", "validation", "recommended"), row, strict=True))
                for row in studio.runs()]

    def recommendation(run: str = "") -> dict:
        """Which epoch file of a run to use and at what strength (the latest run's when none is named), with the
        reasons and every saved epoch's scores: the run's recommendation.json, or what its saves so far say."""
        advice = studio.recommendation(run or None)
        if advice is None:
            raise gr.Error("This run has no recommendation yet: it comes with the first saved epoch.",
                           print_exception=False)
        return advice.record()

    def delete_run(request: gr.Request, run: str) -> str:
        """Delete a run of yours (the operator: any), its folder under outputs/ with its LoRA files; never the one
        training now."""
        return studio.delete_run(run, visitor(request))

    def tool_result(job_id: str) -> dict:
        """A tool job's file (``lora``: its label for /generate, when it is a LoRA), summary, notes and modules."""
        report = finished(job_id).result
        return {"file": studio.workspace.relative(report.path), "lora": studio.tool_label(report.path) or "",
                "summary": public_text(report.summary()), "notes": plain(report.notes),
                "modules": plain(report.modules)}

    def rule(rank: int, method: str, value: float) -> RankRule:
        return RankRule(rank, method, value).check()

    def lora_resize(request: gr.Request, lora: str, rank: int, method: str = "fixed", value: float = 0.0,
                    name: str = "") -> dict:
        """Resize a LoRA of the workspace (a label, as /generate takes) by SVD into models/loras: ``rank`` for
        every module, or at most ``rank`` with ``method`` sv_fro (keep ``value`` of each change's Frobenius norm)
        or sv_ratio (singular values down to the largest / ``value``). Each module's new rank and error come back."""
        return tool_result(studio.start_resize(lora, rule(rank, method, value), name, visitor(request)))

    def lora_merge(request: gr.Request, loras: list[str], weights: list[float] | None = None, rank: int = 0,
                   method: str = "fixed", value: float = 0.0, name: str = "") -> dict:
        """Merge LoRAs at weights (one per file; none: 1 each) into one in models/loras: ranks side by side
        (``rank`` 0, exact), or by SVD to ``rank``."""
        compress = rule(rank, method, value) if rank else None
        return tool_result(studio.start_merge(list(loras or []), list(weights or []), compress, name,
                                              visitor(request)))

    def lora_bake(request: gr.Request, lora: str, strength_model: float = 1.0, strength_clip: float = 1.0,
                  base: str = "demo", precision: str = "fp16", name: str = "") -> dict:
        """Bake a LoRA at ComfyUI's strengths into the base, as a single-file checkpoint in models/checkpoints
        (the operator only)."""
        return tool_result(studio.start_bake(base, lora, strength_model, strength_clip, precision, name,
                                             visitor(request)))

    def lora_extract(request: gr.Request, tuned: str, rank: int = 32, conv_rank: int = 0, method: str = "fixed",
                     value: float = 0.0, base: str = "demo", name: str = "") -> dict:
        """Extract a LoRA from a fine-tuned checkpoint (in models/checkpoints) against its base into models/loras;
        ``conv_rank`` above 0 takes the 3×3 convs too (LoCon)."""
        convs = rule(conv_rank, method, value) if conv_rank else None
        return tool_result(studio.start_extract(base, tuned, rule(rank, method, value), convs, name,
                                                visitor(request)))

    def cache_status() -> dict:
        """What the model cache holds, who uses it, who waits, and how many loaded models are still in memory."""
        return plain(studio.cache.status())

    for endpoint in (train_start, train_stop, train_resume, queue_cancel, queue_move, preset, import_kohya_config,
                     workflow, comfyui_queue,
                     comfyui_install, inspect_lora, grid, caption, prepare, import_folder, import_files,
                     create_dataset, load_demo_dataset, delete_dataset, set_models_dir, download_lora,
                     recommendation, delete_run, lora_resize, lora_merge, lora_bake, lora_extract):
        gr.api(api_errors(endpoint), api_name=endpoint.__name__)
    for endpoint in (job_status, queue, runs, cache_status):  # quick reads never wait behind uploads or training
        gr.api(api_errors(endpoint), api_name=endpoint.__name__, concurrency_limit=None)
    gr.api(api_errors(generate), api_name="generate", **MODEL)
