"""Train the demo base model from nothing: a VAE for 64 px pictures of flat shapes, then the UNet and the CLIP text
encoder on their captions. ``python -m lora_gradio.demo build-base`` reproduces the shipped weights."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..models import DEMO_TEXT_ENCODER, DEMO_UNET, DEMO_VAE, build_pipeline, quiet_libraries
from ..models import DEMO_WEIGHTS as WEIGHTS
from .shapes import BASE_SHAPES, CONCEPT, PALETTE, Drawing, draw, random_drawing

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

LATENT_STD = 1 / 0.18215  # SD1.5's VAE scaling factor, kept: the demo's latents are rescaled to SD1.5's spread


@dataclass(frozen=True)
class BuildSettings:
    """Everything the shipped weights depend on, recorded in the file's metadata."""

    seed: int = 0
    pictures: int = 24000  # drawn once; the UNet sees each about a dozen times
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 3e-3
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1  # empty captions teach the unconditional picture that guidance (CFG) needs
    unknown_prefix: float = 0.3  # a made-up word before the caption ("qzvk, a red …"), as a trigger word comes
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999


def draw_pictures(count: int, seed: int) -> tuple[np.ndarray, list[Drawing]]:
    """``count`` pictures of the base shapes as a uint8 (n, 3, 64, 64) array, and what each shows."""
    rng = np.random.default_rng(seed)
    drawings = [random_drawing(rng, BASE_SHAPES) for _ in range(count)]
    return np.stack([np.asarray(draw(d)).transpose(2, 0, 1) for d in drawings]), drawings


KNOWN_WORDS = {*PALETTE, *BASE_SHAPES, CONCEPT, "a", "on", "background"}


def made_up_word(rng: np.random.Generator) -> str:
    """Three to seven random letters, never one of the captions' own words."""
    while True:
        word = "".join(chr(97 + int(i)) for i in rng.integers(26, size=int(rng.integers(3, 8))))
        if word not in KNOWN_WORDS:
            return word


def training_caption(drawing: Drawing, settings: BuildSettings, rng: np.random.Generator) -> str:
    """The caption one step trains a picture with: empty now and then for guidance, sometimes with a made-up word
    in front, so that a word the base never learnt (a LoRA's trigger word, before training) leaves the picture as
    the rest of the prompt says."""
    if rng.random() < settings.caption_dropout:
        return ""
    text = f"a {drawing.colour} {drawing.shape} on a {drawing.background} background"
    return f"{made_up_word(rng)}, {text}" if rng.random() < settings.unknown_prefix else text


def to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pictures to the VAE's -1…1 range."""
    import torch

    return torch.from_numpy(pixels).float() / 127.5 - 1


def warm_cosine(step: int, total: int, warmup: int = 100) -> float:
    """Learning-rate factor: a short warm-up, then a cosine down to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + np.cos(np.pi * (step - warmup) / max(total - warmup, 1)))


def train_vae(vae: torch.nn.Module, pixels: np.ndarray, settings: BuildSettings, rng: np.random.Generator,
              progress: bool = True) -> None:
    """Reconstruction with a light KL term, as SD's autoencoder was trained, minus the adversarial part."""
    import torch
    from tqdm.auto import trange

    with torch.no_grad():  # start with a small posterior spread, so the decoder learns the shapes before the noise
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warm_cosine(s, settings.vae_steps))
    vae.train()
    bar = trange(settings.vae_steps, desc="VAE", disable=not progress, mininterval=10)
    for _ in bar:
        batch = to_unit(pixels[rng.integers(len(pixels), size=settings.vae_batch)])
        posterior = vae.encode(batch).latent_dist
        rebuilt = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(rebuilt, batch) + 0.5 * (rebuilt - batch).abs().mean() \
            + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()


