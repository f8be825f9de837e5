"""Before Start: how many steps, roughly how long, and whether it fits in the GPU's free memory.

The figures are estimates from SD1.5's cost per sample (about 1.73 TFLOP per training step at 512 px, 2.54 with
gradient checkpointing) and typical memory use; the real numbers show up in the progress bar once training runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .training.config import TrainConfig
from .training.data import TrainData, plan_images, run_length, steps_per_epoch

TFLOP_PER_SAMPLE = {False: 1.73, True: 2.54}  # SD1.5 at 512 px, LoRA step, without / with gradient checkpointing
MFU = 0.35  # a realistic share of the GPU's peak for this workload
DENSE_TFLOPS = {"H200": 790, "H100": 790, "A100": 312, "L40": 181, "4090": 165, "A6000": 155, "3090": 71,
                "4080": 97, "4070": 58, "3080": 60, "3060": 25, "A10": 125, "T4": 65, "V100": 112}
GB = 2**30
DEMO_SECONDS_PER_STEP = 0.2  # measured on a 2-core CPU (docs/BENCHMARKS.md)


@dataclass
class Estimate:
    """The numbers shown before Start."""

    steps: int
    per_epoch: int  # optimizer steps in one epoch
    images: int  # training images an epoch shows, repeats counted
    prior: int  # regularisation images an epoch shows
    seconds: float | None
    peak_gb: float | None
    free_gb: float | None
    device: str
    stale: str | None = None  # what changed since Prepare, if anything

    def markdown(self) -> str:
        """One short paragraph, with a warning when it will not fit."""
        regular = f" and {self.prior} regularisation images" if self.prior else ""
        parts = [f"**{self.steps} steps** ({self.per_epoch} an epoch of {self.images} images{regular})"]
        if self.seconds is None:
            parts.append(f"on {self.device}")
        else:
            parts.append(f"about {format_duration(self.seconds)} on {self.device}")
        if self.peak_gb is not None:
            memory = f"about {self.peak_gb:.1f} GB peak GPU memory"
            if self.free_gb is not None:
                memory += f" of {self.free_gb:.1f} GB free"
            parts.append(memory)
        text = ", ".join(parts) + "."
        if self.free_gb is not None and self.peak_gb is not None and self.peak_gb > self.free_gb:
            text += ("\n\n⚠️ This will probably not fit. Turn on gradient checkpointing, use batch size 1, the "
                     "adamw8bit optimizer, or the low-vram-8gb preset.")
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


def estimate(config: TrainConfig, data: TrainData, demo: bool = False) -> Estimate:
    """Steps from the dataset's buckets and the config; time and memory for the GPU in this machine, if any."""
    import torch

    scan, prior = data.scan(config.trigger_word)
    planned = plan_images(scan.images + prior, config.resolution, config.enable_buckets)
    per_epoch = steps_per_epoch(planned, config.batch_size, config.gradient_accumulation_steps)
    steps = run_length(per_epoch, config.epochs, config.max_train_steps)[1]
    stale, counts = scan.stale, (steps, per_epoch, scan.total_repeats, sum(image.repeats for image in prior))
    if demo:
        return Estimate(*counts, steps * DEMO_SECONDS_PER_STEP, None, None, "the demo model", stale)
    if not torch.cuda.is_available():
        return Estimate(*counts, None, None, None, "the CPU (slow: minutes per step for real SD1.5 models)", stale)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in DENSE_TFLOPS.items() if k in name), 50)
    per_sample = TFLOP_PER_SAMPLE[config.gradient_checkpointing] * (config.resolution / 512) ** 2
    seconds = steps * config.batch_size * config.gradient_accumulation_steps * per_sample / (peak * MFU)
    free, _ = torch.cuda.mem_get_info()
    return Estimate(*counts, seconds, peak_memory_gb(config), free / GB, name, stale)
