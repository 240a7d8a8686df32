"""Helpers for sharded training strategies (FSDP, DeepSpeed): the auto-wrap policy, restoring the best
weights and gathering the complete weights for the Hugging Face export."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lit_modules.errors import ConfigError

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


def restore_weights(trainer: Any, checkpoint_path: str) -> None:
    """Load a checkpoint's weights into the trained model, whatever the strategy wrote: one file (one device,
    DDP, FSDP's full state dict), FSDP's sharded folder or DeepSpeed's folder. Call it on every process."""
    strategy = trainer.strategy
    checkpoint = strategy.load_checkpoint(checkpoint_path)
    # FSDP and DeepSpeed load the weights in load_checkpoint and make this a no-op
    strategy.load_model_state_dict(checkpoint, strict=trainer.strategy.lightning_module.strict_loading)


def full_state_dict(trainer: Any, checkpoint_path: Optional[str] = None) -> Optional[dict[str, torch.Tensor]]:
    """The LightningModule's complete weights on global rank 0 when a sharded strategy holds them in pieces.

    ``None`` when every process holds the whole model (one device, DDP, DeepSpeed ZeRO-1/2): export the
    module as it is. FSDP: the shards are gathered with collectives, so every process must call this.
    DeepSpeed ZeRO-3: DeepSpeed's own conversion gathers the checkpoint folder ``checkpoint_path``.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # full_state_dict + cpu_offload: gathered on rank 0 only, into CPU memory (whatever state_dict_type saves)
        state = get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if trainer.is_global_zero else None
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        if not checkpoint_path:
            raise ConfigError("export: DeepSpeed ZeRO-3 keeps the weights partitioned; gathering them for the export "
                              "needs a checkpoint (leave checkpointing on)")
        strategy.barrier("export")
        if not trainer.is_global_zero:
            return None
        import tempfile

        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            return convert_zero_checkpoint_to_fp32_state_dict(checkpoint_path, f"{tmp}/full.ckpt")["state_dict"]
    return None
