"""Headless entry point: the same backend as the app, with tqdm progress and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_tools import progress_bar, run_tool, stop_on_interrupt, tool_commands
from .errors import UserError
from .workspace import VALIDATION

if TYPE_CHECKING:
    from collections.abc import Callable

    from .events import JobEvent
    from .request import GenerateRequest
    from .training.result import TrainResult


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings to typed values: JSON where it parses, comma lists for list fields, else text."""
    from .training.config import FIELDS, field_is_list

    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set '{pair}' is not key=value, e.g. --set rank=32.")
        if key in FIELDS and field_is_list(key) and not raw.lstrip().startswith("["):
            overrides[key] = [part.strip() for part in raw.split(",") if part.strip()]
            continue
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and flags."""
    parser = argparse.ArgumentParser(prog="python -m lora_gradio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA")
    train.add_argument("--preset", default="seed-recommended", help="preset name from presets/, or a .toml path")
    train.add_argument("--base", help="checkpoint file, diffusers folder, hub id, or 'demo' (the default)")
    train.add_argument("--data", type=Path, help="folder of images with .txt captions (demo data if omitted)")
    train.add_argument("--output", type=Path, required=True, help="folder for the .safetensors files")
    train.add_argument("--repeats", type=int, help="how often an epoch shows each image, 1 unless said (kohya's "
                                                    "N_ prefix; N_name subfolders keep their own)")
    train.add_argument("--reg-data", type=Path, help="a folder (or dataset) of regularisation images of the class, "
                                                     "for prior preservation; weight them with prior_loss_weight")
    train.add_argument("--val-data", type=Path, help="a folder (or dataset) of other images of the same subject to "
                                                     "measure overfitting on, instead of holding some of --data out")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a preset field, e.g. --set rank=32 --set trigger_word=ohwx")
    train.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt base models (they can run code)")
    train.add_argument("--kohya-config", type=Path, action="append", default=[], metavar="FILE",
                       help="a kohya_ss GUI .json, or an sd-scripts training or dataset .toml (repeatable): its "
                            "settings over the preset's and under --set; its folders and base where --data, "
                            "--reg-data, --repeats and --base are not given")

    gen = sub.add_parser("generate", help="generate an image with a LoRA",
                         formatter_class=ShownDefaults)
    image_settings(gen, "--prompt")
    gen.add_argument("--output", type=Path, required=True, help="PNG file to write")
    gen.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt base model (it can run code)")

    flow = sub.add_parser("workflow", help="write the ComfyUI workflow JSON that uses a LoRA",
                          formatter_class=ShownDefaults)
    image_settings(flow, "--prompt", "ohwx, portrait photo")
    flow.add_argument("--format", choices=["ui", "api"], default="ui",
                      help="ui: drop onto ComfyUI or open with Load; api: what ComfyUI's /prompt takes")
    flow.add_argument("--output", type=Path, help="JSON file to write")
    flow.add_argument("--queue", nargs="?", const="http://127.0.0.1:8188", metavar="URL",
                      help="also queue it in a running ComfyUI (default address http://127.0.0.1:8188)")

    install = sub.add_parser("install", help="copy a LoRA into a ComfyUI install's models/loras")
    install.add_argument("lora", type=Path, help="the .safetensors LoRA")
    install.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder (or its models folder)")
    install.add_argument("--base", help="the base checkpoint file, to check that ComfyUI has it too")
    install.add_argument("--link-base", action="store_true", help="link the base checkpoint into ComfyUI if missing")
    install.add_argument("--replace", action="store_true", help="replace a different file of the same name")

    inspect = sub.add_parser("inspect", help="what a LoRA file holds and whether it fits SD1.5")
    inspect.add_argument("lora", type=Path)

    resume = sub.add_parser("resume", help="continue an interrupted training run")
    resume.add_argument("run", type=Path, help="the run's output folder (it holds job.json)")

    brought = sub.add_parser("import", help="import photos, captions, zips and folders into a training folder")
    brought.add_argument("sources", type=Path, nargs="*", help="images, .txt captions, .zip files or folders")
    brought.add_argument("--into", type=Path, required=True, help="the folder to train on (train --data)")
    brought.add_argument("--demo", action="store_true",
                         help="also write the demo dataset: 20 captioned rings for the demo base to learn")

    queue = sub.add_parser("queue", help="see a running app's training queue, add a run to it, or change it",
                           formatter_class=ShownDefaults)
    queue.add_argument("--url", default="http://127.0.0.1:7860", help="the running app")
    queue.add_argument("--auth", default=os.environ.get("LORA_GRADIO_AUTH", "").split(",")[0] or None,
                       metavar="USER:PASSWORD", help="your login to the app (env LORA_GRADIO_AUTH: its first entry)")
    queue.add_argument("--add", metavar="DATASET", help="queue a run on this dataset of the app")
    queue.add_argument("--preset", default="seed-recommended", help="with --add: a preset the app has")
    queue.add_argument("--base", default="demo", help="with --add: a base model the app offers")
    queue.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="with --add: override a preset field")
    queue.add_argument("--cancel", metavar="RUN", help="take your waiting run out of the queue")
    queue.add_argument("--move", nargs=2, metavar=("RUN", "PLACE"), help="the operator: put a waiting run at PLACE")

    sub.add_parser("presets", help="list the presets")
    caption_command(sub)
    tool_commands(sub, ShownDefaults)
    return parser


def caption_command(sub: argparse._SubParsersAction) -> None:
    """``caption``: the Caption tab's captioners and options on a folder of images."""
    caption = sub.add_parser("caption", help="caption a folder of images: BLIP or Florence-2 sentences, or a WD "
                                             "tagger's tags", formatter_class=ShownDefaults)
    caption.add_argument("images", type=Path, help="the images; each caption is written beside as a .txt")
    caption.add_argument("--model", default="Salesforce/blip-image-captioning-base",
                         help="a hub id or a local folder of BLIP, Florence-2 (florence-community/Florence-2-base) or "
                              "a WD tagger (SmilingWolf/wd-vit-tagger-v3)")
    caption.add_argument("--trigger", default="", help="the trigger word, always first")
    caption.add_argument("--prefix", default="")
    caption.add_argument("--suffix", default="")
    caption.add_argument("--overwrite", action="store_true", help="caption every image, not only those without one")
    caption.add_argument("--style", choices=["sentence", "tags"], default="sentence",
                         help="BLIP and Florence-2: tags cuts the sentence into short phrases")
    caption.add_argument("--detail", choices=["short", "detailed", "paragraph"], default="detailed",
                         help="Florence-2: <CAPTION>, <DETAILED_CAPTION> or <MORE_DETAILED_CAPTION>")
    caption.add_argument("--max-length", type=int, default=40, help="BLIP and Florence-2: tokens at most")
    caption.add_argument("--batch-size", type=int, default=8)
    caption.add_argument("--general-threshold", type=float, default=0.35, help="WD tagger: general tags from")
    caption.add_argument("--character-threshold", type=float, default=0.85, help="WD tagger: character tags from")
    caption.add_argument("--ratings", action="store_true", help="WD tagger: add the rating tag")
    caption.add_argument("--underscores", action="store_true", help="WD tagger: keep underscores (long_hair)")
    caption.add_argument("--blacklist", default="", help="WD tagger: comma-separated tags never written")


