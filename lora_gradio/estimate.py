"""Before Start: how many steps, how long, and whether it fits in the GPU's free memory.

A run's time is the sum of its parts: loading the base model, encoding the images, the steps, rendering samples and
saving files. Each part is measured by a run of that base model on this machine's device and remembered in the
workspace (``timings.json``); until then it is guessed, the steps from SD1.5's cost per sample (about 1.73 TFLOP per
training step at 512 px, 2.54 with gradient checkpointing), with a wider margin.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_text_atomic
from .training.config import TRIAL_STRENGTHS, TrainConfig
from .training.data import TrainData, plan_images, run_length, steps_per_epoch
from .training.validation import scoring_work

TFLOP_PER_SAMPLE = {False: 1.73, True: 2.54}  # SD1.5 at 512 px, LoRA step, without / with gradient checkpointing
MFU = 0.35  # a realistic share of the GPU's peak for this workload
DENSE_TFLOPS = {"H200": 790, "H100": 790, "A100": 312, "L40": 181, "4090": 165, "A6000": 155, "3090": 71,
                "4080": 97, "4070": 58, "3080": 60, "3060": 25, "A10": 125, "T4": 65, "V100": 112}
GB = 2**30
MARGINS = {"measured": 0.2, "scaled": 0.35, "guessed": 0.5}  # the ± of a part: measured at this size, from other
# sizes measured here, or guessed before anything was measured
TIMINGS_FILE = "timings.json"


@dataclass
class RunCosts:
    """Seconds each part of a run costs on one device; None or empty where unknown. A cost that depends on size is a
    curve, {megapixels: seconds}, so a run of another size is interpolated from the sizes measured; steps are kept
    per kind of step (precision, checkpointing, network, text encoder)."""

    load_s: float | None = None  # loading the base model from disk
    save_s: float | None = None  # one LoRA file with its card and workflow
    encode: dict[str, float] = field(default_factory=dict)  # image megapixels -> seconds per image
    render: dict[str, float] = field(default_factory=dict)  # sample megapixels -> seconds per sampling step
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> megapixels per step -> seconds

    def merged(self, newer: RunCosts) -> RunCosts:
        """These costs updated with a newer run's: the mean of the two where both measured the same thing."""
        def mean(old: float | None, new: float | None) -> float | None:
            return new if old is None else old if new is None else (old + new) / 2

        def curve(old: dict[str, float], new: dict[str, float]) -> dict[str, float]:
            return {**old, **{size: mean(old.get(size), value) for size, value in new.items()}}

        steps = {**self.steps, **{kind: curve(self.steps.get(kind, {}), points)
                                  for kind, points in newer.steps.items()}}
        return RunCosts(mean(self.load_s, newer.load_s), mean(self.save_s, newer.save_s),
                        curve(self.encode, newer.encode), curve(self.render, newer.render), steps)


def size_key(megapixels: float) -> str:
    """A curve's key for a size."""
    return f"{megapixels:.6f}"


def on_curve(curve: dict[str, float], megapixels: float) -> tuple[float, str] | None:
    """The cost at a size, and how it was found: 'measured' at that size, 'scaled' from the nearest two sizes
    (a straight line: a fixed part and a part per pixel), or from one size as size^0.75 (between the two)."""
    points = sorted((float(size), seconds) for size, seconds in curve.items())
    for size, seconds in points:
        if abs(size - megapixels) <= 1e-3 * size:
            return seconds, "measured"
    if not points:
        return None
    if len(points) == 1:
        size, seconds = points[0]
        return seconds * (megapixels / size) ** 0.75, "scaled"
    (x1, y1), (x2, y2) = sorted(points, key=lambda point: abs(point[0] - megapixels))[:2]
    line = y1 + (y2 - y1) / (x2 - x1) * (megapixels - x1)
    return max(line, min(y1, y2) * (megapixels / max(x1, x2))), "scaled"


def step_kind(config: TrainConfig) -> str:
    """The settings a step's cost depends on, besides its size."""
    return (f"{config.mixed_precision}|checkpointing={config.gradient_checkpointing}|{config.network_type}|"
            f"text_encoder={config.train_text_encoder}")


def step_megapixels(config: TrainConfig) -> float:
    """The pixels one optimizer step trains on, in megapixels."""
    return config.batch_size * config.gradient_accumulation_steps * config.resolution ** 2 / 1e6


def sample_megapixels(config: TrainConfig) -> float:
    """The size of one sample image, in megapixels."""
    return (config.sample_width or config.resolution) * (config.sample_height or config.resolution) / 1e6


