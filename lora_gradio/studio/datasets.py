"""The studio's datasets: create, import, caption, prepare and delete them, each visitor their own."""

from __future__ import annotations

import math
import shutil
from functools import cache
from pathlib import Path

from .. import captioning, imports, quality
from ..access import OPERATOR, Visitor
from ..dataset import (
    IMAGE_SUFFIXES,
    find_replace_captions,
    list_images,
    prepare_dataset,
    read_caption,
    read_manifest,
    tag_frequencies,
    write_caption,
)
from ..errors import UserError
from ..request import short
from ..workspace import VALIDATION
from .desk import Desk, exists

CAPTION_TOKENS = 75  # what CLIP reads of a caption; training cuts the rest

MAX_DEMO_DATASETS = 20  # Load demo dataset is a public endpoint: it must not fill the disk


class Datasets(Desk):
    """Datasets and their images and captions."""

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
        from ..demo.shapes import DEMO_TRIGGER, make_demo_dataset, make_demo_validation

        taken = set(self.workspace.list_datasets())
        free = [n for n in ("demo-rings", *(f"demo-rings-{i}" for i in range(2, MAX_DEMO_DATASETS + 1)))
                if n not in taken]
        if not free:
            raise UserError(f"There are {MAX_DEMO_DATASETS} demo datasets already: use one of them, or delete one "
                            "(Dataset tab, Delete this dataset…) before loading another.")
        name = free[0]
        self.create_dataset(name, visitor)
        make_demo_dataset(self.images_dir(name))
        make_demo_validation(self.workspace.dataset_dir(name) / VALIDATION)
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

    def start_import_folder(self, dataset: str | None, folder: str, visitor: Visitor = OPERATOR) -> str:
        """Import a folder on the server (inside the workspace or an allowed folder) into a dataset in the
        background; the walk stops at the stated number of files and seconds. The job's result is an
        :class:`ImportReport`."""
        source = self.workspace.check_allowed(folder.strip(), "Folder")
        images = self.dataset_to_change(dataset, visitor)
        if not source.is_dir():
            raise UserError(f"{short(folder)} is not a folder on this server.")
        return self.jobs.start("import", f"Importing {source.name} into {dataset}", lambda stop, emit: (
            imports.import_folder(source, images, self.limits.max_images, emit, stop)),
            exclusive=f"importing {dataset}", owner=visitor.name)

    def start_import_uploads(self, dataset: str | None, files: list[Path], visitor: Visitor = OPERATOR) -> str:
        """Import uploaded images, captions and zips into a dataset in the background; the job's result is an
        :class:`ImportReport`."""
        if len(files) > 2 * self.limits.max_images:  # an image and its caption each
            raise UserError(f"{len(files)} files at once: this server takes up to {self.limits.max_images} images a "
                            "dataset. Upload fewer, or a zip.")
        images = self.dataset_to_change(dataset, visitor)
        return self.jobs.start("import", f"Importing {len(files)} files into {dataset}", lambda stop, emit: (
            imports.import_sources(files, images, self.limits.max_images, emit, stop)),
            exclusive=f"importing {dataset}", owner=visitor.name)

    def start_caption(self, dataset: str | None, source: str, options: captioning.CaptionOptions,
                      visitor: Visitor = OPERATOR) -> str:
        """Caption a dataset in the background with a captioner's hub id (BLIP, Florence-2, a WD tagger) or a local
        folder inside the allowed ones."""
        source = source.strip()
        if not source:
            raise UserError("Type the path of a local model folder (BLIP, Florence-2 or a WD tagger), or pick a "
                            "model to download.")
        if not self.is_hub_id(source):
            source = str(self.workspace.check_allowed(source, "The captioning model's folder"))
        images = self.dataset_to_change(dataset, visitor)
        self.workspace.set_dataset_settings(str(dataset), options.trigger_word)
        return self.jobs.start("captioning", f"Captioning {dataset}", lambda stop, emit: captioning.caption_dataset(
            self.free_cache(("captioner", source)), source, images, options, emit, stop),
            exclusive=f"captioning {dataset}", owner=visitor.name)

    def start_prepare(self, dataset: str | None, resolution: float, center_crop: bool, visitor: Visitor = OPERATOR,
                      ) -> str:
        """Write a dataset's training copies in the background."""
        images = self.dataset_to_change(dataset, visitor)
        if not math.isfinite(resolution) or not 64 <= resolution <= 2048 or resolution % 64:
            raise UserError(f"Training resolution {resolution}: use a multiple of 64 from 64 to 2048.")
        return self.jobs.start("prepare", f"Preparing {dataset}", lambda stop, emit: prepare_dataset(
            images, images.parent / "prepared", int(resolution), center_crop, emit, stop),
            exclusive=f"preparing {dataset}", owner=visitor.name)

    def prepare_again(self, dataset: str | None, visitor: Visitor = OPERATOR) -> str:
        """Refresh a dataset's training copies with the settings of its last Prepare."""
        images = self.images_dir(dataset)
        manifest = read_manifest(images.parent / "prepared")
        if not manifest:
            raise UserError(f"Dataset '{dataset}' has no training copies yet: use Prepare in the Dataset tab.")
        return self.start_prepare(dataset, manifest["resolution"], manifest["center_crop"], visitor)

    def images(self, dataset: str | None) -> list[Path]:
        """A dataset's images, in the order every tab lists them."""
        return list_images(self.images_dir(dataset))

    def captioned_images(self, dataset: str | None, start: int = 0, count: int | None = None,
                         ) -> tuple[int, list[tuple[Path, str]]]:
        """How many images a dataset has, and ``count`` of them from ``start`` with their captions ("" for none):
        only the captions of the page shown are read."""
        images = self.images(dataset)
        page = images[start:None if count is None else start + count]
        return len(images), [(path, read_caption(path) or "") for path in page]

    def image_of(self, dataset: str | None, name: str) -> Path:
        """An image of a dataset by its name in the dataset (as the lists show it); never a path elsewhere."""
        folder = self.images_dir(dataset)
        parts = Path(str(name)).parts
        path = folder.joinpath(*parts) if parts and not Path(str(name)).is_absolute() else folder
        inside = ".." not in parts and not any(part.startswith(".") for part in parts)
        if not inside or path.suffix.lower() not in IMAGE_SUFFIXES or not exists(path) or not path.is_file() \
                or not path.resolve().is_relative_to(folder.resolve()):
            raise UserError(f"Dataset '{dataset}' has no image {short(name)}: refresh the page.")
        return path

    def thumbnail(self, dataset: str | None, name: str) -> Path:
        """A small copy of one image, for the page (the original never leaves the server)."""
        return quality.thumbnail(self.image_of(dataset, name), self.images_dir(dataset))

    def check_dataset(self, dataset: str | None) -> quality.QualityReport:
        """The dataset's quality report: count, sizes, duplicates, broken files and captions."""
        return quality.check_dataset(self.images_dir(dataset))

    def tag_frequencies(self, dataset: str | None) -> list[tuple[str, int]]:
        """The dataset's caption tags, most frequent first; none before a dataset is chosen."""
        return tag_frequencies(self.images_dir(dataset)) if dataset else []

    def find_replace_captions(self, dataset: str | None, find: str, replacement: str,
                              visitor: Visitor = OPERATOR) -> int:
        """Replace text in every caption of a dataset this visitor may change; how many captions changed."""
        return find_replace_captions(self.dataset_to_change(dataset, visitor), find, replacement)

    def write_caption(self, dataset: str | None, name: str, text: str, visitor: Visitor = OPERATOR) -> None:
        """Save one image's caption, in a dataset this visitor may change."""
        self.dataset_to_change(dataset, visitor)
        write_caption(self.image_of(dataset, name), text)

    def caption_tokens(self, text: str) -> int:
        """How many CLIP tokens a caption takes (training reads the first CAPTION_TOKENS)."""
        return len(clip_tokenizer()(text).input_ids) - 2


@cache
def clip_tokenizer():  # noqa: ANN201 - transformers' tokenizer, imported only when a caption is counted
    """SD1.5's CLIP tokenizer from the project's own copy: no download."""
    from transformers import CLIPTokenizer

    from ..models import SD15_CONFIG_DIR

    return CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
