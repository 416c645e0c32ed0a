"""The training step: packed read-out forward vs the padded trunk (same loss and gradients), and the step options
(bf16 / fp16 autocast, fused AdamW, gradient checkpointing, torch.compile) against the fp32 step on CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.data.records import ImageRecord
from mengzi_ray.modeling import OscarForCaptioning
from mengzi_ray.modeling.attention import Packing
from mengzi_ray.inference import collate
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.card import OptimSection
from mengzi_ray.training.optim import build_optimizer
from mengzi_ray.training.step import StepOptions
from mengzi_ray.training.tasks import caption_loss
from bench.caption_local import train_captioner
from tests.conftest import TINY_VOCAB, tiny_config

LAYOUT = CaptionLayout(max_seq_a_length=8, max_seq_length=12, max_img_seq_length=5, img_feature_dim=12, max_masked_tokens=3)
WORDS = TINY_VOCAB[5:]


def records(n: int, seed: int = 0) -> list[ImageRecord]:
    """Captions of 1-6 characters, 0-3 tags and 1-5 regions: every kind of padding the layout has."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caption = "".join(rng.choice(WORDS, size=int(rng.integers(1, 7))))
        tags = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 4))))
        feats = rng.standard_normal((int(rng.integers(1, 6)), LAYOUT.img_feature_dim)).astype(np.float32)
        out.append(ImageRecord(image_id=str(i), features=feats, od_labels=tags, texts=[caption]))
    return out


@pytest.fixture
def tensorizer(tiny_vocab_file: Path) -> CaptionTensorizer:
    return CaptionTensorizer(load_tokenizer(tiny_vocab_file.parent), LAYOUT)


def train_batch(tz: CaptionTensorizer, rows: list[ImageRecord], seed: int = 1) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return collate([tz.train_example(r.texts[0], r.od_labels, r.features, rng) for r in rows])


def padded_loss(model: OscarForCaptioning, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss through the padded trunk: every position, every layer, read out afterwards."""
    out = model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["img_feats"])
    selected = out.last_hidden_state[:, : batch["input_ids"].shape[1]][batch["masked_pos"] == 1]
    target = batch["masked_ids"][batch["masked_ids"] != 0]
    return model.loss(model.cls(selected).float(), target)


def gradients(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layers", [1, 3])
def test_packed_read_out_matches_padded_trunk(tensorizer: CaptionTensorizer, layers: int) -> None:
    model = OscarForCaptioning(tiny_config(num_hidden_layers=layers, label_smoothing=0.1)).train()  # dropout 0
    batch = train_batch(tensorizer, records(6))
    assert (batch["attention_mask"].amax(dim=1) == 0).any(), "the batch must hold padding for this test to mean anything"
    fast = caption_loss(model, batch)
    reference = padded_loss(model, batch)
    torch.testing.assert_close(fast, reference, atol=1e-6, rtol=1e-5)
    fast_grads, reference_grads = gradients(model, fast), gradients(model, reference)
    assert fast_grads.keys() == reference_grads.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_packing_round_trip_and_padding_read_out() -> None:
    mask = torch.tensor([[[1, 1, 0], [1, 1, 0], [0, 0, 0]], [[1, 0, 0], [1, 1, 1], [1, 1, 1]]])
    packing = Packing.from_mask(mask)
    assert packing.index.tolist() == [0, 1, 3, 4, 5]  # column 2 of row 0 is never attended
    x = torch.arange(6.0).view(2, 3, 1)
    assert packing.pack(x).view(-1).tolist() == [0, 1, 3, 4, 5]
    assert packing.unpack(packing.pack(x)).view(-1).tolist() == [0, 1, 0, 3, 4, 5]
    assert packing.locate(torch.tensor([4, 1])).tolist() == [3, 1]
    with pytest.raises(ValueError, match="never attended"):
        packing.locate(torch.tensor([2]))


def curve(tz: CaptionTensorizer, options: StepOptions, steps: int = 16, dropout: float = 0.0) -> list[float]:
    """Loss per step of the plain training loop from one fixed initialisation, on the same 8 rows every step
    (fresh masking each step), so the loss falls."""
    torch.manual_seed(0)
    model = OscarForCaptioning(tiny_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    torch.manual_seed(1)  # same dropout draws for every option
    return train_captioner(model, tz, records(8), steps=steps, batch_size=8, lr=1e-2, log_every=0, options=options)


def test_bf16_autocast_follows_the_fp32_curve(tensorizer: CaptionTensorizer) -> None:
    fp32 = curve(tensorizer, StepOptions())
    bf16 = curve(tensorizer, StepOptions(amp_dtype=torch.bfloat16))
    assert np.mean(fp32[-4:]) < np.mean(fp32[:4]) - 0.2  # it learns: the comparison is of two moving curves
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.05)
    assert bf16 != fp32  # autocast really ran in bf16


def test_fp16_with_grad_scaler_follows_the_fp32_curve(tensorizer: CaptionTensorizer) -> None:
    fp32 = curve(tensorizer, StepOptions())
    fp16 = curve(tensorizer, StepOptions(amp_dtype=torch.float16))
    # The scaler starts at 2**16 and skips the steps whose scaled gradients overflow, so the fp16 curve may lag a
    # step behind: compare the curves over windows of 4 steps.
    np.testing.assert_allclose(np.reshape(fp16, (-1, 4)).mean(1), np.reshape(fp32, (-1, 4)).mean(1), atol=0.1)
    assert fp16 != fp32


def test_gradient_checkpointing_gives_the_same_curve_with_dropout(tensorizer: CaptionTensorizer) -> None:
    plain = curve(tensorizer, StepOptions(), dropout=0.1)
    checkpointed = curve(tensorizer, StepOptions(gradient_checkpointing=True), dropout=0.1)
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-5, atol=1e-6)


def test_fused_adamw_matches_foreach(tensorizer: CaptionTensorizer) -> None:
    fused = curve(tensorizer, StepOptions(fused=True), steps=6)
    foreach = curve(tensorizer, StepOptions(fused=False), steps=6)
    np.testing.assert_allclose(fused, foreach, rtol=1e-5, atol=1e-6)
    model = OscarForCaptioning(tiny_config())
    assert build_optimizer(model, 1e-3, 0.05, fused=True).defaults["fused"] is True
    assert not build_optimizer(model, 1e-3, 0.05).defaults["fused"]


def test_compiled_step_follows_the_eager_curve(tensorizer: CaptionTensorizer) -> None:
    # aot_eager: dynamo capture and AOT autograd of the packed forward, without inductor's C++ build (minutes on CPU)
    eager = curve(tensorizer, StepOptions(), steps=4)
    compiled = curve(tensorizer, StepOptions(compile=True, compile_backend="aot_eager"), steps=4)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_options_from_card() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    card = OptimSection(learning_rate=1e-4)
    assert StepOptions.from_card(card, cpu).amp_dtype is None  # CPU workers stay fp32 unless asked
    assert StepOptions.from_card(card, gpu).amp_dtype is torch.bfloat16
    fp16 = OptimSection(learning_rate=1e-4, amp_dtype="float16", amp_on_cpu=True, gradient_checkpointing=True, compile=True)
    options = StepOptions.from_card(fp16, cpu)
    assert (options.amp_dtype, options.gradient_checkpointing, options.compile, options.fused) == (torch.float16, True, True, True)
    assert StepOptions.from_card(OptimSection(learning_rate=1e-4, amp=False), gpu).amp_dtype is None
