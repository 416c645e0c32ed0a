"""Captioning train-step throughput of OscarForCaptioning vs a plain transformers BertForMaskedLM ("our overhead").

One step = forward, backward, gradient clipping (1.0) and an AdamW step (the project's optimiser groups, used for
both models). Ours runs the training layout of CaptionTensorizer.train_example: text L=70 (caption budget A=40,
then tags) followed by R=50 regions of 2054-d, with the 3-D seq2seq mask and up to 3 masked caption tokens. The
baseline is BertForMaskedLM of the same hidden/layers/heads/intermediate/vocab on L+R = 120 token ids with a
2-D all-ones mask and 3 MLM targets per row. Both fp32, dropout 0.1, train mode, the same batch every step.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_decoding import write_cjk_vocab
from common import git_commit, interleaved_times, median, pick_device, print_table, timed, write_results
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import load_tokenizer
from mengzi_ray.inference import collate
from mengzi_ray.training.tasks import caption_loss
from mengzi_ray.training.optim import build_optimizer

SCRIPT = "bench_train_step"
LAYOUT = CaptionLayout(max_seq_a_length=40, max_seq_length=70, max_img_seq_length=50, img_feature_dim=2054)
SEQ_LEN = LAYOUT.max_seq_length + LAYOUT.max_img_seq_length  # 120
BASELINE_TARGETS = 3  # MLM targets per row, as many as our captioning masks at most
VOCAB = 21128
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.05, 1.0
REPEATS = 3
SEED = 0


@dataclass(frozen=True)
class Case:
    """One model size, its batch, and how many steps one timed repeat runs."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    steps_per_repeat: int


CASES = (
    Case("small", 256, 4, 4, 1024, batch=16, steps_per_repeat=5),
    Case("base", 768, 12, 12, 3072, batch=4, steps_per_repeat=2),
)


