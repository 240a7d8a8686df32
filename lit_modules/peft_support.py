"""Parameter-efficient fine-tuning through the ``peft`` library, for every task.

A run asks for a method with a plain mapping (``model.peft`` in YAML; presets in ``configs/peft/``):

    peft: {peft_type: LORA, r: 8, lora_alpha: 16, lora_dropout: 0.1}

Any ``peft_type`` that ``peft`` knows works (LORA, ADALORA, IA3, PREFIX_TUNING, PROMPT_TUNING,
P_TUNING, LOHA, LOKR, OFT, VERA, ...); the other keys are that method's config fields. The task sets
``task_type``, so ``peft`` keeps the task head trainable and, where ``target_modules`` is not given,
picks them for the architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lit_modules.errors import ConfigError

PROMPT_LEARNING = {"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT"}


def build_peft_config(spec: dict[str, Any], task_type: str | None) -> Any:
    """A ``peft`` config object from ``spec``; errors name the key and list what is accepted."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    spec = dict(spec)
    kind = str(spec.pop("peft_type", spec.pop("method", ""))).upper()
    by_name = {str(k.value if hasattr(k, "value") else k).upper(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind not in by_name:
        raise ConfigError(f"model.peft.peft_type: expected one of {', '.join(sorted(by_name))}, got {kind or 'nothing'!r}")
    config_class = by_name[kind]
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        accepted = sorted(fields - {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                                    "inference_mode"})
        raise ConfigError(f"model.peft.{unknown[0]}: unknown option for {kind}; accepted: {', '.join(accepted)}")
    if task_type is not None and "task_type" in fields:
        spec.setdefault("task_type", task_type)
    if kind == "ADALORA":
        # peft insists on a total at construction; the base module replaces it with the trainer's real
        # number of optimizer steps before training starts
        spec.setdefault("total_step", 10**9)
    try:
        return config_class(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.peft: invalid {kind} settings: {str(e).splitlines()[0]}") from None


def peft_type(config: Any) -> str:
    value = config.peft_type
    return str(getattr(value, "value", value)).upper()


def apply_peft(model: Any, config: Any) -> Any:
    """Wrap ``model``; a method that does not fit the architecture fails here with the reason."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError, AttributeError, NotImplementedError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "target" in reason.lower() or "No modules were targeted" in reason:
            hint = f"; modules that can be targeted: {', '.join(linear_module_names(model)[:40])}"
        raise ConfigError(f"model.peft: {peft_type(config)} does not fit {type(model).__name__}: {reason}{hint}") from None


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name components of the model's linear / conv / embedding layers (target_modules candidates)."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds) and name}
    names |= {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if type(module).__name__ == "Conv1D" and name}
    return sorted(names)


def adalora_allocator(model: Any) -> Any:
    """The AdaLoRA rank allocator of a wrapped model, or None for other methods."""
    base = getattr(model, "base_model", None)
    return getattr(base, "rankallocator", None) if base is not None and hasattr(base, "update_and_allocate") else None


def adalora_ranks(model: Any) -> dict[str, int]:
    """Current rank of every AdaLoRA layer: the number of singular values still non-zero."""
    ranks = {}
    for name, module in model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if isinstance(lora_e, torch.nn.ParameterDict) and "default" in lora_e:
            ranks[name] = int((lora_e["default"].detach() != 0).sum())
    return ranks


ADALORA_STATISTICS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def adalora_state(model: Any) -> dict[str, Any] | None:
    """What AdaLoRA keeps outside the state dict, for an exact resume; None for other methods.

    The rank allocator's importance statistics (per-parameter tensors; the ranks it masks next depend on
    them) and the rank pattern in the peft config (the final steps re-apply it; the export writes it).
    Plain tensors, strings and lists only, so checkpoints still load with ``torch.load(weights_only=True)``.
    """
    allocator = adalora_allocator(model)
    if allocator is None:
        return None
    state: dict[str, Any] = {key: {n: t.detach() for n, t in getattr(allocator, key).items()}
                             for key in ADALORA_STATISTICS}
    pattern = model.base_model.peft_config[allocator.adapter_name].rank_pattern
    state["rank_pattern"] = {n: [bool(b) for b in bits] for n, bits in pattern.items()} if pattern else None
    return state


def load_adalora_rank_pattern(model: Any, state: dict[str, Any]) -> None:
    """Put a saved rank pattern (``adalora_state``) back into the model's AdaLoRA config."""
    allocator = adalora_allocator(model)
    if allocator is not None:
        model.base_model.peft_config[allocator.adapter_name].rank_pattern = state.get("rank_pattern")


def load_adalora_statistics(model: Any, state: dict[str, Any]) -> None:
    """Put saved importance statistics (``adalora_state``) back into the rank allocator, each tensor on the
    device of its parameter (call it once the model sits where it trains)."""
    allocator = adalora_allocator(model)
    if allocator is None:
        return
    params = dict(model.base_model.model.named_parameters())
    unknown = sorted(set(state["ipt"]) - set(params))
    if unknown:
        raise ConfigError(f"checkpoint: AdaLoRA statistics for {unknown[0]}, which this model lacks: was it saved "
                          "with the same model.peft settings?")
    for key in ADALORA_STATISTICS:
        setattr(allocator, key, {n: t.to(params[n].device) for n, t in state[key].items()})
