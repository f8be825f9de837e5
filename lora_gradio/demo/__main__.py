"""``python -m lora_gradio.demo build-base``: train the demo base model again from its seed."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .base import WEIGHTS, BuildSettings, build_base


def main(argv: list[str] | None = None) -> None:
    """Parse the build's settings (every field of BuildSettings can be changed) and build."""
    parser = argparse.ArgumentParser(prog="python -m lora_gradio.demo",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-base", help="train the demo base model from its fixed seed",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--output", type=Path, default=WEIGHTS, help="where to write the .safetensors file")
    for field in dataclasses.fields(BuildSettings):
        build.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                           help=field.name.replace("_", " "))
    args = parser.parse_args(argv)
    settings = BuildSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings)})
    build_base(args.output, settings)


if __name__ == "__main__":
    main()
