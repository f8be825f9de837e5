"""lora-gradio: from a folder of photos to a Stable Diffusion LoRA that every SD tool loads."""

__version__ = "0.1.0"
