"""The LoRA training loop, read like nanoGPT's ``train.py``: :class:`Trainer` sets the run up in ``__init__`` (with
setup.py) on a view of the base model, ``run`` is the loop, and ``train_step`` is the whole of what one step does."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..cache import ModelCache
from ..errors import Stopped, UserError
from ..events import Emit, JobEvent, status_events
from ..inference import RenderStopped
from ..models import DEMO, BaseModelSpec, quiet_libraries
from ..threads import fit_threads
from ..views import encode_prompts, free_accelerator_memory
from . import cards, kohya, recommend, scoring, setup, tracking
from .clock import RunClock
from .config import TrainConfig
from .data import RunImages, TrainData, plan_epoch, process_caption, run_length, sample_latents, steps_per_epoch
from .ema import WeightAverage, ema_file, is_ema_file
from .network import apply_max_norm, trainable_parameters
from .objective import Objective, denoising_loss, training_noise
from .result import TrainResult
from .resume import Resumable
from .run_folder import RunFolder
from .samples import render_samples, sample_grid
from .setup import DTYPES, attach_network, encode_fixed_captions, encode_images, working_view

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline

CHECKPOINT_SECONDS = 600  # besides every epoch end, keep resume state at most this old


def train(config: TrainConfig, base: BaseModelSpec, data: TrainData | Path, output_dir: Path,
          on_event: Emit | None = None, stop: threading.Event | None = None, cache: ModelCache | None = None,
          resume: bool = False) -> TrainResult:
    """Train a LoRA on ``data`` (or a plain folder of images) and save kohya files into ``output_dir``; ``stop`` ends
    it early with a save. With ``resume``, continue the interrupted run in ``output_dir`` from its saved state."""
    run = RunFolder(Path(output_dir))
    run.check_writable()
    emit = tracking.logged(config, run.path, on_event)  # TensorBoard or W&B, when the settings ask for a log
    data = data if isinstance(data, TrainData) else TrainData(Path(data))
    images = data.scan(config)
    latent_cache = data.latent_cache if config.cache_latents_to_disk else None
    setup.announce(config, images, emit)
    quiet_libraries()
    emit(JobEvent("status", f"Loading base model {base.display_name}"))
    cache = cache or ModelCache()
    started, loads = time.perf_counter(), cache.loads
    stop, trainer = stop or threading.Event(), None
    try:
        with cache.pipeline(base, f"training ({run.path.name})", long=True,
                            on_wait=status_events(emit), stop=stop) as pipe:
            load_s = time.perf_counter() - started if cache.loads > loads else None
            with setup.RUNS.run(config, emit, cache.device, lambda accelerator: Trainer(
                    pipe, config, base, images, run, accelerator, emit, stop, latent_cache)) as trainer:
                result = trainer.run(resume)
        result.costs.load_s, result.seconds = load_s, time.perf_counter() - started
        return result
    except Stopped as exc:  # before the first step: nothing was trained or saved
        emit(JobEvent("stopped", str(exc)))
        return TrainResult(None, [], 0, 0, stopped=True)
    finally:
        if trainer is not None:
            trainer.accelerator.free_memory()  # drops its references to the run's views (it collects first) ...
        free_accelerator_memory()  # ... so their GPU memory goes back only after this second collection


class Trainer(Resumable):
    """One run on a view of the leased base model, which itself is never changed."""

    def __init__(self, pipe: StableDiffusionPipeline, config: TrainConfig, base: BaseModelSpec, images: RunImages,
                 run: RunFolder, accelerator: Accelerator, emit: Emit, stop: threading.Event,
                 latent_cache: Path | None = None) -> None:
        from diffusers import DDPMScheduler

        scan, prior = images.scan, images.prior
        self.config, self.base, self.scan, self.folder = config, base, scan, run
        self.accelerator, self.emit, self.stop = accelerator, emit, stop
        self.clock = RunClock(config)
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        self.weight_dtype = DTYPES[accelerator.mixed_precision]
        self.pipe = working_view(pipe, config, accelerator.device, self.weight_dtype)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.cached = encode_images(self.pipe, scan.images + prior, config, latent_cache, self.clock, emit, stop)
        self.scaling = self.pipe.vae.config.scaling_factor
        self.text_cache = encode_fixed_captions(self.pipe, self.cached, config)
        groups = attach_network(self.pipe, config)
        self.steps_per_epoch = steps_per_epoch(self.cached, config.batch_size, config.gradient_accumulation_steps,
                                               accelerator.num_processes)
        self.epochs, self.total_steps = run_length(self.steps_per_epoch, config.epochs, config.max_train_steps)
        self.trained, self.optimizer, self.lr_scheduler, self.unet, self.compiling = setup.prepare(
            self.pipe, config, accelerator, groups, self.total_steps, emit)
        self.text_encoder = self.trained[1] if config.train_text_encoder else self.pipe.text_encoder
        self.params = [p for g in groups for p in g["params"]]
        self.lora_params = trainable_parameters(self.pipe.unet, self.pipe.text_encoder)
        self.average = WeightAverage(self.lora_params, config.ema_decay) if config.ema_decay else None
        self.generator = torch.Generator(accelerator.device).manual_seed(config.seed)  # noise made where it is used
        self.caption_rng = random.Random(config.seed)
        self.result = TrainResult(None, [], 0, 0, False, warnings=list(scan.warnings))
        self.validator = setup.make_validator(self.pipe, images, config, self.noise_scheduler, (
            self.epochs, self.total_steps), self.result.scores, lambda held: encode_images(
            self.pipe, held, config, latent_cache, None, emit, stop))
        self.facts = kohya.run_facts(images, self.cached, self.epochs, self.total_steps)
        self.base_pipe = pipe  # the strength trials render on a fresh view of it, as the Test tab does
        self.advisor = recommend.Advisor(setup.make_evaluator(
            config, base.kind == DEMO, [i.path for i in scan.images + images.held], emit), config.prompts(),
            self.result.epoch_scores)
        self.first_samples: list[Path] = []
        self.lrs: list[float | None] = []  # the learning rate of each step, for the loss chart
        self.pending: list[tuple] = []  # (loss, ready event, step, epoch, lr) of steps whose loss is not read yet
        self.last_checkpoint = time.monotonic()

    def train_step(self, batches: list[list[int]]) -> torch.Tensor:
        """One optimizer step over ``batches`` (more than one: gradient accumulation); the loss over all processes."""
        config, accelerator, scheduler = self.config, self.accelerator, self.noise_scheduler
        device = accelerator.device
        total = torch.zeros((), device=device)
        for index, batch in enumerate(batches):
            items = [self.cached[i] for i in batch]
            latents, masks = sample_latents(items, self.generator, self.caption_rng, self.scaling)
            latents = latents.to(self.weight_dtype)
            noise = training_noise(latents, self.generator, config)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),),
                                      generator=self.generator, device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            captions = [process_caption(i.caption, self.caption_rng, config.shuffle_caption, config.keep_tokens,
                                        config.caption_dropout) for i in items]
            with ExitStack() as no_sync:
                if index < len(batches) - 1:  # processes exchange gradients once, after the last micro-batch
                    for model in self.trained:
                        no_sync.enter_context(accelerator.no_sync(model))
                with accelerator.autocast():
                    hidden = (torch.stack([self.text_cache[c] for c in captions]) if self.text_cache else
                              encode_prompts(self.text_encoder, self.pipe.tokenizer, captions, config.clip_skip))
                    pred = self.unet(noisy, timesteps, hidden.to(self.weight_dtype)).sample
                weights = [config.prior_loss_weight if item.prior else 1.0 for item in items]  # class images apart
                loss = denoising_loss(pred, latents, noise, timesteps, scheduler, Objective.of(config), weights, masks)
                loss = loss.mean() / len(batches)
                accelerator.backward(loss)
            total += loss.detach()
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if config.scale_weight_norms:
            apply_max_norm([self.pipe.unet, self.pipe.text_encoder], config.scale_weight_norms)
        if self.average is not None:
            self.average.update()
        return accelerator.gather(total).mean().detach()

    def run(self, resume: bool) -> TrainResult:
        """Every epoch's steps, then the final save; ``resume`` continues from the run's saved state."""
        config, accelerator, result = self.config, self.accelerator, self.result
        start_epoch, skip = self.restore() if resume else (0, 0)
        self.first_samples = self.folder.samples_of(0) if resume else []
        length = f"{self.total_steps} steps ({self.epochs} epochs of {self.steps_per_epoch})"
        self.emit(self.event("status", f"Training {length}"))
        if not self.first_samples:
            self.first_samples = self.samples(0)
        self.advise(lambda: self.advisor.start(self.first_samples))  # resumed: what its saves so far recommend
        accumulation = config.gradient_accumulation_steps
        for epoch in range(start_epoch, self.epochs):
            if self.stop.is_set():  # pressed while samples rendered: nothing of this epoch ran yet
                result.stopped = True
                self.checkpoint(epoch, skip if epoch == start_epoch else 0)
                break
            plan = plan_epoch(self.cached, config.batch_size, config.seed, epoch, accelerator.process_index,
                              accelerator.num_processes)
            steps = [plan[i:i + accumulation] for i in range(0, len(plan), accumulation)]
            done = skip if epoch == start_epoch else 0
            for batches in steps[done:]:
                loss = self.train_step(batches)
                done += 1
                self.report(loss, epoch, done)
                if self.stop.is_set() or result.steps >= self.total_steps:
                    break
                if config.sample_every_n_steps and result.steps % config.sample_every_n_steps == 0:
                    self.samples(epoch + 1, step=result.steps)
                if config.validation_every_n_steps and result.steps % config.validation_every_n_steps == 0:
                    self.validate(epoch + 1)
            result.epochs = epoch + 1
            if self.stop.is_set():
                result.stopped = True
                self.checkpoint(epoch, done)
                break
            self.end_epoch(epoch + 1)
            if self.validator is not None and self.validator.stalled(config.early_stopping_patience):
                result.stopped_early = True
                self.emit(self.event("status", self.validator.early_stop_note(config.early_stopping_patience)))
                break
        return self.finish()

    def report(self, loss: torch.Tensor, epoch: int, steps_in_epoch: int) -> None:
        """Count a step and time it; its loss is read once the device has it (a non-blocking copy, so the next
        step is already queued and the GPU never waits for the host). Keeps the resume state fresh on long epochs."""
        self.result.steps += 1
        fit_threads()  # other processes come and go during a long run
        self.clock.step()
        if self.compiling:  # the first step compiled the UNet: reported apart, and kept out of the speed
            self.compiling = False
            self.emit(JobEvent("status", f"torch.compile warm-up: {self.clock.forget_last_step():.0f} s"))
        ready = None
        if loss.is_cuda:
            loss, ready = loss.to("cpu", non_blocking=True), torch.cuda.Event()
            ready.record()
        self.pending.append((loss, ready, self.result.steps, epoch, self.lr_scheduler.get_last_lr()[0]))
        self.read_losses(wait=False)
        if time.monotonic() - self.last_checkpoint > CHECKPOINT_SECONDS:
            self.checkpoint(epoch, steps_in_epoch)

    def read_losses(self, wait: bool = True) -> None:
        """Record the losses the device has finished (all of them with ``wait``), in order: the loss chart and the
        progress event of each step; a NaN stops the run before anything else is saved."""
        result = self.result
        while self.pending:
            value, ready, step, epoch, lr = self.pending[0]
            if ready is not None and not wait and not ready.query():
                return
            if ready is not None:
                ready.synchronize()
            self.pending.pop(0)
            loss = float(value)
            if not math.isfinite(loss):
                self.emit(JobEvent("error", "The loss became NaN/inf: training stopped and the last saved epoch "
                                            "kept. Lower the learning rate, or use bf16 instead of fp16."))
                raise UserError(f"Training diverged at step {step} (loss {loss}). "
                                "Lower the learning rate, or use bf16 instead of fp16.")
            result.losses.append(loss)
            self.lrs.append(lr)
            rate = result.it_per_s = self.clock.it_per_s()
            besides = self.clock.time_besides_steps(self.epochs, self.total_steps, epoch, step)
            eta = (self.total_steps - step) / rate + besides if rate else None
            self.emit(JobEvent("step", step=step, total_steps=self.total_steps, epoch=epoch + 1,
                               total_epochs=self.epochs, loss=loss, lr=lr, it_per_s=rate, eta_s=eta))

    def end_epoch(self, epoch: int) -> None:
        """Keep the resume state, and every ``save_every_n_epochs`` save a LoRA file and render samples."""
        config = self.config
        self.emit(self.event("epoch", f"Epoch {epoch}/{self.epochs} done", epoch=epoch))
        self.checkpoint(epoch, 0)
        if epoch < self.epochs and config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            self.validate(epoch, self.judged_file(epoch))  # first, for the file's metadata
            saved = self.save(epoch)
            paths = self.samples(epoch, saved)
            self.advise(lambda: self.advisor.add(epoch, saved, self.result.scores, self.result.steps, paths))

    def finish(self) -> TrainResult:
        """The final save (also after a Stop) and the last samples."""
        result, accelerator = self.result, self.accelerator
        if accelerator.device.type == "cuda":
            result.peak_memory_gb = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        result.costs = self.clock.costs()
        if accelerator.is_main_process:
            if not result.stopped:
                self.validate(result.epochs, self.judged_file(None))
            result.lora_path = self.save(None)
            if not result.stopped:
                paths = self.samples(result.epochs, result.lora_path)
                self.advise(lambda: self.advisor.add(result.epochs, result.lora_path, result.scores, result.steps,
                                                     paths))
                grid = sample_grid(self.folder, self.config.prompts())
                if grid is not None:
                    result.saved.append(grid)
                    self.emit(self.event("saved", "Saved the sample grid (epochs × prompts)", path=str(grid)))
                self.advise(lambda: self.advisor.finish(self.base_pipe, self.base, self.config, self.folder.path,
                                                        self.folder.samples_of, self.stop, self.emit))
                self.folder.finish()
            self.folder.write_progress(result.steps, self.total_steps, result.losses, not result.stopped, result.scores)
        result.checking_s = self.clock.checking_s()
        accelerator.wait_for_everyone()
        verb = "Stopped" if result.stopped else "Finished"
        self.emit(self.event("stopped" if result.stopped else "done",
                             f"{verb} after {result.steps} steps: {result.lora_path}", epoch=result.epochs,
                             path=str(result.lora_path) if result.lora_path else None))
        return result

    def validate(self, epoch: int, file: Path | None = None) -> None:
        """Score the held-out images with the LoRA as it is now, at a save (``file``) or between saves; once per
        step, so the final file of a run stopped early shares its last epoch's score."""
        if self.validator is None or not self.accelerator.is_main_process or self.validator.scored(self.result.steps):
            return
        self.read_losses()
        with self.clock.apart(self.clock.validations), self.accelerator.autocast(), setup.evaluating(self.pipe), \
                self.judged():
            score, line = self.validator.score(self.result.steps, epoch, file, self.pipe.unet,  # not DDP's wrapper:
                                               self.pipe.text_encoder, self.pipe.tokenizer)  # rank 0 alone scores
        self.emit(self.event("validation", line + self.weights_note, epoch=epoch, loss=score.loss))

    def judged(self) -> AbstractContextManager:
        """The weights that samples and scores are of: with EMA on, the average (the file a person keeps)."""
        return self.average.applied() if self.average is not None else nullcontext()

    @property
    def weights_note(self) -> str:
        """What the logs add to a sample or score line to say which weights made it."""
        return " (EMA weights)" if self.average is not None else ""

    def judged_file(self, epoch: int | None, stopped_at: int | None = None) -> Path:
        """The file of an epoch's save (``None``: the run's) that its scores, samples and recommendation name."""
        path = self.folder.lora_file(self.config.output_name, epoch, stopped_at)
        return ema_file(path) if self.average is not None else path

    def event(self, kind: str, message: str, **fields: object) -> JobEvent:
        """An event carrying the run's step and totals."""
        return JobEvent(kind, message, **{"step": self.result.steps, "total_steps": self.total_steps,
                                         "total_epochs": self.epochs, **fields})

    def save(self, epoch: int | None) -> Path | None:
        """Write the LoRA as kohya files: an epoch's, or (``None``) the final one, and with EMA on its average beside
        it; returns the one its scores and samples are of. Rank 0 writes for everyone."""
        self.read_losses()  # a NaN stops the run before it is saved
        if not self.accelerator.is_main_process:
            return None
        stopped_at = self.result.steps if self.result.stopped else None
        path = self.write(self.folder.lora_file(self.config.output_name, epoch, stopped_at), epoch, not self.average)
        if self.average is not None:
            with self.average.applied():
                path = self.write(self.judged_file(epoch, stopped_at), epoch, True)
        return path

    def write(self, target: Path, epoch: int | None, judged: bool) -> Path:
        """One kohya file of the weights now in the model, with its card, workflow and preview; the held-out scores
        go into its metadata where they are of these weights (``judged``)."""
        config, result = self.config, self.result
        with self.clock.apart(self.clock.saves):
            tensors = kohya.lora_state_dict({"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder},
                                            DTYPES[config.save_dtype])
            facts = replace(self.facts, steps=result.steps, epoch=epoch or result.epochs,
                            scores=result.scores if judged else [])
            metadata = {**kohya.build_metadata(config, self.base, facts),
                        "lora_gradio_weights": "ema" if is_ema_file(target) else "trained"}
            path = kohya.save_lora(target, tensors, metadata)
            cards.write_card(path, config, self.base.display_name, result.steps, epoch or result.epochs,
                             self.scan.total_repeats)
            cards.write_workflow(path, config, self.base.display_name)
            latest = self.folder.latest_sample()
            if latest is not None:  # the samples of this epoch replace it once they are rendered
                cards.write_preview(path, latest)
        result.saved.append(path)
        self.emit(self.event("saved", f"Saved {path.name}", epoch=epoch or result.epochs, path=str(path)))
        return path

    def samples(self, epoch: int, lora: Path | None = None, step: int | None = None) -> list[Path]:
        """Render the sample prompts with the model as it is now: at an epoch's save (the state saved in ``lora``,
        whose card thumbnail the first becomes) or at ``step``; warn when they look overcooked."""
        if not self.config.sample_prompts or not self.accelerator.is_main_process:
            return []
        when = f"step {step}" if step is not None else f"epoch {epoch}"
        self.emit(JobEvent("status", f"Rendering sample images for {when}"))
        try:
            # autocast: the UNet hands fp32 out, and the VAE keeps its own precision
            with self.clock.apart(self.clock.renders), self.accelerator.autocast(), self.judged():
                paths = render_samples(self.pipe, self.config, self.folder, epoch, self.base.display_name, lora,
                                       step, self.stop)
        except RenderStopped:
            self.emit(JobEvent("status", f"Stop pressed: the samples for {when} were left unrendered"))
            return []
        if lora is not None:
            cards.write_preview(lora, paths[0])
        self.emit(self.event("samples", f"Samples for {when}{self.weights_note}", epoch=epoch,
                             paths=[str(p) for p in paths]))
        if warning := scoring.overtraining_warning(self.first_samples, paths, when):
            self.emit(JobEvent("warning", warning, epoch=epoch))
        return paths

    def advise(self, judge: Callable[[], recommend.Recommendation | None]) -> None:
        """Judge (timed apart from the steps, as what the recommendation costs), and keep a new recommendation and
        show it on the card and in the log."""
        with self.clock.apart(self.clock.judging):
            recommendation = judge()
        if recommendation is not None:
            self.result.recommendation = recommendation
            self.emit(self.event("recommendation", recommendation.headline(), epoch=recommendation.epoch,
                                 path=str(self.folder.path / recommendation.file), record=recommendation.record()))

