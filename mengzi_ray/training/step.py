"""The optimiser step every training loop shares (Ray Train workers, the plain single-process loop, the step
benchmark), configured by the card's optim section:

    precision       fp32, or autocast to bfloat16 / float16 (float16 adds a GradScaler: dynamic loss scaling)
    fused AdamW     the single-kernel AdamW where the device has one (CUDA, and CPU in current PyTorch)
    checkpointing   each trunk layer's activations recomputed in the backward pass (OscarModel.gradient_checkpointing)
    compile         torch.compile of the forward module (dynamic shapes: the packed token count varies per batch)

Per optimiser step the caller runs, for each micro-batch, `with step.autocast(): loss = ...` then
`step.backward(loss)`, and once `step.update()` (unscale, clip, optimiser step, scaler update).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mengzi_ray.training.card import OptimSection


@dataclass(frozen=True)
class StepOptions:
    """amp_dtype None = fp32. max_grad_norm <= 0 disables clipping."""

    amp_dtype: torch.dtype | None = None
    fused: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    max_grad_norm: float = 1.0

    @classmethod
    def from_card(cls, optim: OptimSection, device: torch.device) -> "StepOptions":
        """CPU workers autocast only with optim.amp_on_cpu (most CPUs run bf16 slower than fp32)."""
        autocast = optim.amp and (device.type != "cpu" or optim.amp_on_cpu)
        return cls(
            amp_dtype=getattr(torch, optim.amp_dtype) if autocast else None,
            fused=optim.fused,
            gradient_checkpointing=optim.gradient_checkpointing,
            compile=optim.compile,
            compile_backend=optim.compile_backend,
            max_grad_norm=optim.max_grad_norm,
        )


class TrainStep:
    """The optimiser side of one model: `core` (the unwrapped model the optimiser owns), `optimizer`, and the
    GradScaler for float16. `forward_module(model)` is what the loop calls forward on (compiled when asked)."""

    def __init__(self, core: nn.Module, optimizer: torch.optim.Optimizer, options: StepOptions, device: torch.device):
        self.core = core
        self.optimizer = optimizer
        self.options = options
        self.device = device
        trunk = getattr(core, "bert", None)
        if options.gradient_checkpointing:
            if trunk is None or not hasattr(trunk, "gradient_checkpointing"):
                raise ValueError(f"optim.gradient_checkpointing: {type(core).__name__} has no Oscar trunk to checkpoint")
            trunk.gradient_checkpointing = True
        self.scaler = torch.amp.GradScaler(device.type) if options.amp_dtype == torch.float16 else None

    def forward_module(self, model: nn.Module) -> nn.Module:
        """`model` (the core, or its DDP wrapper), compiled when options.compile."""
        return torch.compile(model, dynamic=True, backend=self.options.compile_backend) if self.options.compile else model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.options.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.options.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self) -> None:
        """Unscale (float16), clip the global grad norm, step the optimiser (skipped by the scaler on inf/NaN)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.options.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.options.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries besides the optimiser: the loss scale (float16), else nothing."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
