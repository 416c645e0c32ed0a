"""Our BERT blocks (modeling/bert.py): activations by name, the key/value cache of one layer, and no dependence on
transformers' BERT modules. The full trunk against a plain-torch reference is test_modeling_forward.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mengzi_ray.modeling import OscarConfig, OscarModel
from mengzi_ray.modeling.bert import BertLayer, HeadTransform
from tests.conftest import tiny_config

H, HEADS, INTER = 16, 4, 24


def plain_layer(layer: BertLayer, x: torch.Tensor, bias: torch.Tensor, act) -> torch.Tensor:
    """The post-LN layer written out with the layer's own weights: eager softmax attention, then two add & norms."""
    lin = lambda m, t: t @ m.weight.T + m.bias  # noqa: E731
    b, n, _ = x.shape
    split = lambda t: t.view(b, n, HEADS, H // HEADS).transpose(1, 2)  # noqa: E731
    a = layer.attention
    q, k, v = (split(lin(m, x)) for m in (a.self.query, a.self.key, a.self.value))
    probs = torch.softmax(q @ k.transpose(-1, -2) / (H // HEADS) ** 0.5 + bias, dim=-1)
    ctx = (probs @ v).transpose(1, 2).reshape(b, n, H)
    h = F.layer_norm(lin(a.output.dense, ctx) + x, (H,), a.output.LayerNorm.weight, a.output.LayerNorm.bias, 1e-12)
    out = lin(layer.output.dense, act(lin(layer.intermediate.dense, h)))
    return F.layer_norm(out + h, (H,), layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, 1e-12)


@pytest.mark.parametrize("name,act", [("gelu", lambda t: t * 0.5 * (1 + torch.erf(t / 2**0.5))), ("relu", torch.relu), ("swish", lambda t: t * torch.sigmoid(t))])
def test_layer_matches_the_written_out_layer(name: str, act) -> None:
    layer = BertLayer(H, HEADS, INTER, name, 1e-12, 0.0, 0.0).eval()
    x = torch.randn(2, 5, H)
    bias = torch.zeros(2, 1, 5, 5)
    bias[0, :, :, -2:] = -10000.0
    out, (k, v) = layer(x, bias)
    torch.testing.assert_close(out, plain_layer(layer, x, bias, act), atol=1e-5, rtol=1e-5)
    assert k.shape == v.shape == (2, HEADS, 5, H // HEADS)


def test_cached_keys_values_give_the_uncached_result() -> None:
    """Positions 3–4 attend to 0–4 while 0–2 attend only to 0–2: running 0–2, then 3–4 with their cache, is the same
    layer output as running all five at once."""
    layer = BertLayer(H, HEADS, INTER, "gelu", 1e-12, 0.0, 0.0).eval()
    x = torch.randn(2, 5, H)
    mask = torch.ones(5, 5)
    mask[:3, 3:] = 0
    full, _ = layer(x, (1 - mask) * -10000.0)
    first, cache = layer(x[:, :3], (1 - mask[:3, :3]) * -10000.0)
    rest, new = layer(x[:, 3:], (1 - mask[3:]) * -10000.0, cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-6, rtol=1e-5)
    assert new[0].shape[2] == 2  # only this call's positions come back, for the caller to append


def test_unknown_activation_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_config(hidden_act="tanh")
    with pytest.raises(ValueError, match="hidden_act 'gelu_fast'"):
        HeadTransform(H, "gelu_fast", 1e-12)


def test_relu_config_builds_a_relu_trunk() -> None:
    model = OscarModel(tiny_config(hidden_act="relu")).eval()
    assert model.encoder.layer[0].intermediate.act is F.relu
    assert OscarConfig.from_dict(tiny_config(hidden_act="swish").to_dict()).hidden_act == "swish"


def test_models_do_not_import_transformers_bert() -> None:
    code = (
        "import sys, mengzi_ray.modeling as m; m.OscarForPretraining(m.OscarConfig(vocab_size=10, hidden_size=8, "
        "num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, img_feature_dim=4)); "
        "print(sorted(k for k in sys.modules if k.startswith('transformers.models')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
