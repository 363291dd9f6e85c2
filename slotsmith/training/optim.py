"""The optimizer over the slot's masters, and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from slotsmith.errors import SlotsmithError
from slotsmith.train import TrainSettings


def lr_factor(settings: TrainSettings, step: int, total: int) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.lr_scheduler == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
    if settings.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer over the slot's masters.

    Raises:
        SlotsmithError: The optimizer's library is not installed.
    """
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SlotsmithError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    try:
        from transformers.optimization import Adafactor
    except ImportError:
        raise SlotsmithError("--optimizer adafactor needs transformers (pip install transformers)") from None
    return Adafactor(
        params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
