"""Where things live: datasets, models (ComfyUI's folder names, shareable with a ComfyUI install) and outputs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .dataset import list_images
from .errors import UserError

VALIDATION = "validation"  # a dataset's own validation images: a folder beside its images/

DATASET_NAME = re.compile(r"^[\w][\w .-]{0,63}$")
SETTINGS_FILE = "settings.json"
DATASET_FILE = "dataset.json"  # a dataset's own settings: its trigger word and repeats
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_PATH = 1024  # characters of a path a visitor may name; longer ones are refused like any outside path


@dataclass(frozen=True)
class Workspace:
    """One folder holding ``datasets/<name>/``, ``models/checkpoints``, ``models/loras`` and ``outputs/<run>/``.

    ``allowed_dirs`` are the other server folders the app may read (imports, checkpoints, a ComfyUI install); every
    path a visitor names must resolve inside the workspace or one of them.
    """

    root: Path
    allowed_dirs: tuple[Path, ...] = ()

    @classmethod
    def open(cls, root: Path | str, allowed_dirs: tuple[Path | str, ...] = ()) -> Workspace:
        """Create the folder layout if needed and return the workspace."""
        workspace = cls(Path(root).expanduser().resolve(),
                        tuple(Path(d).expanduser().resolve() for d in allowed_dirs))
        workspace.settings  # noqa: B018 - a damaged settings file is named at start, before anything uses it
        try:
            for folder in (workspace.datasets_dir, workspace.checkpoints_dir, workspace.loras_dir,
                           workspace.outputs_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"Cannot create the workspace at '{workspace.root}': {exc.strerror or exc}. "
                            "Pass --workspace with a folder you can write to.") from exc
        return workspace

    @property
    def settings(self) -> dict:
        """Saved settings (such as a shared ComfyUI models folder)."""
        path = self.root / SETTINGS_FILE
        try:
            settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"The workspace settings file '{path}' is damaged ({exc}), so it is left as it is. "
                            "Fix it in a text editor, or delete it to start with default settings.") from exc
        if not isinstance(settings, dict):
            raise UserError(f"The workspace settings file '{path}' should hold a JSON object (like "
                            '{"models_dir": "/path/to/ComfyUI/models"}). Fix it, or delete it.')
        return settings

    def check_allowed(self, path: Path | str, what: str) -> Path:
        """The resolved path (links followed) if it lies inside the workspace or an allowed folder; else a message
        that names the rule, before anything is read, created or said about the path."""
        try:
            resolved = Path(path).expanduser().resolve() if len(str(path)) <= MAX_PATH else None
        except (ValueError, OSError, RuntimeError):  # a NUL byte, a name too long, an unknown ~user
            resolved = None
        if resolved is not None and any(resolved == folder or folder in resolved.parents
                                        for folder in (self.root, *self.allowed_dirs)):
            return resolved
        text = str(path).replace("\0", "\\0")
        text = text if len(text) <= 80 else f"{text[:60]}…"
        raise UserError(f"{what} '{text}' is outside the folders this app may use: the workspace and the folders "
                        "its operator allowed with --allow-dir. Copy the files into the workspace, or ask the "
                        "operator to start the app with --allow-dir for that folder.")

    def relative(self, path: Path | str) -> str:
        """A path as the page shows it: relative to the workspace, never the server's absolute layout."""
        resolved = Path(path).resolve()
        return str(resolved.relative_to(self.root)) if self.root in resolved.parents else Path(path).name

    @property
    def models_dir(self) -> Path:
        """``models/`` here, or the models folder of a ComfyUI install when one is set."""
        shared = self.settings.get("models_dir")
        return Path(shared) if shared else self.root / "models"

    def use_models_dir(self, folder: Path | str | None) -> None:
        """Point ``models/`` at an existing folder (e.g. ``ComfyUI/models``) so checkpoints and LoRAs are shared."""
        settings = self.settings
        if folder:
            path = self.check_allowed(folder, "The models folder")
            if path.name != "models" and (path / "models").is_dir():
                path = path / "models"  # the ComfyUI install itself was given
            if not path.is_dir():
                raise UserError(f"'{folder}' is not a folder. Give the path of ComfyUI's 'models' folder.")
            (path / "checkpoints").mkdir(exist_ok=True)
            (path / "loras").mkdir(exist_ok=True)
            settings["models_dir"] = str(path)
        else:
            settings.pop("models_dir", None)
        write_text_atomic(self.root / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")

    @property
    def datasets_dir(self) -> Path:
        """Named datasets."""
        return self.root / "datasets"

    @property
    def checkpoints_dir(self) -> Path:
        """Base models, as in ComfyUI's ``models/checkpoints``."""
        return self.models_dir / "checkpoints"

    @property
    def loras_dir(self) -> Path:
        """LoRA files, as in ComfyUI's ``models/loras``."""
        return self.models_dir / "loras"

    @property
    def outputs_dir(self) -> Path:
        """One folder per training run."""
        return self.root / "outputs"

    @property
    def presets_dir(self) -> Path:
        """Presets saved from the app."""
        return self.root / "presets"

    def dataset_settings(self, name: str | None) -> dict[str, Any]:
        """What a dataset remembers between tabs and runs: its trigger word (shared by the Caption, Train and Test
        tabs) and its repeats per epoch; empty until set, and for a damaged file (the next save rewrites it)."""
        path = self.dataset_dir(name) / DATASET_FILE if name else None
        try:
            saved = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return saved if isinstance(saved, dict) else {}

    def trigger_word(self, name: str | None) -> str:
        """The dataset's trigger word; empty until one is set."""
        word = self.dataset_settings(name).get("trigger_word", "")
        return word if isinstance(word, str) else ""

    def repeats(self, name: str | None) -> int:
        """How often an epoch shows each image of the dataset; 1 until set."""
        times = self.dataset_settings(name).get("repeats", 1)
        return times if isinstance(times, int) and not isinstance(times, bool) and 1 <= times <= 1000 else 1

    def set_dataset_settings(self, name: str, trigger_word: str | None = None, repeats: int | None = None,
                             owner: str | None = None) -> None:
        """Remember the trigger word the dataset was captioned or trained with, the repeats it trained with, and
        who created it."""
        saved = self.dataset_settings(name)
        changes = {"trigger_word": (trigger_word or "").strip() or None, "repeats": repeats, "owner": owner}
        updated = {**saved, **{key: value for key, value in changes.items() if value is not None}}
        if updated != saved:
            write_text_atomic(self.dataset_dir(name) / DATASET_FILE, json.dumps(updated) + "\n")

    def training_data(self, name: str) -> tuple[Path, Path | None]:
        """What a dataset trains on: its images (and captions), and its prepared copies' folder if Prepare ran."""
        folder = self.dataset_dir(name)
        prepared = folder / "prepared"
        return folder / "images", prepared if prepared.is_dir() else None

    def own_validation(self, name: str) -> Path | None:
        """A dataset's own validation images (its ``validation/`` folder, as the demo dataset has), if it has any."""
        folder = self.dataset_dir(name) / VALIDATION
        return folder if folder.is_dir() and list_images(folder) else None

    def lora_files(self) -> dict[str, Path]:
        """Every LoRA to test, labelled: trained runs' epochs first (newest run first), then models/loras."""
        files: dict[str, Path] = {}
        runs = sorted((p for p in self.outputs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime,
                      reverse=True) if self.outputs_dir.is_dir() else []
        for run in runs:
            for path in sorted(run.glob("*.safetensors")):
                files[f"{run.name}/{path.name}"] = path
        if self.loras_dir.is_dir():
            for path in sorted(self.loras_dir.rglob("*.safetensors")):
                files[f"loras/{path.relative_to(self.loras_dir)}"] = path
        return files

    def dataset_dir(self, name: str, create: bool = False) -> Path:
        """The folder of a dataset, checking the name so it can never point outside the workspace."""
        name = (name or "").strip()
        if not DATASET_NAME.match(name) or name in (".", ".."):
            raise UserError(f"'{name}' is not a usable dataset name: use letters, digits, spaces, '.', '-' or '_' "
                            "(up to 64 characters).")
        folder = self.datasets_dir / name
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            raise UserError(f"Dataset '{name}' does not exist. Create it in the Dataset tab first.")
        return folder

    def list_datasets(self) -> list[str]:
        """Dataset names, sorted."""
        return sorted(p.name for p in self.datasets_dir.iterdir() if p.is_dir())

    def list_checkpoints(self) -> list[str]:
        """Checkpoint files and diffusers folders in ``models/checkpoints``."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if p.suffix.lower() in MODEL_SUFFIXES or (p / "model_index.json").is_file())
