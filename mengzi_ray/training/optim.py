"""AdamW with the original no-decay groups and the warmup-linear schedule (Oscar/VinVL and Langboat/Mengzi READMEs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

CAPTION_NO_DECAY = ("bias", "LayerNorm.weight")  # captioning / retrieval
PRETRAIN_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")  # pretraining


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, no_decay: tuple[str, ...] = CAPTION_NO_DECAY, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW(eps 1e-8) over trainable parameters; names containing a `no_decay` entry get weight decay 0.

    `fused`: torch's single-kernel AdamW where every parameter's device has it (same update as the default
    foreach kernel up to float rounding), else the foreach kernel."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if any(nd in name for nd in no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    kernel = {"fused": True} if fused and _fused_available(decay + plain) else {}
    return torch.optim.AdamW(groups, lr=lr, eps=1e-8, **kernel)


def _fused_available(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: all floating point, on devices it has a kernel for."""
    supported = _get_fused_kernels_supported_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in supported for p in params)


def warmup_linear(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr × step/warmup during warmup, then linear decay to 0 at total_steps."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps > 0")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
