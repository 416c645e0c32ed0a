"""Model dirs: config.json + weights + vocab.txt, read and written with the original Oscar key names.

Reads our dirs (model.safetensors) and original Oscar / Mengzi-Oscar dirs (pytorch_model.bin, loaded with
`torch.load(weights_only=True)`: a file that is not a plain tensor state dict is refused, never unpickled).
Writes safetensors. Loading is strict: every key the file and the model disagree on is an error naming the file,
except the ones the original also ignores when a checkpoint moves between tasks (each class lists them).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mengzi_ray import storage
from mengzi_ray.modeling.config import OscarConfig
from mengzi_ray.modeling.generation import SpecialIds

log = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
VOCAB_NAME = "vocab.txt"

M = TypeVar("M", bound="OscarPreTrainedModel")


@dataclass
class LoadReport:
    """What a load did: the file, and keys that were tolerated (logged) rather than loaded."""

    file: str
    missing: list[str] = field(default_factory=list)  # initialised fresh
    unexpected: list[str] = field(default_factory=list)  # ignored
    mismatched: list[str] = field(default_factory=list)  # shape differs, initialised fresh


def read_state_dict(model_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The weights of a model dir as a CPU state dict, with TF-style gamma/beta names mapped to weight/bias."""
    for name in (SAFETENSORS_NAME, PYTORCH_NAME):
        path = model_dir / name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"{model_dir}: no {SAFETENSORS_NAME} or {PYTORCH_NAME} in the model dir")
    if path.name == SAFETENSORS_NAME:
        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler's own errors name no file
            raise ValueError(f"{path}: not a plain tensor state dict, refused to unpickle ({e})") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: expected a dict of parameter name → tensor, got {type(state).__name__}")
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
        renamed[key] = value
    return renamed, path


