"""The built-in demo: a tiny base model that draws flat shapes, and a new shape (a ring) for a LoRA to learn."""
