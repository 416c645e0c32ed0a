"""Deterministic random weights for the tiny VinVL-layout reference detectors.

Self-contained (torch only): a test rebuilds the exact checkpoint that
make_reference.py fed to the original scene_graph_benchmark code from the
committed key->shape manifest (shapes_*.json) and the seed recorded in
cases.json, without importing the original code:

    manifest = json.load(open("shapes_r50.json"))
    sd = make_state_dict(manifest["shapes"], seed, constants=manifest["constants"])
    save_checkpoint(sd, "tiny.pth")   # {"model": {"module."+k: v}, "iteration": 0}

Rules (by key), all tensors float32, drawn from ONE torch.Generator seeded with
`seed`, visiting the non-alias keys in sorted order (every such key draws, even
when a constant later replaces it):

* conv weights (4-D): He normal, std = gain*sqrt(2/fan_in), fan_in =
  shape[1]*kh*kw (in_ch/groups); gain 1/64 for ``stem.conv1`` (its input is
  BGR255 minus the pixel mean, i.e. O(60));
* FrozenBatchNorm2d buffers (owner ``bn*`` or ``downsample.1``): weight ~
  U(0.6,1.1), except the residual branch's last norm (``bn3``) and
  ``downsample.1``: U(0.25,0.5) (keeps 36-block trunks O(1)); bias ~
  U(-0.1,0.1); running_mean ~ N(0,0.05^2); running_var ~ U(0.8,1.25);
* rpn.head.conv: He normal, bias N(0,0.01^2); rpn.head.cls_logits weight
  N(0,0.01^2), bias N(-1,0.5^2); rpn.head.bbox_pred weight N(0,0.005^2), bias
  N(0,0.05^2);
* box predictor: cls_score weight N(0,0.01^2), bias N(0,1); bbox_pred (unused
  with TEST.IGNORE_BOX_REGRESSION) weight N(0,0.001^2), bias 0;
* attribute predictor: cls_embedding N(0,1); fc_attr weight N(0,1/fan_in),
  bias N(0,0.1^2); attr_score weight N(0,0.01^2), bias N(0,0.5^2);
* any other key: N(0,0.01^2) (none in the C4 layout).

Then ``scales`` (key -> float) multiply drawn weights and ``constants`` (key ->
nested list) replace tensors.  shapes_<cfg>.json holds both: the RPN cell
anchors buffer (``rpn.anchor_generator.cell_anchors.0``: it is in the
checkpoint and must hold the real anchors) and the data-calibrated scales /
biases of the four prediction layers (make_reference.calibrate).  Keys
``attribute.feature_extractor.<rest>`` alias ``roi_heads.box.feature_extractor.<rest>``
(AttrRCNN shares the module, ``state_dict()`` lists it twice with equal values):
they are copied and draw nothing.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

ALIAS_PREFIX = "attribute.feature_extractor."
ALIAS_TARGET = "roi_heads.box.feature_extractor."

STEM_GAIN = 1.0 / 64.0


def _is_norm(key: str) -> bool:
    owner = key.rsplit(".", 1)[0]
    last = owner.rsplit(".", 1)[-1]
    return last.startswith("bn") or owner.endswith("downsample.1")


def _normal(g: torch.Generator, shape, mean: float, std: float) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean


def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo


def _fill(key: str, shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    suffix = key.rsplit(".", 1)[-1]
    if _is_norm(key):
        owner = key.rsplit(".", 1)[0]
        last_norm = owner.endswith("bn3") or owner.endswith("downsample.1")
        if suffix == "weight":
            return _uniform(g, shape, 0.25, 0.5) if last_norm else _uniform(g, shape, 0.6, 1.1)
        if suffix == "bias":
            return _uniform(g, shape, -0.1, 0.1)
        if suffix == "running_mean":
            return _normal(g, shape, 0.0, 0.05)
        if suffix == "running_var":
            return _uniform(g, shape, 0.8, 1.25)
    if key.startswith("rpn.head.cls_logits."):
        return _normal(g, shape, 0.0, 0.01) if suffix == "weight" else _normal(g, shape, -1.0, 0.5)
    if key.startswith("rpn.head.bbox_pred."):
        return _normal(g, shape, 0.0, 0.005) if suffix == "weight" else _normal(g, shape, 0.0, 0.05)
    if key.endswith("predictor.cls_score.weight"):
        return _normal(g, shape, 0.0, 0.01)
    if key.endswith("predictor.cls_score.bias"):
        return _normal(g, shape, 0.0, 1.0)
    if key.endswith("box.predictor.bbox_pred.weight"):
        return _normal(g, shape, 0.0, 0.001)
    if key.endswith("box.predictor.bbox_pred.bias"):
        return torch.zeros(shape, dtype=torch.float32)
    if key.endswith("cls_embedding.weight"):
        return _normal(g, shape, 0.0, 1.0)
    if key.endswith("fc_attr.weight"):
        return _normal(g, shape, 0.0, 1.0 / math.sqrt(shape[1]))
    if key.endswith("fc_attr.bias"):
        return _normal(g, shape, 0.0, 0.1)
    if key.endswith("attr_score.weight"):
        return _normal(g, shape, 0.0, 0.01)
    if key.endswith("attr_score.bias"):
        return _normal(g, shape, 0.0, 0.5)
    if len(shape) == 4 and suffix == "weight":
        fan_in = shape[1] * shape[2] * shape[3]
        gain = STEM_GAIN if key.endswith("stem.conv1.weight") else 1.0
        return _normal(g, shape, 0.0, gain * math.sqrt(2.0 / fan_in))
    if suffix == "bias":
        return _normal(g, shape, 0.0, 0.01)
    return _normal(g, shape, 0.0, 0.01)


def make_state_dict(
    shapes: Mapping[str, Sequence[int]],
    seed: int,
    constants: Optional[Mapping[str, object]] = None,
    scales: Optional[Mapping[str, float]] = None,
) -> Dict[str, torch.Tensor]:
    """Key -> float32 tensor for every key of `shapes` (un-prefixed model keys).

    1. every non-alias key, in sorted order, draws its tensor by the rules above;
    2. keys in `scales` are multiplied by that float32 scalar;
    3. keys in `constants` are replaced by the given values (nested lists);
    4. alias keys (attribute.feature_extractor.*) copy their target.
    Steps 2-3 never change what the other keys draw.
    """
    constants = dict(constants or {})
    scales = dict(scales or {})
    g = torch.Generator()
    g.manual_seed(int(seed))
    out: Dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = tuple(int(s) for s in shapes[key])
        if key.startswith(ALIAS_PREFIX) and (ALIAS_TARGET + key[len(ALIAS_PREFIX):]) in shapes:
            continue
        t = _fill(key, shape, g)
        if key in scales:
            t = t * torch.tensor(float(scales[key]), dtype=torch.float32)
        if key in constants:
            t = torch.tensor(constants[key], dtype=torch.float32).reshape(shape)
        out[key] = t
    for key in shapes:
        if key not in out:
            out[key] = out[ALIAS_TARGET + key[len(ALIAS_PREFIX):]].clone()
    return {k: out[k] for k in shapes}


def checkpoint_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Layout of the released vinvl_vg_x152c4.pth: {'model': {'module.'+k: v}, 'iteration': 0}."""
    return {"model": {"module." + k: v for k, v in state_dict.items()}, "iteration": 0}


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    torch.save(checkpoint_dict(state_dict), path)
