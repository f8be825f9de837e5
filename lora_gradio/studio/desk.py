"""What every room of the studio shares: the workspace, the model cache, the jobs and the server's limits, the
base model a visitor picks, and the datasets a visitor may change."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Hashable
from pathlib import Path

from .. import comfyui, served
from ..access import OPERATOR, Access, Visitor
from ..cache import ModelCache
from ..errors import UserError
from ..jobs import JobRunner
from ..models import DEMO, RANDOM_SD15, REPO_ID, BaseModelSpec, resolve_base
from ..workspace import MODEL_SUFFIXES, Workspace
from .limits import Limits


class Desk:
    """The studio's shared state and the checks every room makes; the rooms (datasets, training, testing) add the
    rest."""

    def __init__(self, workspace: Workspace, cache: ModelCache | None = None, jobs: JobRunner | None = None,
                 limits: Limits | None = None, comfyui_url: str = comfyui.DEFAULT_URL, access: Access | None = None,
                 upload_dir: Path | None = None, devices: list[str] | None = None) -> None:
        self.workspace = workspace
        self.comfyui_url = comfyui_url
        self.limits = limits or Limits()
        self.jobs = jobs or JobRunner(devices)
        # one model cache per device, each under its own lease; with one device, the one cache of every job
        self.caches = {device: ModelCache(device if devices else None) for device in self.jobs.devices}
        if cache is not None:
            self.caches[self.jobs.devices[0]] = cache
        self.cache = self.caches[self.jobs.devices[0]]
        self.access = access or Access()
        self.upload_dir = upload_dir or workspace.root / ".cache" / "gradio"  # the one folder the server serves

    def free_cache(self, key: Hashable | None = None) -> ModelCache:
        """The cache a short job (a test image, captioning) uses: one that holds ``key`` already and is not busy
        training, else any that is not busy, else the first (whose lease then says it is busy)."""
        free = [cache for cache in self.caches.values() if not cache.busy]
        return next((cache for cache in free if cache.holds == key), free[0] if free else self.cache)

    def describe_caches(self) -> str:
        """The model caches in one line for the top of the page: each device's, where there are several."""
        if len(self.caches) == 1:
            return self.cache.describe()
        return " | ".join(f"{device}: {cache.describe()}" for device, cache in self.caches.items())

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

    def dataset_to_change(self, dataset: str | None, visitor: Visitor = OPERATOR) -> Path:
        """The images folder of a dataset that this visitor may change: theirs, or any for the operator."""
        images = self.images_dir(dataset)
        visitor.require(self.workspace.dataset_settings(dataset).get("owner"), f"Dataset '{dataset}'")
        return images

    def set_models_dir(self, folder: str, visitor: Visitor = OPERATOR) -> str:
        """Share checkpoints and LoRAs with a ComfyUI install (a folder that passes the path rule); empty: none."""
        visitor.require_operator("change the workspace settings")
        self.workspace.use_models_dir(folder.strip() or None)
        return (f"Checkpoints: `{self.workspace.relative(self.workspace.checkpoints_dir)}`; LoRAs: "
                f"`{self.workspace.relative(self.workspace.loras_dir)}`.")

    def housekeeping(self) -> str:
        """Remove shown files whose source is gone, and uploads past the age or the size budget."""
        links = self.forget_deleted()
        uploads = served.clean_uploads(self.upload_dir, self.limits.keep_uploads_hours * 3600,
                                       self.limits.uploads_budget_mb * 2**20)
        return f"{links} stale links and {uploads} old uploads removed."

    def forget_deleted(self) -> int:
        """Stop serving what was just deleted (its old URLs answer 404); returns how many links went."""
        return served.forget_deleted(self.upload_dir)

    def public(self, text: str) -> str:
        """Text for a visitor, with the server's own folders shown relative to the workspace."""
        root = re.escape(str(self.workspace.root))
        return re.sub(root + r"(?![\w.-])", "workspace", re.sub(root + re.escape(os.sep), "", text))

    def images_dir(self, dataset: str | None) -> Path:
        """The images folder of a dataset; a clear message when none is chosen."""
        if not dataset:
            raise UserError("Choose or create a dataset first (above the tabs).")
        return self.workspace.dataset_dir(dataset) / "images"


def exists(path: Path) -> bool:
    """Whether a visitor's path names something (a link counts); a NUL byte or an over-long name names nothing."""
    try:
        return os.path.lexists(path)
    except (ValueError, OSError):
        return False


def stamp() -> str:
    """A file-name time stamp that sorts, unique per call even within one second."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{time.perf_counter_ns() % 10**6:06d}"