class ShownDefaults(argparse.HelpFormatter):
    """Help that states each flag's default, where it has one worth stating."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        silent = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        if not silent and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def image_settings(parser: argparse.ArgumentParser, prompt: str, default_prompt: str | None = None) -> None:
    """The flags of one image: base, LoRA, prompt, sampler and the two ComfyUI strengths."""
    parser.add_argument("--base", default="demo", help="checkpoint file (for workflow: its name in ComfyUI)")
    parser.add_argument("--lora", type=Path, help="the .safetensors LoRA; none: the base model alone")
    parser.add_argument(prompt, required=default_prompt is None, default=default_prompt,
                        help="what to draw; start it with the LoRA's trigger word")
    parser.add_argument("--negative", default="", help="what to keep out of the image")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same image")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--cfg", type=float, default=7.0, help="how closely to follow the prompt (guidance scale)")
    parser.add_argument("--width", type=int, help="pixels; default: the base model's own (512 for SD1.5)")
    parser.add_argument("--height", type=int, help="pixels; default: the base model's own (512 for SD1.5)")
    parser.add_argument("--scheduler", default="Euler", help="Euler, 'Euler a', 'DPM++ 2M Karras' or DDIM")
    parser.add_argument("--strength-model", type=float, default=1.0, help="LoRA strength on the UNet (ComfyUI)")
    parser.add_argument("--strength-clip", type=float, default=1.0, help="LoRA strength on the text encoder")
    parser.add_argument("--clip-skip", type=int, default=1, choices=(1, 2), help="2: CLIP's second-to-last layer")


def image_request(args: argparse.Namespace) -> GenerateRequest:
    """The image flags as a checked request."""
    from .request import GenerateRequest

    return GenerateRequest.checked(args.prompt, args.negative, args.seed, args.steps, args.cfg, args.width,
                                   args.height, args.scheduler, args.lora, args.strength_model, args.strength_clip,
                                   args.clip_skip)


def run_workflow(args: argparse.Namespace) -> int:
    """Write the ComfyUI graph for the flags, with the checkpoint and LoRA by file name."""
    from . import comfyui

    if args.output is None and args.queue is None:
        raise UserError("Give --output FILE.json, --queue, or both.")
    request = image_request(args)
    nodes = comfyui.build_graph(request, Path(args.base).name, args.width or 512, args.height or 512)
    if args.output is not None:
        print(comfyui.write_graph(args.output, nodes, args.format == "api"))
    if args.queue is not None:
        print(comfyui.queue(args.queue, comfyui.api_prompt(nodes)), file=sys.stderr)
    return 0


def run_install(args: argparse.Namespace) -> int:
    """Copy a LoRA into ComfyUI, and check (or link) its base checkpoint there."""
    from . import comfyui
    from .models import resolve_base

    models = comfyui.models_folder(args.comfyui)
    print(comfyui.install_lora(args.lora, models, args.replace))
    if args.base:
        base = resolve_base(args.base)
        note = comfyui.checkpoint_note(base, models)
        if note and args.link_base:
            print(comfyui.link_checkpoint(base, models))
        elif note:
            print(note.replace("with 'Link the base model'", "with --link-base"))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print the LoRA inspector's report."""
    from .lora_map import inspect_lora

    print(inspect_lora(args.lora).text())
    return 0