def oscar_batch(case: Case, vocab_dir: Path, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Training-layout examples: captions of 10-30 and tags of 5-29 random CJK characters, 50 random regions."""
    tokenizer = load_tokenizer(vocab_dir)
    tensorizer = CaptionTensorizer(tokenizer, LAYOUT)
    chars = [tok for tok in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if len(tok) == 1]

    def text(low: int, high: int) -> str:
        return "".join(rng.choice(chars, size=int(rng.integers(low, high + 1))))

    examples = [
        tensorizer.train_example(
            text(10, 30),
            text(5, 29),
            rng.random((LAYOUT.max_img_seq_length, LAYOUT.img_feature_dim), dtype=np.float32),
            rng,
        )
        for _ in range(case.batch)
    ]
    return collate(examples)


def bert_batch(case: Case, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """SEQ_LEN random non-special token ids per row, all attended, BASELINE_TARGETS MLM labels per row."""
    input_ids = rng.integers(104, VOCAB, size=(case.batch, SEQ_LEN))
    labels = np.full_like(input_ids, -100)
    for row in range(case.batch):
        chosen = rng.choice(np.arange(1, LAYOUT.max_seq_a_length), size=BASELINE_TARGETS, replace=False)
        labels[row, chosen] = input_ids[row, chosen]
    return {
        "input_ids": torch.as_tensor(input_ids),
        "attention_mask": torch.ones(case.batch, SEQ_LEN, dtype=torch.long),
        "token_type_ids": torch.zeros(case.batch, SEQ_LEN, dtype=torch.long),
        "labels": torch.as_tensor(labels),
    }


def train_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """A closure running one full optimiser step of `model` on the loss `loss_fn` computes."""
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY)

    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()

    return step


def repeated(step: Callable[[], None], times: int) -> Callable[[], None]:
    """A closure running `step` `times` times."""

    def run() -> None:
        for _ in range(times):
            step()

    return run


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_case(case: Case, device: torch.device, vocab_dir: Path) -> dict[str, Any]:
    """Warm up one step each, then time REPEATS interleaved repeats of `steps_per_repeat` steps each."""
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    ours = OscarForCaptioning(
        OscarConfig(
            vocab_size=VOCAB,
            hidden_size=case.hidden,
            num_hidden_layers=case.layers,
            num_attention_heads=case.heads,
            intermediate_size=case.intermediate,
            max_seq_a_length=LAYOUT.max_seq_a_length,
            max_seq_length=LAYOUT.max_seq_length,
            max_img_seq_length=LAYOUT.max_img_seq_length,
        )
    ).to(device).train()
    baseline = BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=case.hidden,
            num_hidden_layers=case.layers,
            num_attention_heads=case.heads,
            intermediate_size=case.intermediate,
        )
    ).to(device).train()
    ours_inputs = {k: v.to(device) for k, v in oscar_batch(case, vocab_dir, rng).items()}
    bert_inputs = {k: v.to(device) for k, v in bert_batch(case, rng).items()}
    steps = {
        "ours": train_step(ours, lambda: caption_loss(ours, ours_inputs)),
        "baseline": train_step(baseline, lambda: baseline(**bert_inputs).loss),
    }
    warmup = {name: timed(step, device)[0] for name, step in steps.items()}
    times, _ = interleaved_times(
        {name: repeated(step, case.steps_per_repeat) for name, step in steps.items()}, REPEATS, device
    )
    samples = case.batch * case.steps_per_repeat
    rate = {name: samples / median(t) for name, t in times.items()}
    return {
        "case": asdict(case),
        "params": {"ours": count_params(ours), "baseline": count_params(baseline)},
        "masked_tokens_ours": int(ours_inputs["masked_pos"].sum()),
        "masked_tokens_baseline": int((bert_inputs["labels"] != -100).sum()),
        "baseline_attn_implementation": baseline.config._attn_implementation,
        "warmup_step_s": warmup,
        "times_s": times,
        "samples_per_s": rate,
        "ratio_ours_over_baseline": rate["ours"] / rate["baseline"],
    }


def main() -> None:
    torch.set_num_threads(2)
    device = pick_device()
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_dir = Path(tmp)
        write_cjk_vocab(VOCAB, vocab_dir)
        results = [run_case(case, device, vocab_dir) for case in CASES]
    print(
        f"Train step (fwd+bwd+clip+AdamW), fp32, {device.type}, {SEQ_LEN} positions, vocab {VOCAB}, "
        f"median of {REPEATS} interleaved repeats"
    )
    print_table(
        ["config", "H/L/heads/I", "batch", "steps/repeat", "ours samples/s", "BertForMaskedLM samples/s",
         "ours/baseline"],
        [
            [
                r["case"]["name"],
                "/".join(str(r["case"][k]) for k in ("hidden", "layers", "heads", "intermediate")),
                r["case"]["batch"],
                r["case"]["steps_per_repeat"],
                f"{r['samples_per_s']['ours']:.2f}",
                f"{r['samples_per_s']['baseline']:.2f}",
                f"{r['ratio_ours_over_baseline']:.2f}",
            ]
            for r in results
        ],
    )
    settings = {
        "ours": f"OscarForCaptioning, text L={LAYOUT.max_seq_length} (A={LAYOUT.max_seq_a_length}) + "
        f"R={LAYOUT.max_img_seq_length} regions x {LAYOUT.img_feature_dim}-d, 3-D seq2seq mask",
        "baseline": f"transformers BertForMaskedLM, {SEQ_LEN} token ids, 2-D all-ones mask, "
        f"{BASELINE_TARGETS} MLM targets per row (logits over all positions, as HF computes them)",
        "vocab": VOCAB,
        "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY} (project groups), clip_grad_norm {MAX_GRAD_NORM}",
        "dtype": "float32",
        "dropout": 0.1,
        "repeats": REPEATS,
        "warmup": "one step of each model",
        "seed": SEED,
    }
    path = write_results(SCRIPT, device, commit, settings, results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
