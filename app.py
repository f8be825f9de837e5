"""Start the lora-gradio web app: ``python app.py [--host H] [--port P] [--workspace DIR] [--share]``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("lora_gradio")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, each with an environment-variable equivalent for Docker and services."""
    parser = argparse.ArgumentParser(description="lora-gradio: train SD1.5 LoRAs in the browser.")
    parser.add_argument("--host", default=os.environ.get("LORA_GRADIO_HOST", "127.0.0.1"),
                        help="address to serve on; 0.0.0.0 for other machines (env LORA_GRADIO_HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LORA_GRADIO_PORT", "7860")),
                        help="port (env LORA_GRADIO_PORT)")
    parser.add_argument("--workspace", default=os.environ.get("LORA_GRADIO_WORKSPACE", "workspace"),
                        help="folder for datasets, models and outputs (env LORA_GRADIO_WORKSPACE)")
    parser.add_argument("--share", action="store_true", default=os.environ.get("LORA_GRADIO_SHARE") == "1",
                        help="also open a temporary public Gradio link (env LORA_GRADIO_SHARE=1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the app over the workspace and serve it until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    from lora_gradio.errors import UserError
    from lora_gradio.ui import CSS, build_app
    from lora_gradio.workspace import Workspace

    try:
        workspace = Workspace.open(args.workspace)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = build_app(workspace)
    app.queue(default_concurrency_limit=4)
    log.info("lora-gradio: workspace %s", workspace.root)
    log.info("lora-gradio: open http://%s:%d in your browser", args.host, args.port)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, quiet=True,
               allowed_paths=[str(workspace.root)], footer_links=["api"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
