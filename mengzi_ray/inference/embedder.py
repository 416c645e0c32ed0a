"""Dual-encoder embeddings of captions and gallery images from a retrieval model dir (modeling/dual_encoder.py).

One place builds the two sides' inputs and runs them: the retrieval fine-tune's validation, the index job's Ray
Data actors, Serve's shortlist and the evaluate job all embed through `embed_sides`.

Determinism: every forward pass has the same shape — `batch_size` rows, the last batch filled up with copies of
its first row — so an item's embedding depends on the item alone, not on which other items share its batch. The
index job relies on this for bit-identical embeddings whatever the number of actors and their batch boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mengzi_ray.data.dual_encoder import IMAGE_KEYS, TEXT_KEYS, DualEncoderTensorizer
from mengzi_ray.modeling import OscarForRetrieval
from mengzi_ray.inference.batch import load_model_dir
from mengzi_ray.inference.scorer import retrieval_layout
from mengzi_ray.text import load_tokenizer

@torch.no_grad()
def embed_sides(
    model: OscarForRetrieval, sides: Sequence[dict[str, np.ndarray]], side: str, batch_size: int
) -> np.ndarray:
    """(len(sides), dim) float32 unit vectors of text sides (`side="text"`) or image sides (`"image"`), in fixed-shape
    batches of `batch_size` (module docstring). The model must have a dual encoder (ValueError otherwise)."""
    if side not in ("text", "image"):
        raise ValueError(f"side must be 'text' or 'image', got {side!r}")
    if not model.has_dual_encoder:
        raise ValueError(f"{model.source_dir or 'this model'}: no dual encoder in the model dir (dual_encoder_dim 0)")
    keys, embed = (TEXT_KEYS, model.embed_texts) if side == "text" else (IMAGE_KEYS, model.embed_images)
    device = next(model.parameters()).device
    out = np.zeros((len(sides), model.config.dual_encoder_dim), dtype=np.float32)
    for start in range(0, len(sides), batch_size):
        chunk = list(sides[start : start + batch_size])
        used = len(chunk)
        chunk += [chunk[0]] * (batch_size - used)
        batch = {k: torch.as_tensor(np.stack([s[k] for s in chunk])).to(device) for k in keys}
        out[start : start + used] = embed(**batch)[:used].float().cpu().numpy()
    return out


class DualEmbedder:
    """A retrieval model dir with a dual encoder, ready to embed captions and images (eval mode, no gradient)."""

    def __init__(self, model_dir: str | Path, *, batch_size: int = 64, device: str | None = None,
                 model: OscarForRetrieval | None = None):
        """Load `model_dir` (inference.load_model_dir) on `device`, or embed with `model`, already loaded from it
        (Serve's cross-encoder shares its weights)."""
        if model is None:
            model, tokenizer = load_model_dir(OscarForRetrieval, str(model_dir), device)
        else:
            tokenizer = load_tokenizer(model.source_dir or model_dir, do_lower_case=model.config.do_lower_case)
        self.model = model.eval()
        if not self.model.has_dual_encoder:
            raise ValueError(f"{model_dir}: the model dir has no dual encoder (config.json dual_encoder_dim is 0); "
                             "train one with retrieval.dual_encoder.enabled")
        self.tensorizer = DualEncoderTensorizer(tokenizer, retrieval_layout(self.model.config))
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.config.dual_encoder_dim

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; `batch_size` overrides the embedder's (Serve's queries are embedded
        in one batch of exactly their number, not padded up to a gallery-sized batch)."""
        sides = [self.tensorizer.text_side(t) for t in texts]
        return embed_sides(self.model, sides, "text", batch_size or self.batch_size)

    def embed_images(self, images: Sequence[tuple[str, np.ndarray]], batch_size: int | None = None) -> np.ndarray:
        """(tag string, regions (n, img_feature_dim)) pairs → (len(images), dim) float32 unit vectors."""
        sides = [self.tensorizer.image_side(tags, feats) for tags, feats in images]
        return embed_sides(self.model, sides, "image", batch_size or self.batch_size)
