"""The Test tab's own cost: each image at every layer a request passes, side by side with the bare diffusers pipeline
call with the same LoRA file applied at the same strengths, taken in turns in one run. Prints JSON.

Layers: ``library`` (inference.generate on the cached base), ``studio`` (its own thread and the PNG file),
``api`` (app.py on loopback, /generate through gradio_client, the image downloaded), then N API visitors at once.
Three kinds of change: a new strength on the file in use, a switch between two files used before, and a file never
used before (loaded by diffusers' ``load_lora_weights`` for the reference).

    python bench/generate_speed.py --base demo --steps 20
    python bench/generate_speed.py --base sd15-random --steps 20 --visitors 0      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from gradio_client import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from browser import running_app  # noqa: E402  (the tests' launcher: the real app.py on a free port)

from lora_gradio.cache import ModelCache  # noqa: E402
from lora_gradio.inference import generate  # noqa: E402
from lora_gradio.models import BaseModelSpec  # noqa: E402
from lora_gradio.request import SAMPLERS, GenerateRequest  # noqa: E402
from lora_gradio.studio import Studio  # noqa: E402
from lora_gradio.threads import on_own_thread  # noqa: E402
from lora_gradio.training import kohya  # noqa: E402
from lora_gradio.training.config import TrainConfig  # noqa: E402
from lora_gradio.training.network import add_lora_adapters  # noqa: E402
from lora_gradio.views import pick_device, pipeline_view  # noqa: E402
from lora_gradio.workspace import Workspace  # noqa: E402

PROMPT = "a red circle on a blue background"
STRENGTHS = (1.0, 0.5, 0.8, 0.6)


def write_lora(cache: ModelCache, base: BaseModelSpec, folder: Path, seed: int) -> Path:
    """A random rank-16 LoRA on the base model's attention layers, saved in kohya format."""
    with cache.pipeline(base, "writing a benchmark LoRA") as base_pipe:
        pipe = pipeline_view(base_pipe)
        add_lora_adapters(pipe.unet, pipe.text_encoder, TrainConfig(rank=16, alpha=16, train_text_encoder=True))
        torch.manual_seed(seed)
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
        tensors = kohya.lora_state_dict({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, torch.float16)
    return kohya.save_lora(folder / f"lora{seed}.safetensors", tensors, {"ss_network_dim": "16"})


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call on a thread of its own, as the app renders, waiting for the GPU to finish."""
    def run() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return on_own_thread(run)


class Reference:
    """The bare diffusers pipeline over the cached base, each file loaded once by diffusers' own ``load_lora_weights``
    as its own adapter and chosen with ``set_adapters``, as a diffusers user compares files."""

    def __init__(self, cache: ModelCache, base: BaseModelSpec, steps: int) -> None:
        self.cache, self.base, self.steps = cache, base, steps
        self.adapters: dict[Path, str] = {}

    def image(self, lora: Path, strength: float) -> None:
        """Load ``lora`` if it is new, weight it, render."""
        import diffusers

        with self.cache.pipeline(self.base, "the reference call") as base_pipe:
            pipe = self.cache.derived("reference", lambda: pipeline_view(base_pipe))
            if lora not in self.adapters:
                self.adapters[lora] = f"file{len(self.adapters)}"
                pipe.load_lora_weights(str(lora), adapter_name=self.adapters[lora])
            pipe.set_adapters([self.adapters[lora]], adapter_weights=[{"unet": strength, "text_encoder": strength}])
            sampler = SAMPLERS["Euler"]
            pipe.scheduler = getattr(diffusers, sampler.diffusers_class).from_config(pipe.scheduler.config,
                                                                                     **sampler.diffusers_config)
            pipe(PROMPT, num_inference_steps=self.steps, generator=torch.Generator("cpu").manual_seed(1))


def stats(values: list[float]) -> dict:
    """How many, the median and the p95, in seconds."""
    ordered = sorted(values)
    return {"count": len(values), "median": round(statistics.median(ordered), 3),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def visitors_at_once(url: str, base: str, label: str, steps: int, count: int, images: int) -> dict:
    """``count`` API visitors, each asking for ``images`` images with a new strength each; throughput and latency."""
    clients = [Client(url, verbose=False) for _ in range(count)]
    latencies: list[float] = []
    lock = threading.Lock()

    def visitor(index: int, client: Client) -> None:
        for turn in range(images):
            start = time.perf_counter()
            client.predict(prompt=PROMPT, seed=index * 100 + turn, steps=steps, lora=label, base=base,
                           strength_model=STRENGTHS[turn % len(STRENGTHS)],
                           strength_clip=STRENGTHS[turn % len(STRENGTHS)], api_name="/generate")
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=visitor, args=(i, c)) for i, c in enumerate(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"visitors": count, "images": len(latencies), "seconds": round(wall, 2),
            "images_per_s": round(len(latencies) / wall, 3), "latency_s": stats(latencies)}


def main() -> None:
    """Warm every layer up, take the changes in turns, then the visitors at once; print every layer's medians and
    its ratio to the reference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="turns over every strength and file change")
    parser.add_argument("--visitors", type=int, default=5, help="API visitors generating at once (0: none)")
    parser.add_argument("--images", type=int, default=4, help="images each of those visitors asks for")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-generate-"))
    studio = Studio(Workspace.open(root / "workspace"))
    base = studio.base(args.base)
    cache = studio.free_cache(("pipeline", base))
    first = timed(lambda: studio.generate(args.base, GenerateRequest(PROMPT, seed=1, steps=args.steps)))
    studio.workspace.loras_dir.mkdir(parents=True, exist_ok=True)
    folder = studio.workspace.loras_dir
    layer_names = ("reference", "library", "studio", "api")
    # two files every layer switches between, then a file of its own for each new-file turn of each layer
    count = 2 + args.rounds * 2 * len(layer_names)
    loras = [on_own_thread(lambda seed=seed: write_lora(cache, base, folder, seed)) for seed in range(1, count + 1)]
    fresh = {name: iter(loras[2 + index::len(layer_names)]) for index, name in enumerate(layer_names)}
    reference = Reference(cache, base, args.steps)

    def request(lora: Path, strength: float) -> GenerateRequest:
        return GenerateRequest(PROMPT, seed=1, steps=args.steps, lora=lora, strength_model=strength,
                               strength_clip=strength)

    with running_app(root / "workspace") as url:
        client = Client(url, verbose=False)
        layers: dict[str, Callable[[Path, float], object]] = {
            "reference": reference.image,
            "library": lambda lora, s: generate(cache, base, request(lora, s)),
            "studio": lambda lora, s: studio.generate(args.base, request(lora, s)),
            "api": lambda lora, s: client.predict(prompt=PROMPT, seed=1, steps=args.steps, lora=f"loras/{lora.name}",
                                                  base=args.base, strength_model=s, strength_clip=s,
                                                  api_name="/generate"),
        }
        for layer in layers.values():  # every layer's model loaded, and the two files it switches between attached
            for lora in loras[:2]:
                timed(lambda layer=layer, lora=lora: layer(lora, 1.0))
        times: dict[str, dict[str, list[float]]] = {name: {"strength": [], "switch": [], "new_file": []}
                                                    for name in layers}

        def turn(kind: str, pick: Callable[[str], Path], strength: float) -> None:
            """One image from every layer, one after the other."""
            for name, layer in layers.items():
                times[name][kind].append(timed(partial(layer, pick(name), strength)))

        for _ in range(args.rounds):
            for strength in STRENGTHS:
                turn("strength", lambda _: loras[0], strength)
            for lora in (loras[1], loras[0]):
                turn("switch", lambda _, lora=lora: lora, 0.7)
                turn("new_file", lambda name: next(fresh[name]), 0.7)
        crowd = visitors_at_once(url, args.base, f"loras/{loras[0].name}", args.steps, args.visitors, args.images) \
            if args.visitors else None
    summary = {name: {change: stats(values) for change, values in kinds.items()} for name, kinds in times.items()}
    ratios = {name: {change: round(summary[name][change]["median"] / summary["reference"][change]["median"], 2)
                     for change in summary[name]} for name in layers if name != "reference"}
    one_visitor = 1 / summary["api"]["strength"]["median"]
    print(json.dumps({
        "device": torch.cuda.get_device_name() if pick_device().type == "cuda" else "cpu", "base": args.base,
        "steps": args.steps, "rounds": args.rounds, "first_image_s": round(first, 3), "layers": summary,
        "ratio_to_reference": ratios, "one_visitor_images_per_s": round(one_visitor, 3), "visitors_at_once": crowd,
    }, indent=1))


if __name__ == "__main__":
    main()
