"""What a model dir records about its inputs, and how an original Oscar / Mengzi-Oscar dir's `training_args.bin`
is read without a full unpickle.

Our dirs keep the input layout in config.json (OscarConfig's LAYOUT_FIELDS). An original dir's config.json has
none of them; its fine-tuning script saved them in `training_args.bin` (microsoft/Oscar `run_captioning.py` /
`run_retrieval.py`: `torch.save(args, ...)` of the argparse.Namespace, which `restore_training_settings` reads back
at test time). `read_training_args` reads that pickle with `RestrictedUnpickler`, which admits
`argparse.Namespace`, `collections.OrderedDict` and `torch.device` (kept as its string) and refuses every other
global and every tensor, so a file carrying a malicious `__reduce__` fails before anything runs.
`original_layout` turns those args into OscarConfig values and says where each set came from.
"""

from __future__ import annotations

import argparse
import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

TRAINING_ARGS_NAME = "training_args.bin"
# OscarConfig field ← the original's argparse name. tag_map is ours (the originals were trained with Langboat's).
ARG_FIELDS = {
    "max_seq_a_length": "max_seq_a_length",
    "max_seq_length": "max_seq_length",
    "max_img_seq_length": "max_img_seq_length",
    "add_od_labels": "add_od_labels",
    "do_lower_case": "do_lower_case",
    "att_mask_type": "att_mask_type",
    "od_label_type": "od_label_type",
}
ORIGINAL_TAG_MAP = "langboat"
CAPTION_MAX_SEQ_A_LENGTH = 40  # run_captioning's --max_seq_a_length default
NO_RECORDED_LAYOUT = "original dir without training_args.bin: layout defaults (or the card's model_layout)"
CARD_LAYOUT = "the evaluate card's model_layout (the dir records none)"
# The OscarConfig fields every job that feeds a model reports (job log, metrics.json, /v1/models).
INPUT_LAYOUT_FIELDS = ("max_seq_a_length", "max_seq_length", "max_img_seq_length", "add_od_labels", "do_lower_case",
                       "att_mask_type", "od_label_type", "tag_map", "layout_source")


def records_layout(config: Any) -> bool:
    """Whether a loaded OscarConfig's layout was recorded by its dir (config.json or training_args.bin)."""
    return config.layout_source not in (NO_RECORDED_LAYOUT, CARD_LAYOUT)


def input_layout(config: Any) -> dict[str, Any]:
    """The input-layout values of an OscarConfig (see INPUT_LAYOUT_FIELDS)."""
    return {name: getattr(config, name) for name in INPUT_LAYOUT_FIELDS}


def _device(*args: Any) -> str:
    """torch.device(...) inside a training_args pickle becomes its plain string ('cuda', 'cuda:0')."""
    return ":".join(str(a) for a in args)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only argparse.Namespace, OrderedDict, torch.device (as str) and builtin plain values."""

    ALLOWED = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "device"): _device,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only argparse.Namespace and plain "
                                     f"values are read from training args)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("tensor storage is not allowed in training args")


def _unpickle(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def read_training_args(path: str | Path) -> dict[str, Any]:
    """The argparse.Namespace of a `torch.save`d training_args.bin (zip or legacy format) as a dict.

    Raises ValueError naming the file when it holds anything but a Namespace of plain values."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    raise ValueError(f"{path}: a torch zip file without data.pkl")
                value = _unpickle(archive.read(names[0]))
        else:  # legacy torch.save: magic number, protocol, sys info, then the object
            stream = io.BytesIO(raw)
            for _ in range(3):
                RestrictedUnpickler(stream).load()
            value = RestrictedUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: refused to read training args: {exc}") from None
    if not isinstance(value, argparse.Namespace):
        raise ValueError(f"{path}: expected an argparse.Namespace, got {type(value).__name__}")
    return vars(value)


def original_layout(model_dir: str | Path) -> tuple[dict[str, Any], str]:
    """(OscarConfig values, where they came from) for an original dir whose config.json has no layout fields:
    the training_args.bin values when the file is there (plus tag_map langboat), else only tag_map."""
    path = Path(model_dir) / TRAINING_ARGS_NAME
    values: dict[str, Any] = {"tag_map": ORIGINAL_TAG_MAP}
    if not path.is_file():
        return values, NO_RECORDED_LAYOUT
    args = read_training_args(path)
    for field, arg in ARG_FIELDS.items():
        if args.get(arg) is not None:
            values[field] = args[arg]
    if "max_seq_a_length" not in values and "max_seq_length" in values:  # retrieval args have no caption budget
        values["max_seq_a_length"] = min(CAPTION_MAX_SEQ_A_LENGTH, int(values["max_seq_length"]))
    return values, f"{TRAINING_ARGS_NAME} ({', '.join(sorted(k for k in values if k != 'tag_map'))})"