def run_train(args: argparse.Namespace) -> int:
    """Start a run from a preset, the overrides and a dataset."""
    from dataclasses import replace

    from .demo.shapes import DEMO_TRIGGER, make_demo_dataset, make_demo_validation
    from .jobs import run_training
    from .models import DEMO, DEMO_NOTE, resolve_base
    from .training.config import load_preset
    from .training.data import TrainData
    from .training.kohya_config import KohyaSettings, read_kohya_files

    config, _ = load_preset(args.preset)
    found = read_kohya_files(args.kohya_config) if args.kohya_config else KohyaSettings("")
    if args.kohya_config:
        print(found.summary(), file=sys.stderr)
    config = found.config(config, parse_overrides(args.overrides))
    base = resolve_base(args.base or found.folders.get("base") or DEMO, allow_pickle=args.allow_pickle)
    data, prepared, validation = args.data or found.path("data"), None, images_of(args.val_data)
    if data is not None and (data / "images").is_dir():  # a dataset folder of the app: images/, prepared/ ...
        prepared = data / "prepared" if (data / "prepared").is_dir() else None
        own = data / VALIDATION if validation is None and (data / VALIDATION).is_dir() else None  # ... validation/
        print(f"{data} is a lora-gradio dataset: training on its images/ (with their captions)"
              + (", with its prepared/ training copies" if prepared else "")
              + (", validating on its validation/ images" if own else "") + ".", file=sys.stderr)
        data, validation = data / "images", validation or own
    if data is None:
        if base.kind != DEMO:
            raise UserError("--data is required unless --base demo (which can make its own demo images).")
        config = replace(config, trigger_word=config.trigger_word or DEMO_TRIGGER)  # the samples' {trigger}
        data = make_demo_dataset(Path(args.output) / "demo-dataset" / "images", config.trigger_word)
        validation = validation or make_demo_validation(data.parent / VALIDATION, config.trigger_word)
    if base.kind == DEMO:
        print(DEMO_NOTE, file=sys.stderr)
    regularization = images_of(args.reg_data or found.path("regularization"))
    plan = TrainData(data, prepared, regularization, args.repeats or found.repeats or 1, validation)
    return with_progress(lambda on_event, stop: run_training(config, base, plan, args.output, on_event, stop))


