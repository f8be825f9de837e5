"""Training: the config and presets, the loop, and the kohya LoRA format."""