def device_name() -> str:
    """The device training and the Test tab use here, as timings are kept: a CUDA GPU's name, 'mps' or 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "mps" if torch.backends.mps.is_available() else "cpu"


def guessed_costs(demo: bool, device: str, config: TrainConfig) -> RunCosts:
    """What the parts cost before anything was measured, each at one size: rough figures for the demo model, a CPU
    and a GPU (docs/BENCHMARKS.md)."""
    kind = step_kind(config)
    if demo:  # the tiny model on a 2-core CPU: 64 px images, steps of two
        return RunCosts(2.0, 0.3, {size_key(0.004096): 0.02}, {size_key(0.004096): 0.04},
                        {kind: {size_key(0.008192): 0.2}})
    if device in ("cpu", "mps"):  # SD1.5 on a 2-core CPU at 256 px
        return RunCosts(20.0, 1.0, {size_key(0.065536): 2.0}, {size_key(0.065536): 1.0},
                        {kind: {size_key(0.065536): 5.0}})
    peak = next((v for k, v in DENSE_TFLOPS.items() if k in device), 50)
    step = TFLOP_PER_SAMPLE[config.gradient_checkpointing] / (peak * MFU)  # one 512 px sample
    return RunCosts(20.0, 1.0, {size_key(0.262144): 0.05}, {size_key(0.262144): 0.03},
                    {kind: {size_key(0.262144): step}})


class Timings:
    """The measured costs of each base model on each device, in the workspace's ``timings.json``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _all(self) -> dict[str, dict]:
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # a damaged file is rewritten by the next run
        return saved if isinstance(saved, dict) else {}

    def costs(self, base: str, device: str) -> RunCosts:
        """What runs of ``base`` measured on ``device``; an empty record when none did."""
        try:
            return RunCosts(**self._all().get(f"{base} on {device}", {}))
        except TypeError:
            return RunCosts()

    def record(self, base: str, device: str, measured: RunCosts) -> None:
        """Keep a run's measurements, averaged with what earlier runs measured."""
        saved = self._all()
        saved[f"{base} on {device}"] = asdict(self.costs(base, device).merged(measured))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(saved, indent=2) + "\n")


@dataclass
class Estimate:
    """The numbers shown before Start."""

    steps: int
    per_epoch: int  # optimizer steps in one epoch
    images: int  # training images an epoch shows, repeats counted
    prior: int  # regularisation images an epoch shows
    seconds: float | None
    margin: float | None  # the ± of ``seconds``
    measured: bool  # every part measured on this machine, not guessed
    peak_gb: float | None
    free_gb: float | None
    device: str
    stale: str | None = None  # what changed since Prepare, if anything
    samples: int = 0  # sample images the run renders
    held_out_note: str = ""  # which images are held out for validation, or why none are

    def markdown(self) -> str:
        """One short paragraph, with a warning when it will not fit."""
        regular = f" and {self.prior} regularisation images" if self.prior else ""
        parts = [f"**{self.steps} steps** ({self.per_epoch} an epoch of {self.images} images{regular})"]
        if self.seconds is None:
            parts.append(f"on {self.device}")
        else:
            parts.append(f"about {format_duration(self.seconds)} (±{format_duration(self.margin or 0)}) on "
                         f"{self.device}, counting the model load, encoding, samples, saves and validation")
        if self.peak_gb is not None:
            memory = f"about {self.peak_gb:.1f} GB peak GPU memory"
            if self.free_gb is not None:
                memory += f" of {self.free_gb:.1f} GB free"
            parts.append(memory)
        text = ", ".join(parts) + "."
        if self.seconds is not None and not self.measured:
            text += " The time is a first guess: the first run measures this machine and later estimates use it."
        if self.free_gb is not None and self.peak_gb is not None and self.peak_gb > self.free_gb:
            text += ("\n\n⚠️ This will probably not fit. Turn on gradient checkpointing, use batch size 1, the "
                     "adamw8bit optimizer, or the low-vram-8gb preset.")
        if self.held_out_note:
            text += f"\n\n{self.held_out_note}"
        if self.stale:
            text += f"\n\n⚠️ {self.stale}"
        return text


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def peak_memory_gb(config: TrainConfig) -> float:
    """Frozen weights in the training precision, the LoRA with its optimizer state, and activations."""
    weight_bytes = 2 if config.mixed_precision in ("fp16", "bf16") else 4
    frozen = (860e6 + 123e6) * weight_bytes  # UNet and text encoder; the VAE leaves the GPU after caching
    lora_params = config.rank * 1600 * 32 * len(config.unet_modules)  # 32 attention blocks, in+out width ~1600
    optimizer_bytes = {"adamw": 8, "adamw8bit": 2, "adafactor": 4, "prodigy": 16}[config.optimizer]
    lora = lora_params * (4 + 4 + optimizer_bytes)
    scale = (config.resolution / 512) ** 2 * config.batch_size
    activations = (0.9 if config.gradient_checkpointing else 3.6) * GB * scale * (weight_bytes / 2)
    return (frozen + lora + activations) / GB + 0.6  # CUDA context and allocator slack


