"""Loading a model dir with its tokenizer, and stacking per-example arrays into batch tensors.

`load_model_dir` is the one loader of a trained dir for inference (Captioner, MatchScorer); `collate` is shared
with the training loop's validation and benchmark batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mengzi_ray.modeling.checkpoint import OscarPreTrainedModel
from mengzi_ray.modeling.config import OscarConfig
from mengzi_ray.modeling.model_dir import input_layout
from mengzi_ray.text import load_tokenizer

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=OscarPreTrainedModel)


def collate(
    examples: Sequence[dict[str, np.ndarray]], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Stack per-example numpy arrays into batch tensors on `device`; floating arrays (img_feats) become `dtype`
    when given (a bf16/fp16 model), integer arrays (ids, masks) keep theirs."""
    out = {}
    for key in examples[0]:
        tensor = torch.as_tensor(np.stack([e[key] for e in examples]))
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.to(device)
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None → cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'float16' / 'float32' / a torch dtype / None (keep the checkpoint's float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return value


def load_model_dir(
    model_cls: type[ModelT],
    model_dir: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> tuple[ModelT, PreTrainedTokenizerBase]:
    """(model in eval mode on `device` / `dtype`, the dir's tokenizer with the casing its config records).

    `model_dir`: local or s3://. `config_overrides`: layout values for an original dir that records none (the
    evaluate card's model_layout); a dir that records its layout is never overridden by its callers."""
    model = model_cls.from_pretrained(model_dir, **(config_overrides or {}))
    model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval()
    tokenizer = load_tokenizer(model.source_dir or model_dir, do_lower_case=model.config.do_lower_case)
    log.info("%s %s: input layout %s", model_cls.__name__, model_dir, input_layout(model.config))
    return model, tokenizer


def model_placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of a model's parameters: where its input tensors must go."""
    param = next(model.parameters())
    return param.device, param.dtype


class ModelDirRunner:
    """Base of Captioner and MatchScorer: `from_model_dir` loads the subclass's `model_cls` through
    `load_model_dir` and hands (model, tokenizer) to the subclass's constructor."""

    model_cls: ClassVar[type[torch.nn.Module]]
    model: Any

    @classmethod
    def from_model_dir(cls, model_dir: str, device: str | torch.device | None = None,
                       dtype: str | torch.dtype | None = None, *, config_overrides: dict[str, Any] | None = None,
                       **options: Any) -> Self:
        """Load `model_dir` (local or s3://) on `device` (None: cuda if available) in `dtype` (None: float32);
        `options` are the constructor's keywords."""
        model, tokenizer = load_model_dir(cls.model_cls, model_dir, device, dtype, config_overrides)
        return cls(model, tokenizer, **options)  # type: ignore[call-arg]  # subclasses take (model, tokenizer, ...)

    @property
    def config(self) -> OscarConfig:
        return self.model.config