def images_of(folder: Path | None) -> Path | None:
    """A folder of images as given, or a dataset folder of the app's by its images/."""
    return folder / "images" if folder is not None and (folder / "images").is_dir() else folder


def run_import(args: argparse.Namespace) -> int:
    """Import as the Dataset tab does: a line for each file that was skipped or needs a look, then the summary."""
    from .demo.shapes import DEMO_CHECK_IMAGES, DEMO_IMAGES, DEMO_TRIGGER, make_demo_dataset, make_demo_validation
    from .imports import import_folder, import_sources

    if not args.sources and not args.demo:
        raise UserError("Name the images, captions, zips or folders to import, or --demo for the demo dataset.")
    if args.demo:
        make_demo_dataset(args.into)
        checks = ""
        if args.into.name == "images":  # a dataset of the app: its validation rings go beside
            make_demo_validation(args.into.parent / VALIDATION)
            checks = f", and {DEMO_CHECK_IMAGES} more to validate on into {args.into.parent / VALIDATION}"
        print(f"Wrote the demo dataset into {args.into}: {DEMO_IMAGES} rings captioned '{DEMO_TRIGGER}, a … "
              f"{DEMO_TRIGGER} on a … background'{checks}. Train it on the demo base: python -m lora_gradio train "
              f"--preset demo --data {args.into.parent if checks else args.into} --output OUT")
    reports = [import_folder(source, args.into) if source.is_dir() else import_sources([source], args.into)
               for source in args.sources]
    for report in reports:
        for result in report.shown:
            if result.status != "imported":
                print(f"{result.status}: {result.name}: {result.message}", file=sys.stderr)
        print(report.summary())
    return 0


def run_resume(args: argparse.Namespace) -> int:
    """Continue an interrupted run where its last save left off."""
    from .jobs import resume_training

    return with_progress(lambda on_event, stop: resume_training(args.run, on_event, stop))


