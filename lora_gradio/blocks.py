"""The UNet's 25 blocks as kohya counts them for block-wise ranks and learning rates (``block_dims``,
``block_alphas``, ``down_lr_weight`` …): IN00–IN11 (the original layout's input blocks), MID, OUT00–OUT11."""

from __future__ import annotations

import re

BLOCKS = [f"IN{index:02d}" for index in range(12)] + ["MID"] + [f"OUT{index:02d}" for index in range(12)]
MID = BLOCKS.index("MID")
UP_DOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")


def block_index(module: str) -> int | None:
    """The block of a UNet module, from its kohya name (``lora_unet_down_blocks_1_attentions_0_…``) or diffusers
    path (``down_blocks.1.attentions.0.…``); None outside the 25 (``conv_in``, the time embedding)."""
    name = module.replace(".", "_") + "_"
    found = UP_DOWN.search(name)
    if found:
        side, outer, kind, inner = found.groups()
        within = 3 * int(outer) + (2 if kind in ("upsamplers", "downsamplers") else int(inner))
        return 1 + within if side == "down" else MID + 1 + within
    return MID if "mid_block_" in name else None