def rescale_latents(vae: torch.nn.Module, pixels: np.ndarray) -> float:
    """Scale the VAE's latent space (exactly: the 1×1 convolutions on either side of it) so that its latents spread
    like SD1.5's, and the standard scaling factor brings them to unit variance for the UNet. Returns the factor."""
    import torch

    with torch.no_grad():
        sample = pixels[:4096]
        means = torch.cat([vae.encode(to_unit(sample[i:i + 512])).latent_dist.mean for i in range(0, len(sample), 512)])
        factor = LATENT_STD / means.std().item()
        channels = vae.config.latent_channels
        vae.quant_conv.weight[:channels] *= factor
        vae.quant_conv.bias[:channels] *= factor
        vae.quant_conv.bias[channels:] += 2 * float(np.log(factor))  # log-variance of a scaled latent
        vae.post_quant_conv.weight /= factor
    return factor


def encode_pool(vae: torch.nn.Module, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Every picture's latent mean and standard deviation, computed once: the UNet draws its latents from them."""
    import torch

    with torch.no_grad():
        parts = [vae.encode(to_unit(pixels[i:i + 512])).latent_dist for i in range(0, len(pixels), 512)]
    return torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])


def train_denoiser(pipe: StableDiffusionPipeline, pixels: np.ndarray, drawings: list[Drawing],
                   settings: BuildSettings, rng: np.random.Generator, progress: bool = True) -> torch.nn.Module:
    """SD's own objective (predict the noise, min-SNR weighted) for the UNet and the text encoder together; returns
    their exponential moving average, which draws cleaner than the last step's weights."""
    import torch
    from diffusers import DDPMScheduler
    from tqdm.auto import trange

    from ..training.objective import snr_weights

    means, stds = encode_pool(pipe.vae, pixels)
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    models = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    average = torch.optim.swa_utils.AveragedModel(
        models, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(settings.ema_decay))
    optimizer = torch.optim.AdamW(models.parameters(), lr=settings.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warm_cosine(s, settings.unet_steps))
    models.train()
    bar = trange(settings.unet_steps, desc="UNet + text encoder", disable=not progress, mininterval=10)
    for _ in bar:
        chosen = torch.from_numpy(rng.integers(len(pixels), size=settings.unet_batch))
        latents = (means[chosen] + stds[chosen] * torch.randn_like(means[chosen])) * scaling
        captions = [training_caption(drawings[i], settings, rng) for i in chosen.tolist()]
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(chosen),))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        predicted = pipe.unet(noisy, timesteps, pipe.text_encoder(ids)[0]).sample
        loss = ((predicted - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * snr_weights(noise_scheduler, timesteps, settings.min_snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        average.update_parameters(models)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return average.module


def build_base(output: Path = WEIGHTS, settings: BuildSettings | None = None, progress: bool = True) -> Path:
    """Train the demo base from its fixed seed and write it as one half-precision .safetensors file."""
    import json

    import torch

    from ..atomic import write_bytes_atomic

    quiet_libraries()
    settings = settings or BuildSettings()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    pipe = build_pipeline(DEMO_UNET, DEMO_VAE, DEMO_TEXT_ENCODER, seed=settings.seed)
    pixels, drawings = draw_pictures(settings.pictures, settings.seed)
    train_vae(pipe.vae, pixels, settings, rng, progress)
    pipe.vae.requires_grad_(False)
    factor = rescale_latents(pipe.vae, pixels)
    averaged = train_denoiser(pipe, pixels, drawings, settings, rng, progress)
    tensors = {f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}
    tensors.update(averaged.state_dict())  # unet.… and text_encoder.…
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items() if v.is_floating_point()}
    from safetensors.torch import save

    metadata = {"lora_gradio_demo_base": json.dumps(asdict(settings)), "latent_rescale": f"{factor:.6f}"}
    write_bytes_atomic(Path(output), save(tensors, metadata))
    if progress:
        print(f"Wrote {output} in {time.perf_counter() - started:.0f} s")
    return Path(output)