def with_progress(work: Callable[[Callable, threading.Event], TrainResult]) -> int:
    """Run training with a tqdm bar and messages on stderr; Ctrl-C stops cleanly and saves what was learned."""
    from tqdm import tqdm

    stop = stop_on_interrupt()
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch, only rank 0 reports
    bars: list[tqdm] = []  # made at the first step, so a run that fails before it prints no empty bar

    def on_event(event: JobEvent) -> None:
        if not main_process:
            return
        if event.kind == "step":
            if not bars:
                bars.append(tqdm(total=event.total_steps, initial=event.step - 1, unit="step", dynamic_ncols=True))
            bars[0].set_postfix(epoch=f"{event.epoch}/{event.total_epochs}", loss=f"{event.loss:.4f}",
                                lr=f"{event.lr:.2e}")
            bars[0].update(event.step - bars[0].n)
        elif event.message:
            prefix = f"{event.kind}: " if event.kind in ("warning", "error") else ""
            tqdm.write(prefix + event.message, file=sys.stderr)

    try:
        result = work(on_event, stop)
    finally:
        for bar in bars:
            bar.close()
    if main_process:
        print(result.summary(), file=sys.stderr)
        print(result.lora_path)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """One image to a PNG file."""

    from .cache import ModelCache
    from .inference import generate, save_png
    from .models import resolve_base

    request = image_request(args)
    base = resolve_base(args.base, allow_pickle=args.allow_pickle)
    image = generate(ModelCache(), base, request)
    save_png(image, args.output)
    if "lora" in image.info:
        print(image.info["lora"], file=sys.stderr)
    print(args.output)
    return 0


def run_queue(args: argparse.Namespace) -> int:
    """Change a running app's queue as asked, through its API as the page does, then print the queue."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    user, _, password = (args.auth or "").partition(":")
    try:
        client = Client(args.url, auth=(user, password) if args.auth else None, verbose=False)
        if args.add:
            settings = client.predict(args.preset, api_name="/preset")
            settings.update(parse_overrides(args.overrides))
            answer = client.predict(args.add, args.base, settings, "", 1, "", api_name="/train_start")
            print(f"{answer['message']} Its job id, the key to stopping it: {answer['job_id']}", file=sys.stderr)
        if args.cancel:
            print(client.predict(args.cancel, api_name="/queue_cancel"), file=sys.stderr)
        if args.move:
            run, place = args.move
            if not place.isdigit():
                raise UserError(f"--move {run} {place}: the place is a whole number from 1.")
            print(client.predict(run, int(place), api_name="/queue_move"), file=sys.stderr)
        rows = client.predict(api_name="/queue")
    except AppError as exc:
        raise UserError(str(exc)) from exc
    except (OSError, ValueError) as exc:  # nothing answers there, or not this app, or the login was refused
        raise UserError(f"No lora-gradio app answered at {args.url} ({exc}). Start it with python app.py, or give "
                        "--url and --auth.") from exc
    for row in rows or [{"place": "", "run": "The queue is empty: nothing trains or waits."}]:
        print("  ".join(str(value) for value in row.values()))
    return 0


def run_caption(args: argparse.Namespace) -> int:
    """Caption as the Caption tab does, with a bar per image; Ctrl-C stops between batches, keeping what was
    written."""
    from .cache import ModelCache
    from .captioning import CaptionOptions, caption_dataset

    options = CaptionOptions(args.trigger, args.prefix, args.suffix, args.max_length, args.style, args.overwrite,
                             args.batch_size, args.detail, args.general_threshold, args.character_threshold,
                             args.ratings, args.underscores, args.blacklist)
    if not args.images.is_dir():
        raise UserError(f"{args.images} is not a folder of images.")
    with progress_bar("image") as emit:
        result = caption_dataset(ModelCache(), args.model, args.images, options, emit, stop_on_interrupt())
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"{'Stopped: c' if result.stopped else 'C'}aptioned {len(result.written)} images; kept "
          f"{len(result.skipped)} existing captions.")
    return 0


def run_presets(_args: argparse.Namespace) -> int:
    """List the presets with their descriptions."""
    from .training.config import list_presets, load_preset

    for name in list_presets():
        print(f"{name:18} {load_preset(name)[1]}")
    return 0


COMMANDS = {"train": run_train, "generate": run_generate, "resume": run_resume, "import": run_import,
            "workflow": run_workflow, "install": run_install, "inspect": run_inspect, "presets": run_presets,
            "queue": run_queue, "caption": run_caption, "resize": run_tool, "merge": run_tool, "bake": run_tool,
            "extract": run_tool}


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn user errors into one line and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
