"""Start the lora-gradio web app: ``python app.py [--host H] [--port P] [--workspace DIR] [--share] [--auth U:P]``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_gradio.studio import Studio

log = logging.getLogger("lora_gradio")
MIN_PASSWORD = 8
HOUSEKEEPING_S = 600  # how often old uploads and stale links are swept
STOP_WAIT_S = 60  # how long a stop signal waits for the running jobs to save
NO_AUTH = ("error: {where} would let anyone who reaches it use this server (its GPU, its files), so it needs a "
           "password: add --auth user:password, --auth-file FILE or LORA_GRADIO_AUTH=user:password "
           "(or --insecure-no-auth if you really mean it).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, each with an environment-variable equivalent for Docker, Spaces and services."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="lora-gradio: train SD1.5 LoRAs in the browser.")
    parser.add_argument("--host", default=env("LORA_GRADIO_HOST") or ("0.0.0.0" if env_is_space() else "127.0.0.1"),
                        help="address to serve on; 0.0.0.0 for other machines (env LORA_GRADIO_HOST; on a Space, "
                             "0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(env("LORA_GRADIO_PORT", "7860")),
                        help="port (env LORA_GRADIO_PORT)")
    parser.add_argument("--workspace", default=env("LORA_GRADIO_WORKSPACE") or default_workspace(),
                        help="folder for datasets, models and outputs (env LORA_GRADIO_WORKSPACE; on a Space with "
                             "persistent storage, /data)")
    parser.add_argument("--share", action="store_true", default=env("LORA_GRADIO_SHARE") == "1",
                        help="also open a temporary public Gradio link (env LORA_GRADIO_SHARE=1); needs --auth")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                        help="a login for the page and the API (repeatable); env LORA_GRADIO_AUTH takes the same, "
                             "several separated by commas, and keeps the password out of the process list")
    parser.add_argument("--auth-file", type=Path, default=env("LORA_GRADIO_AUTH_FILE"),
                        help="a file with one user:password per line (env LORA_GRADIO_AUTH_FILE)")
    parser.add_argument("--admin", default=env("LORA_GRADIO_ADMIN"), metavar="NAME",
                        help="the login of the operator, who may stop or delete anyone's jobs and runs and change the "
                             "workspace settings (env LORA_GRADIO_ADMIN); default: the first login, taken from "
                             "LORA_GRADIO_AUTH, then --auth, then --auth-file")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve a shared link or a public address without a password (not recommended)")
    parser.add_argument("--allow-dir", action="append", default=[d for d in env("LORA_GRADIO_ALLOW_DIRS", "").split(
        os.pathsep) if d], metavar="DIR", help="a server folder visitors may import from or load models from, "
                                               "besides the workspace (repeatable; env LORA_GRADIO_ALLOW_DIRS, "
                                               f"separated by '{os.pathsep}')")
    parser.add_argument("--comfyui-url", default=env("LORA_GRADIO_COMFYUI_URL", "http://127.0.0.1:8188"),
                        help="a running ComfyUI that 'Queue in ComfyUI' sends to (visitors cannot change it)")
    parser.add_argument("--devices", default=env("LORA_GRADIO_DEVICES", ""), metavar="LIST",
                        help="the devices runs train on side by side, one run each, comma-separated: cuda:0,cuda:1 "
                             "(cpu#1,cpu#2: two runs at once on the CPU); default: every GPU (env "
                             "LORA_GRADIO_DEVICES)")
    limits = parser.add_argument_group("limits for each visitor (shown on the page)")
    limits.add_argument("--max-upload-mb", type=int, default=int(env("LORA_GRADIO_MAX_UPLOAD_MB", "200")),
                        help="largest uploaded file (env LORA_GRADIO_MAX_UPLOAD_MB)")
    limits.add_argument("--max-images", type=int, default=1000, help="images per dataset")
    limits.add_argument("--max-grid", type=int, default=36, help="images per comparison grid")
    limits.add_argument("--max-image-side", type=int, default=1024, help="width and height of a test image")
    limits.add_argument("--max-steps", type=int, default=100, help="sampling steps of a test image")
    limits.add_argument("--max-train-minutes", type=int, default=int(env("LORA_GRADIO_MAX_TRAIN_MINUTES", "120")),
                        help="estimated length of a run started by anyone but the operator (env "
                             "LORA_GRADIO_MAX_TRAIN_MINUTES)")
    limits.add_argument("--max-samples", type=int, default=200,
                        help="sample images a run started by anyone but the operator may render")
    limits.add_argument("--keep-uploads-hours", type=float, default=24,
                        help="uploads not imported by then are removed")
    limits.add_argument("--uploads-budget-mb", type=int, default=4096,
                        help="past this, the oldest uploads are removed first")
    return parser.parse_args(argv)


def default_workspace() -> str:
    """``/data`` on a Hugging Face Space with persistent storage, else ``./workspace``."""
    return "/data" if env_is_space() and Path("/data").is_dir() else "workspace"


def env_is_space() -> bool:
    """Whether the app runs on a Hugging Face Space (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def logins(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Every user:password from the environment, the flags and the file, in that order (the first is the operator
    unless --admin names another); a malformed one or a short password is named by position."""
    variable = os.environ.get("LORA_GRADIO_AUTH", "")
    entries = [(f"entry {i + 1} of LORA_GRADIO_AUTH", part.strip()) for i, part in enumerate(variable.split(","))
               if part.strip()]
    entries += [(f"--auth #{i + 1}", value) for i, value in enumerate(args.auth)]
    if args.auth_file:
        try:
            lines = Path(args.auth_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read --auth-file {args.auth_file}: {exc.strerror or exc}") from exc
        entries += [(f"line {i + 1} of {args.auth_file}", line.strip()) for i, line in enumerate(lines)
                    if line.strip() and not line.lstrip().startswith("#")]
    found = []
    for where, entry in entries:
        user, _, password = entry.partition(":")
        if not user.strip() or not password:
            raise ValueError(f"{where} is not user:password")  # never echo the entry: it may hold a password
        if len(password) < MIN_PASSWORD:
            raise ValueError(f"the password of {where} (user {user.strip()}) is shorter than {MIN_PASSWORD} "
                             "characters, which a stranger guesses quickly: choose a longer one")
        found.append((user.strip(), password))
    return found


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach the address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Check the exposure and logins, build the app over the workspace and serve it until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        auth = logins(args)
    except ValueError as exc:
        print(f"error: {exc}.", file=sys.stderr)
        return 2
    public = args.share or not is_loopback(args.host)
    if public and not auth:
        if not args.insecure_no_auth:
            where = "--share" if args.share else f"--host {args.host}"
            print(NO_AUTH.format(where=where), file=sys.stderr)
            return 2
        log.warning("WARNING: serving %s WITHOUT A PASSWORD (--insecure-no-auth): anyone who reaches it can use "
                    "this server.", "a public share link" if args.share else f"on {args.host}")
    users = [user for user, _ in auth]
    if args.admin and args.admin not in users:
        print(f"error: --admin {args.admin} is not one of the logins ({', '.join(users) or 'none'}).", file=sys.stderr)
        return 2
    problem = run_as_app_user(Path(args.workspace))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from lora_gradio.access import Access
    from lora_gradio.errors import UserError
    from lora_gradio.workspace import Workspace

    home = [] if public or auth else [str(Path.home())]  # your own files, when you are the app's one user
    allowed = list(args.allow_dir) + home
    try:
        workspace = Workspace.open(args.workspace, tuple(allowed))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uploads = workspace.root / ".cache" / "gradio"
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # uploads stay in the workspace
    from starlette.middleware import Middleware

    from lora_gradio.served import SHOWN
    from lora_gradio.studio import Limits, Studio
    from lora_gradio.ui import CSS, build_app
    from lora_gradio.ui.guard import Guard

    try:
        devices = device_list(args.devices)
    except UserError as exc:
        print(f"error: --devices: {exc}", file=sys.stderr)
        return 2
    limits = Limits(args.max_images, args.max_grid, args.max_image_side, args.max_steps, args.max_upload_mb,
                    args.max_train_minutes, args.max_samples, args.keep_uploads_hours, args.uploads_budget_mb)
    access = Access(bool(auth), args.admin or (users[0] if users else None), public)
    studio = Studio(workspace, limits=limits, comfyui_url=args.comfyui_url, access=access, upload_dir=uploads,
                    devices=devices)
    app = build_app(studio)
    app.queue(default_concurrency_limit=4)
    public_names = {fn.api_name for fn in app.fns.values() if fn.api_visibility == "public" and fn.api_name}
    sweep = threading.Event()
    threading.Thread(target=housekeeping, args=(studio, sweep), name="housekeeping", daemon=True).start()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):  # docker stop, Ctrl-C: save the running run, then leave
        signal.signal(stop_signal, lambda number, _frame: stop_and_save(studio, number))
    log.info("lora-gradio: workspace %s%s", workspace.root,
             f", sign-in for {len(auth)} user(s), operator {access.operator}" if auth else "")
    for line in studio.restore_queue():  # the runs that trained or waited when the server last stopped
        log.info("lora-gradio: training queue: %s", line)
    log.info("lora-gradio: open http://%s:%d in your browser", args.host, args.port)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS, quiet=True,
               auth=auth or None, max_file_size=f"{limits.max_upload_mb}mb", footer_links=["api"],
               app_kwargs={"middleware": [Middleware(Guard, public_names=lambda: public_names,
                                                     shown_dir=uploads / SHOWN)]})
    sweep.set()
    return 0


def device_list(names: str) -> list[str] | None:
    """The devices named (each checked against this machine), or every GPU where there are several; None: the one
    best device, as on a one-GPU or CPU machine."""
    from lora_gradio.errors import UserError
    from lora_gradio.views import available_devices, torch_device

    wanted = [name.strip() for name in names.split(",") if name.strip()] or available_devices()
    for name in wanted:
        torch_device(name)
    if len(set(wanted)) < len(wanted):
        raise UserError(f"{names} names a device twice; give each once (cpu#1,cpu#2 for two runs on the CPU).")
    return wanted if len(wanted) > 1 or names.strip() else None


def run_as_app_user(workspace: Path) -> str | None:
    """In the Docker image the app starts as root only to hand the workspace volume (which platforms often mount
    owned by root) to its own user, LORA_GRADIO_USER, and then runs as that user. Elsewhere, a workspace this user
    cannot write to is named with the command that fixes it. Returns what is wrong, or None."""
    wanted = os.environ.get("LORA_GRADIO_USER", "")
    if wanted.isdigit() and os.geteuid() == 0:
        uid = int(wanted)
        workspace.mkdir(parents=True, exist_ok=True)
        if workspace.stat().st_uid != uid:
            log.info("lora-gradio: giving the workspace %s to uid %d (it belonged to uid %d)", workspace, uid,
                     workspace.stat().st_uid)
            for folder, dirs, files in os.walk(workspace):
                for name in [folder, *(os.path.join(folder, item) for item in dirs + files)]:
                    os.lchown(name, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if workspace.exists() and not os.access(workspace, os.W_OK | os.X_OK):
        me, owner = os.geteuid(), workspace.stat().st_uid
        return (f"the workspace {workspace} belongs to uid {owner}, and this app runs as uid {me}, which cannot write "
                f"to it. Run: chown -R {me}:{me} {workspace} (in Docker, start the container without --user: it "
                "fixes this itself), or pass --workspace with a folder you can write to.")
    return None


def stop_and_save(studio: Studio, number: int) -> None:
    """Stop every job as its Stop button does (a run saves its LoRA and its resume state), then close the server."""
    log.info("lora-gradio: %s: stopping the running jobs and saving what they learned", signal.Signals(number).name)
    for title in studio.jobs.stop_all(timeout=STOP_WAIT_S):
        log.info("lora-gradio: stopped %s", title)
    raise KeyboardInterrupt  # Gradio's serving loop closes the server on it


def housekeeping(studio: Studio, done: threading.Event) -> None:
    """Every few minutes, remove old uploads and links to deleted files, until the app ends."""
    while not done.wait(HOUSEKEEPING_S):
        try:
            studio.housekeeping()
        except OSError:
            log.warning("housekeeping of the upload folder failed", exc_info=True)


if __name__ == "__main__":
    sys.exit(main())