def saves_to_come(config: TrainConfig, epochs: int, steps: int, epochs_done: int = 0, steps_done: int = 0,
                  ) -> tuple[int, int]:
    """The LoRA saves and the rounds of samples a run still makes after ``epochs_done`` epochs and ``steps_done``
    steps: a save every ``save_every_n_epochs`` and at the end, a round of samples with each, one every
    ``sample_every_n_steps`` before the last step, the base model's round before the first, and with a scorer the
    recommended file's rounds at the strengths tried after the last."""
    every = config.save_every_n_epochs
    ends = [epoch for epoch in range(1, epochs) if every and epoch % every == 0] + [epochs]
    saves = sum(1 for end in ends if end > epochs_done)
    often = config.sample_every_n_steps
    rounds = saves + ((steps - 1) // often - steps_done // often if often else 0) + (steps_done == 0)
    rounds += len(TRIAL_STRENGTHS) - 1 if config.scorer != "off" else 0
    return saves, rounds if config.sample_prompts else 0


def run_seconds(config: TrainConfig, images: int, steps: int, epochs: int, loaded: bool, known: RunCosts,
                guess: RunCosts, scoring: float = 0.0) -> tuple[float, float, bool]:
    """The run's seconds, their ±, and whether every part was measured at this size: each part's amount times its
    cost, measured where ``known`` has it (scaled from other sizes when it has not this one), else guessed.
    ``scoring`` is the held-out images' scoring, in training steps."""
    kind = step_kind(config)
    saves, renders = saves_to_come(config, epochs, steps)
    image, sample = config.resolution ** 2 / 1e6, sample_megapixels(config)
    def fixed(seconds: float | None) -> tuple[float, str] | None:
        return (seconds, "measured") if seconds is not None else None

    parts = [  # (amount, its cost per unit from what was measured here, the guessed cost per unit)
        (0 if loaded else 1, fixed(known.load_s), fixed(guess.load_s)),
        (images * (2 if config.flip_augment else 1), on_curve(known.encode, image), on_curve(guess.encode, image)),
        (steps + scoring, on_curve(known.steps.get(kind, {}), step_megapixels(config)),
         on_curve(guess.steps[kind], step_megapixels(config))),
        (renders * len(config.sample_prompts) * config.sample_steps, on_curve(known.render, sample),
         on_curve(guess.render, sample)),
        (saves, fixed(known.save_s), fixed(guess.save_s))]
    total = margin = 0.0
    measured = True
    for amount, found, guessed in parts:
        if not amount:
            continue
        seconds, how = found if found is not None else (guessed[0], "guessed")
        measured = measured and how == "measured"
        total += amount * seconds
        margin += amount * seconds * MARGINS[how]
    return total, margin, measured


def estimate(config: TrainConfig, data: TrainData, demo: bool = False, known: RunCosts | None = None,
             loaded: bool = False) -> Estimate:
    """Steps from the dataset's buckets and the config; time from what runs measured here (``known``), guessed where
    nothing was; memory for the GPU in this machine, if any. ``loaded``: the base model is loaded already."""
    import torch

    images = data.scan(config)
    scan, prior, held = images.scan, images.prior, len(images.held)
    planned = plan_images(scan.images + prior, config.resolution, config.enable_buckets)
    per_epoch = steps_per_epoch(planned, config.batch_size, config.gradient_accumulation_steps)
    epochs, steps = run_length(per_epoch, config.epochs, config.max_train_steps)
    device = device_name()
    seconds, margin, measured = run_seconds(config, len(planned) + held, steps, epochs, loaded, known or RunCosts(),
                                            guessed_costs(demo, device, config),
                                            scoring_work(config, held, epochs, steps))
    counts = (steps, per_epoch, scan.total_repeats, sum(image.repeats for image in prior), seconds, margin, measured)
    samples = saves_to_come(config, epochs, steps)[1] * len(config.sample_prompts)
    where = "the demo model" if demo else "this GPU" if torch.cuda.is_available() else "the CPU"
    if demo or not torch.cuda.is_available():
        return Estimate(*counts, None, None, f"{where} ({device})", scan.stale, samples, images.held_out_note)
    free, _ = torch.cuda.mem_get_info()
    return Estimate(*counts, peak_memory_gb(config), free / GB, device, scan.stale, samples, images.held_out_note)
