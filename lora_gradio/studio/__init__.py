"""The app's backend in one object: a workspace, its model cache and its jobs.

The Gradio tabs and the public API endpoints call these methods and nothing else, so a script can do all that the
page does: ``studio.start_training(studio.plan_training("anna", "demo", {"epochs": 4}))``. Methods that start,
change or delete something take the :class:`Visitor` who asks; a script on the server is the operator. Each room of
the studio is a module of this package: datasets, training, testing and the LoRA tools, over the desk they share.
"""

from __future__ import annotations

from ..captioners import BLIP_MODELS, CAPTION_MODELS, DEFAULT_BLIP, FLORENCE_MODELS, WD_MODELS
from ..captioning import CaptionOptions, CaptionResult
from ..dataset import IMAGE_SUFFIXES
from ..demo.shapes import DEMO_IMAGES, DEMO_TRIGGER
from ..estimate import format_duration
from ..imports import ImportReport
from ..lora_svd import METHODS, RankRule, ToolReport
from ..lora_tools import DTYPES
from ..models import DEMO, DEMO_NOTE
from ..training.data import MAX_REPEATS
from ..training.run_folder import SAMPLE_GRID
from ..training.sample_prompts import parse_sample_line
from ..workspace import Workspace
from .datasets import CAPTION_TOKENS, MAX_DEMO_DATASETS, Datasets
from .desk import Desk
from .limits import Limits
from .queueing import QUEUE_COLUMNS, YOU
from .testing import NO_LORA, TEST_IMAGES, GeneratedImage, Testing
from .tools import Tools
from .training import YOURS, TestPlan, Training, TrainingPlan, lora_name

__all__ = [  # what the UI reads of the backend besides Studio's methods: records it takes or returns, and facts
    "BLIP_MODELS", "CAPTION_MODELS", "CAPTION_TOKENS", "DEFAULT_BLIP", "DEMO", "DEMO_IMAGES", "DEMO_NOTE",
    "DEMO_TRIGGER", "DTYPES", "FLORENCE_MODELS", "IMAGE_SUFFIXES", "MAX_DEMO_DATASETS", "MAX_REPEATS", "METHODS",
    "NO_LORA", "QUEUE_COLUMNS", "SAMPLE_GRID", "TEST_IMAGES", "WD_MODELS", "YOU", "YOURS", "CaptionOptions",
    "CaptionResult", "Desk", "GeneratedImage", "ImportReport", "Limits", "RankRule", "Studio", "TestPlan", "ToolReport",
    "TrainingPlan", "Workspace", "format_duration", "lora_name", "parse_sample_line"]


class Studio(Datasets, Training, Testing, Tools):
    """One workspace, one model cache and one job runner, shared by every visitor of the app."""