class OscarPreTrainedModel(nn.Module):
    """Base of every Oscar task model: init, from_pretrained, save_pretrained.

    Subclasses set `tolerated_missing` / `tolerated_unexpected`: regexes of keys the original silently tolerates
    when a checkpoint of another task is loaded (e.g. `cls.seq_relationship.*` of a pretraining checkpoint).
    """

    tolerated_missing: ClassVar[tuple[str, ...]] = ()
    tolerated_unexpected: ClassVar[tuple[str, ...]] = ()
    # Keys a plain BERT MLM checkpoint (Mengzi-BERT-base) lacks or adds relative to an Oscar model.
    bert_init_missing: ClassVar[tuple[str, ...]] = (r"bert\.img_embedding\.", r"bert\.LayerNorm\.", r"bert\.pooler\.")
    bert_init_unexpected: ClassVar[tuple[str, ...]] = (r"cls\.predictions\.decoder\.bias$", r"bert\.embeddings\.position_ids$")

    def __init__(self, config: OscarConfig):
        super().__init__()
        self.config = config
        self.load_report: LoadReport | None = None
        self.source_dir: Path | None = None

    def init_weights(self) -> None:
        """Original init: Linear/Embedding ~ N(0, initializer_range), biases 0, LayerNorm 1/0; then re-tie."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("predictions.bias"):
                nn.init.zeros_(param)
        self.tie_weights()

    def special_ids(self) -> SpecialIds:
        """[CLS]/[SEP]/[PAD]/[MASK] ids from the vocab.txt of the dir this model was loaded from."""
        if self.source_dir is None:
            raise ValueError("model was not loaded from a model dir: pass special_ids explicitly")
        vocab = self.source_dir / VOCAB_NAME
        index = {tok: i for i, tok in enumerate(vocab.read_text(encoding="utf-8").splitlines())}
        missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]") if t not in index]
        if missing:
            raise ValueError(f"{vocab}: special tokens {missing} not in the vocab")
        return SpecialIds(bos=index["[CLS]"], eos=index["[SEP]"], pad=index["[PAD]"], mask=index["[MASK]"])

    def tie_weights(self) -> None:
        """Subclasses with tied decoders re-tie here (after init and after loading)."""

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls: type[M], path: str | Path, *, from_bert: bool = False, strict: bool = True, **config_overrides: Any
    ) -> M:
        """Load a model dir (local or s3://): ours, an original Oscar/Mengzi-Oscar one, or, with `from_bert`, a
        BERT MLM dir (Mengzi-BERT-base) whose weights initialise `bert.*` (image projection, pooler and heads
        the BERT file lacks start fresh). A safetensors dir we wrote (not a `from_bert` or Hugging Face dir) must
        carry a `_COMPLETE` marker that agrees with its files (ValueError naming the dir otherwise: its export did
        not finish). Returns the model in eval mode with `load_report` set."""
        model_dir = storage.download_dir(str(path))
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{path}: model dir does not exist")
        if (model_dir / storage.COMPLETE_MARKER).is_file():
            storage.check_complete(model_dir)
        config = OscarConfig.load(model_dir, **config_overrides)
        # Original Oscar (pytorch_model.bin), BERT and Hugging Face dirs come without a marker; ours always have one.
        foreign = from_bert or "transformers_version" in config.extra
        if (model_dir / SAFETENSORS_NAME).is_file() and not foreign:
            storage.check_complete(model_dir)
        vocab = model_dir / VOCAB_NAME
        if not vocab.is_file():
            raise FileNotFoundError(f"{vocab}: a model dir needs vocab.txt (the token ids the weights use)")
        num_tokens = sum(1 for _ in vocab.open(encoding="utf-8"))
        if num_tokens > config.vocab_size:
            raise ValueError(f"{vocab}: {num_tokens} tokens but config vocab_size is {config.vocab_size}")
        model = cls(config)
        state, file = read_state_dict(model_dir)
        model.load_report = model.load_checkpoint_state(state, str(file), from_bert=from_bert, strict=strict)
        model.source_dir = model_dir
        return model.eval()

    def load_checkpoint_state(
        self, state: dict[str, torch.Tensor], file: str, *, from_bert: bool = False, strict: bool = True
    ) -> LoadReport:
        """Load `state` (original key names) into this model; raise on any disagreement not tolerated."""
        own = self.state_dict()
        if not any(k.startswith("bert.") for k in state) and any(k.startswith("bert.") for k in own):
            state = {f"bert.{k}": v for k, v in state.items()}  # a bare trunk checkpoint goes into .bert
        allowed_missing = self.tolerated_missing + (self.bert_init_missing + (r"cls\.", r"classifier\.") if from_bert else ())
        allowed_unexpected = self.tolerated_unexpected + (self.bert_init_unexpected if from_bert else ())
        report = LoadReport(file=file)
        loadable: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key not in own:
                report.unexpected.append(key)
            elif own[key].shape != value.shape:
                report.mismatched.append(key)
            else:
                loadable[key] = value
        report.missing = [k for k in own if k not in state]
        problems = [
            *(f"unexpected key {k}" for k in report.unexpected if not _matches(k, allowed_unexpected)),
            *(f"missing key {k}" for k in report.missing if not _matches(k, allowed_missing)),
            *(
                f"shape mismatch {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in report.mismatched
                if not _matches(k, allowed_missing)
            ),
        ]
        if problems and strict:
            shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
            raise ValueError(f"{file}: checkpoint does not fit {type(self).__name__}: {shown}")
        self.init_weights()  # fresh weights for whatever the file does not provide
        self.load_state_dict(loadable, strict=False)
        self.tie_weights()
        for kind in ("missing", "unexpected", "mismatched"):
            keys = getattr(report, kind)
            if keys:
                log.info("%s: %d %s keys tolerated (e.g. %s)", file, len(keys), kind, keys[0])
        return report

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path, vocab_file: str | Path | None = None) -> Path:
        """Write config.json + model.safetensors + vocab.txt (from `vocab_file` or the dir we were loaded from), then
        the `_COMPLETE` marker (storage.mark_complete) that from_pretrained requires of a safetensors dir."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / storage.COMPLETE_MARKER).unlink(missing_ok=True)
        self.config.save(out)
        # safetensors refuses shared storage; tied weights are written twice, as the original does.
        state = {k: v.detach().contiguous().clone().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
        source = Path(vocab_file) if vocab_file else (self.source_dir / VOCAB_NAME if self.source_dir else None)
        if source is None or not source.is_file():
            raise FileNotFoundError(f"save_pretrained({out}): no vocab.txt to write (pass vocab_file)")
        if source.resolve() != (out / VOCAB_NAME).resolve():
            shutil.copyfile(source, out / VOCAB_NAME)
        storage.mark_complete(out)
        return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.match(p, key) for p in patterns)
