"""A run as sd-scripts takes it: the training TOML (``--config_file``) and the dataset TOML it names, written into
the run folder so the same run can be made with kohya's scripts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .config import TrainConfig
from .kohya import block_args
from .kohya_config import OPTIMIZERS, SETTINGS
from .sample_prompts import KOHYA_SAMPLERS

if TYPE_CHECKING:
    from ..models import BaseModelSpec
    from .data import TrainData

SD_SCRIPTS_FILE = "sd-scripts.toml"
SD_SCRIPTS_DATASET_FILE = "sd-scripts-dataset.toml"
SAVE_DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "float"}
SAMPLERS = {ours: kohya for kohya, ours in reversed(KOHYA_SAMPLERS.items())}  # each sampler's first kohya name


def sd_scripts_files(config: TrainConfig, base: BaseModelSpec, data: TrainData, run_dir: str) -> dict[str, str]:
    """A run as sd-scripts takes it: the training TOML (``--config_file``) and the dataset TOML it names. Settings
    sd-scripts has no key for are listed in a comment."""
    import tomli_w

    network_args = {"lora": [], "locon": [f"conv_dim={config.conv_rank}", f"conv_alpha={config.conv_alpha:g}"],
                    "dora": ["algo=locon", "dora_wd=True", "preset=attn-only"]}[config.network_type]
    network_args += [f"{key}={value}" for key, value in block_args(config).items()]
    training = {
        "pretrained_model_name_or_path": base.location, "output_dir": run_dir, "output_name": config.output_name,
        "save_model_as": "safetensors", "dataset_config": f"{run_dir}/{SD_SCRIPTS_DATASET_FILE}",
        "network_module": "lycoris.kohya" if config.network_type == "dora" else "networks.lora",
        "network_dim": config.rank, "network_alpha": config.alpha, "network_dropout": config.network_dropout,
        "network_train_unet_only": not config.train_text_encoder, "learning_rate": config.unet_lr,
        "unet_lr": config.unet_lr, "text_encoder_lr": config.text_encoder_lr,
        "optimizer_type": OPTIMIZERS[config.optimizer], "optimizer_args": [f"weight_decay={config.weight_decay:g}"],
        "lr_scheduler": config.lr_scheduler, "lr_warmup_steps": config.lr_warmup_steps,
        "lr_scheduler_num_cycles": config.lr_cycles, "max_train_epochs": config.epochs,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "mixed_precision": config.mixed_precision,
        "save_precision": SAVE_DTYPES[config.save_dtype], "gradient_checkpointing": config.gradient_checkpointing,
        "sdpa": config.sdpa, "cache_latents": True, "cache_latents_to_disk": config.cache_latents_to_disk,
        "min_snr_gamma": config.min_snr_gamma, "noise_offset": config.noise_offset,
        "multires_noise_iterations": config.multires_noise_iterations,
        "multires_noise_discount": config.multires_noise_discount, "loss_type": config.loss_type,
        "huber_c": config.huber_c, "huber_schedule": config.huber_schedule,
        "debiased_estimation_loss": config.debiased_estimation,
        "prior_loss_weight": config.prior_loss_weight, "seed": config.seed, "clip_skip": config.clip_skip,
        "max_grad_norm": config.max_grad_norm, "scale_weight_norms": config.scale_weight_norms,
        "save_every_n_epochs": config.save_every_n_epochs, "sample_every_n_steps": config.sample_every_n_steps,
        "sample_sampler": SAMPLERS[config.sample_scheduler],
    }
    if network_args:
        training["network_args"] = network_args
    if config.max_train_steps:
        training["max_train_steps"] = config.max_train_steps
    if config.log_with != "none":
        training |= {"log_with": config.log_with, "logging_dir": f"{run_dir}/logs"}
    subset = {"image_dir": str(data.images), "num_repeats": data.repeats, "caption_extension": ".txt",
              "keep_tokens": config.keep_tokens, "shuffle_caption": config.shuffle_caption,
              "caption_dropout_rate": config.caption_dropout, "flip_aug": config.flip_augment,
              "alpha_mask": config.masked_loss}  # sd-scripts reads transparency as the mask, not name.mask.png
    subsets = [subset] + ([{"image_dir": str(data.regularization), "is_reg": True}] if data.regularization else [])
    dataset = {"general": {"resolution": config.resolution, "enable_bucket": config.enable_buckets,
                           "batch_size": config.batch_size},
               "datasets": [{"subsets": subsets}]}
    exported = {SETTINGS[key][0] for key in [*training, *subset, "resolution", "enable_bucket",
                                                "train_batch_size"] if key in SETTINGS}
    exported |= {"network_type", "train_text_encoder", "optimizer", "weight_decay", "conv_rank", "conv_alpha"}
    rest = {k: v for k, v in config.to_dict().items() if k not in exported}
    note = ("# The run as sd-scripts' train_network.py takes it: --config_file this file (it names the dataset file).\n"
            "# lora-gradio settings sd-scripts has no key for: "
            + ", ".join(f"{k} = {json.dumps(v)}" for k, v in rest.items()) + "\n")
    if base.kind in ("demo", "sd15-random"):
        note += (f"# The base, '{base.location}', is built into lora-gradio and sd-scripts cannot load it: point "
                 "pretrained_model_name_or_path at an SD1.5 checkpoint.\n")
    return {SD_SCRIPTS_FILE: note + tomli_w.dumps(training),
            SD_SCRIPTS_DATASET_FILE: "# The dataset of the run, as sd-scripts' --dataset_config takes it.\n"
                                     + tomli_w.dumps(dataset)}
