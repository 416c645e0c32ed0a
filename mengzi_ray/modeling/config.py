"""OscarConfig: BERT's configuration plus the image and task fields of the original Oscar config.json.

The JSON layout is the original's (pytorch_transformers BertConfig + Oscar keys, microsoft/Oscar
`oscar/modeling/modeling_bert.py`), so a released Oscar / Mengzi-Oscar config.json loads unchanged and ours loads in
the original code. Keys we do not model are kept in `extra` and written back, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mengzi_ray.modeling.bert import ACTIVATIONS

CONFIG_NAME = "config.json"


@dataclass
class OscarConfig:
    """All hyper-parameters that shape an Oscar model's weights or forward pass."""

    # --- BERT ---
    vocab_size: int = 21128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # --- Oscar image input ---
    img_feature_dim: int = 2054
    img_feature_type: str = "faster_r-cnn"
    use_img_layernorm: bool = False  # absent in Oscar-v1 configs, which have no image LayerNorm
    img_layer_norm_eps: float = 1e-12
    # --- task heads ---
    num_contrast_classes: int = 2
    num_labels: int = 2
    loss_type: str = "sfmx"
    tie_weights: bool = False
    freeze_embedding: bool = False
    label_smoothing: float = 0.0
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0
    # retrieval's dual-encoder first stage (modeling/dual_encoder.py): embedding size, 0 = none; InfoNCE temperature;
    # tower "shared" (the heads read the cross-encoder's trunk) or "separate" (a trunk copy of its own)
    dual_encoder_dim: int = 0
    dual_encoder_temperature: float = 0.05
    dual_encoder_tower: str = "shared"
    # --- sequence layout the weights were trained with (Oscar keeps these in training_args.bin) ---
    max_seq_a_length: int = 40
    max_seq_length: int = 70
    max_img_seq_length: int = 50
    add_od_labels: bool = True
    do_lower_case: bool = True
    att_mask_type: str = "CLR"  # retrieval attention mask (CLR | CL | CR | LR)
    od_label_type: str = "vg"
    # tag map the od labels are translated with from the English labels: None = the dataset's tags as stored;
    # "langboat" for original Oscar / Mengzi-Oscar dirs (what the released checkpoints were trained with)
    tag_map: str | None = None
    layout_source: str = "config.json"  # where the layout fields came from (original dirs: training_args.bin)
    # --- keys of the source config.json we carry but do not interpret ---
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "img_feature_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_contrast_classes not in (2, 3):
            raise ValueError(f"num_contrast_classes must be 2 or 3, got {self.num_contrast_classes}")
        if not 0.0 <= self.label_smoothing < 1.0 or not 0.0 <= self.drop_worst_ratio < 1.0:
            raise ValueError("label_smoothing and drop_worst_ratio must be in [0, 1)")
        if self.dual_encoder_dim < 0 or self.dual_encoder_temperature <= 0:
            raise ValueError(f"dual_encoder_dim must be >= 0 and dual_encoder_temperature > 0, got "
                             f"{self.dual_encoder_dim} and {self.dual_encoder_temperature}")
        if self.dual_encoder_tower not in ("shared", "separate"):
            raise ValueError(f"dual_encoder_tower must be shared or separate, got {self.dual_encoder_tower!r}")
        if self.img_feature_type.startswith("dis_code"):
            raise ValueError(f"img_feature_type {self.img_feature_type!r} (discrete codes) is not supported")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.att_mask_type not in ("CLR", "CL", "CR", "LR"):
            raise ValueError(f"att_mask_type must be CLR, CL, CR or LR, got {self.att_mask_type!r}")
        if self.tag_map not in (None, "corrected", "langboat"):
            raise ValueError(f"tag_map must be null, corrected or langboat, got {self.tag_map!r}")
        if self.max_seq_a_length > self.max_seq_length:
            raise ValueError(
                f"max_seq_a_length ({self.max_seq_a_length}) exceeds max_seq_length ({self.max_seq_length})"
            )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "OscarConfig":
        """Build from an original or our own config.json dict; unknown keys go to `extra`."""
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in {**data, **overrides}.items():
            if key in known:
                values[key] = _coerce(known[key].type, value)
            else:
                extra[key] = value
        return cls(**values, extra=extra)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path, **overrides: Any) -> "OscarConfig":
        """config.json of a model dir; for an original dir (no layout fields in config.json) the layout comes from
        its training_args.bin (read without a full unpickle) and the tag map is langboat. `overrides` win."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a model dir needs config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if "max_img_seq_length" not in data:  # an original Oscar / Mengzi-Oscar dir: layout in training_args.bin
            from mengzi_ray.modeling.model_dir import original_layout

            layout, source = original_layout(directory)
            data = {**data, **layout, "layout_source": source}
        return cls.from_dict(data, **overrides)


def _coerce(type_name: Any, value: Any) -> Any:
    """Original configs store flags as 0/1 and sometimes numbers as strings; normalise to the field type."""
    kind = str(type_name)
    if kind == "bool":
        return bool(int(value)) if isinstance(value, (int, float, str)) else bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value
