"""lora-gradio: from a folder of photos to a Stable Diffusion LoRA that every SD tool loads."""

__version__ = "0.1.0"

import logging

from . import threads

threads.configure()  # before anything imports torch: see threads.py

# bitsandbytes warns on every CPU run about optional kernels it could download; that is not the user's business.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
