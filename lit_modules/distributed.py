"""Helpers for sharded training strategies (FSDP)."""

from __future__ import annotations

import torch

_BLOCK_NAMES: set[str] = set()


def transformer_block_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: every transformer block of a Hugging Face model is its own FSDP unit.

    The block classes are the model's ``_no_split_modules`` (``BertLayer``, ``LlamaDecoderLayer``, ...),
    read when FSDP first visits the root module, so one preset serves every architecture.
    """
    if recurse:
        if not _BLOCK_NAMES:
            for sub in module.modules():
                names = getattr(sub, "_no_split_modules", None)
                if names:
                    _BLOCK_NAMES.update(names)
        return True
    return type(module).__name__ in _BLOCK_NAMES
