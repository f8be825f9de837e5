"""What a view of the cached base costs (training and the Test tab each take one), against a full copy.

    python bench/view_speed.py --base sd15-random
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_speed import timed

from lora_gradio.cache import ModelCache
from lora_gradio.models import resolve_base
from lora_gradio.views import pipeline_view


def main() -> None:
    """Time a same-precision view, a bf16 view and a deep copy of the UNet, text encoder and VAE."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="demo")
    args = parser.parse_args()
    cache = ModelCache()
    with cache.pipeline(resolve_base(args.base), "the view benchmark") as pipe:
        shared = timed(lambda: pipeline_view(pipe))
        cast = timed(lambda: pipeline_view(pipe, dtype=torch.bfloat16))
        deep = timed(lambda: [copy.deepcopy(getattr(pipe, n)) for n in ("unet", "text_encoder", "vae")])
        device = pipe.unet.device.type
    print(json.dumps({"base": args.base, "device": device, "view_sharing_weights_s": round(shared, 3),
                      "view_cast_to_bf16_s": round(cast, 3), "reference_deepcopy_s": round(deep, 3)}))


if __name__ == "__main__":
    main()
