"""The LoRA tools on the command line: resize, merge, bake and extract, with a tqdm bar and the report."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .lora_svd import METHODS
from .lora_tools import DTYPES

if TYPE_CHECKING:
    from .events import JobEvent


def tool_commands(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    """resize, merge, bake and extract: the Test tab's LoRA tools (``formatter``: the CLI's help style)."""
    resize = sub.add_parser("resize", help="a LoRA at a lower rank, by SVD (LoCon and DoRA too)",
                            formatter_class=formatter)
    resize.add_argument("lora", type=Path, help="the .safetensors LoRA")
    rank_flags(resize, "the rank to keep (the most, with --method)")
    resize.add_argument("--output", type=Path, required=True, help="the new .safetensors file")

    merge = sub.add_parser("merge", help="several LoRAs at weights as one", formatter_class=formatter)
    merge.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files, each with its weight (1 if none)")
    merge.add_argument("--rank", type=int, help="compress to this rank by SVD; none: the ranks side by side (exact)")
    merge.add_argument("--method", choices=sorted(METHODS), default="fixed", help="with --rank: " + ", ".join(
        f"{name}: {text}" for name, text in METHODS.items()))
    merge.add_argument("--value", type=float, default=0.0, help="the share for sv_fro, the ratio for sv_ratio")
    merge.add_argument("--output", type=Path, required=True, help="the new .safetensors file")

    bake = sub.add_parser("bake", help="a LoRA merged into its base, as a single-file checkpoint",
                          formatter_class=formatter)
    bake.add_argument("--base", required=True, help="checkpoint file, diffusers folder, hub id, or 'demo'")
    bake.add_argument("--lora", type=Path, required=True, help="the .safetensors LoRA")
    bake.add_argument("--strength-model", type=float, default=1.0, help="LoRA strength on the UNet (ComfyUI)")
    bake.add_argument("--strength-clip", type=float, default=1.0, help="LoRA strength on the text encoder")
    bake.add_argument("--precision", choices=DTYPES, default="fp16", help="the checkpoint's weights")
    bake.add_argument("--output", type=Path, required=True, help="the checkpoint .safetensors to write")

    extract = sub.add_parser("extract", help="a LoRA from a fine-tuned checkpoint and its base, by SVD",
                             formatter_class=formatter)
    extract.add_argument("--base", required=True, help="the base the fine-tune was made from")
    extract.add_argument("--tuned", type=Path, required=True, help="the fine-tuned single-file .safetensors")
    rank_flags(extract, "the rank of each module (the most, with --method)")
    extract.add_argument("--conv-rank", type=int, default=0, help="also 3×3 convs (LoCon) at this rank; 0: none")
    extract.add_argument("--output", type=Path, required=True, help="the new .safetensors LoRA")


def rank_flags(parser: argparse.ArgumentParser, rank_help: str) -> None:
    """--rank, --method and --value: how many ranks each module keeps."""
    parser.add_argument("--rank", type=int, required=True, help=rank_help)
    parser.add_argument("--method", choices=sorted(METHODS), default="fixed", help=", ".join(
        f"{name}: {text}" for name, text in METHODS.items()))
    parser.add_argument("--value", type=float, default=0.0, help="the share for sv_fro, the ratio for sv_ratio")


def run_tool(args: argparse.Namespace) -> int:
    """One LoRA tool with a tqdm bar; the file is written only once the work is done, and never over another."""
    from . import lora_tools
    from .cache import ModelCache
    from .lora_svd import RankRule
    from .models import resolve_base

    if args.output.exists():
        raise UserError(f"{args.output} already exists: give another --output, or delete that file first.")
    rank = getattr(args, "rank", None)
    rule = RankRule(rank, args.method, args.value).check() if rank is not None else None
    conv_rule = RankRule(args.conv_rank, args.method, args.value).check("--conv-rank") \
        if getattr(args, "conv_rank", 0) else None
    for path in (getattr(args, "lora", None), getattr(args, "tuned", None)):
        if path is not None and not path.is_file():
            raise UserError(f"{path} does not exist.")
    stop = stop_on_interrupt()
    with progress_bar("module") as emit:
        if args.command == "resize":
            output = lora_tools.resize(args.lora, rule, emit, stop)
        elif args.command == "merge":
            output = lora_tools.merge([merge_source(text) for text in args.loras], rule, emit, stop)
        else:
            base = resolve_base(args.base)
            with ModelCache().pipeline(base, args.command, stop=stop) as pipe:
                output = lora_tools.bake(pipe, base.display_name, [(args.lora, args.strength_model,
                                                                   args.strength_clip)], args.precision, emit, stop) \
                    if args.command == "bake" else \
                    lora_tools.extract(pipe, base.display_name, args.tuned, rule, conv_rule, emit, stop)
    report = lora_tools.write(args.output, output)
    print(report.text(), file=sys.stderr)
    print(args.output)
    return 0


def stop_on_interrupt() -> threading.Event:
    """The Stop of a command: Ctrl-C sets it, and the work ends at its next check, keeping what it finished."""
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


@contextmanager
def progress_bar(unit: str) -> Iterator[Callable[[JobEvent], None]]:
    """A job's events on the terminal: its progress as a tqdm bar (made at the first count, so work refused at once
    prints no empty bar), its messages on stderr."""
    from tqdm import tqdm

    bars: list[tqdm] = []

    def emit(event: JobEvent) -> None:
        if event.kind == "progress":
            if not bars:
                bars.append(tqdm(total=event.total_steps, unit=unit, dynamic_ncols=True))
            bars[0].update(event.step - bars[0].n)
        elif event.message:
            tqdm.write(event.message, file=sys.stderr)

    try:
        yield emit
    finally:
        for bar in bars:
            bar.close()


def merge_source(text: str) -> tuple[Path, float]:
    """'file.safetensors:0.7' as (path, 0.7); a name with no weight after its last ':' has weight 1."""
    name, sep, weight = text.rpartition(":")
    try:
        return (Path(name), float(weight)) if sep else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0
