"""Pretraining train-step throughput and MFU: our OscarForPretraining step (MLM vocab projection only at the
masked tokens) vs the same model with the original's dense head (projection at every text and region position,
then cross-entropy with ignore_index -1), on the same weights, batch and TrainStep options.

The batch is Oscar's pretraining layout (PretrainTensorizer, the defaults of jobs/pretrain_*.yaml): 35 text
positions (text_a of 10-30 and text_b of 5-29 random CJK characters, cut to fit), 50 random regions of 2054-d, 15%
of the text tokens masked, 3-way contrastive labels. One step = forward, backward, gradient clipping (1.0) and
AdamW. Before timing, both losses are computed with dropout off: they must agree (`loss_check`).

MFU = samples/s x model FLOPs per sample / the device's dense bf16 peak (bench_train_step's table of known GPUs, or
`--peak-tflops`). Model FLOPs count every position through every layer and the vocab projection at the masked
tokens only (bench_train_step.dense_flops_per_sample), the same count for both variants. On a GPU:

    .venv/bin/python bench/bench_pretrain_step.py --cases base --batch 256 --amp bf16 [--compile]
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_decoding import write_cjk_vocab
from bench_train_step import (LR, MAX_GRAD_NORM, SEED, VOCAB, WEIGHT_DECAY, Case, dense_flops_per_sample, our_step,
                              repeated, step_arguments, step_setup)
from common import git_commit, interleaved_times, median, print_table, timed, write_results

from mengzi_ray.data.pretraining import PretrainLayout, PretrainTensorizer
from mengzi_ray.inference import collate
from mengzi_ray.modeling import OscarConfig, OscarForPretraining
from mengzi_ray.text import load_tokenizer
from mengzi_ray.training.optim import PRETRAIN_NO_DECAY
from mengzi_ray.training.step import StepOptions

SCRIPT = "bench_pretrain_step"
LAYOUT = PretrainLayout()


def pretrain_batch(size: int, vocab_dir: Path, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    tz = PretrainTensorizer(load_tokenizer(vocab_dir), LAYOUT)
    chars = [t for t in tz.tokenizer.convert_ids_to_tokens(list(range(len(tz.tokenizer)))) if len(t) == 1]

    def text(low: int, high: int) -> str:
        return "".join(rng.choice(chars, size=int(rng.integers(low, high + 1))))

    feats = LAYOUT.max_img_seq_length, LAYOUT.img_feature_dim
    return collate([tz.example(text(10, 30), text(5, 29), int(rng.integers(0, 3)), rng.random(feats, dtype=np.float32), rng)
                    for _ in range(size)])


def dense_head_loss(model: OscarForPretraining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The original's loss: logits at every position, CE over the text positions with ignore_index -1."""
    inputs = {k: v for k, v in batch.items() if k not in ("masked_lm_labels", "next_sentence_label")}
    out = model(**inputs)
    labels = batch["masked_lm_labels"]
    text = out.logits[:, : labels.shape[1]].float()
    mlm = F.cross_entropy(text.reshape(-1, text.shape[-1]), labels.reshape(-1), ignore_index=-1)
    return mlm + F.cross_entropy(out.seq_relationship_logits.float(), batch["next_sentence_label"].reshape(-1))


def run_case(case: Case, device: torch.device, vocab_dir: Path, options: StepOptions, peak: float | None) -> dict[str, Any]:
    """One of bench_train_step's model sizes; one warm-up step each, then interleaved repeats."""
    batch_size = case.batch
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    config = OscarConfig(vocab_size=VOCAB, hidden_size=case.hidden, num_hidden_layers=case.layers,
                         num_attention_heads=case.heads, intermediate_size=case.intermediate,
                         max_img_seq_length=LAYOUT.max_img_seq_length, num_contrast_classes=LAYOUT.num_contrast_classes)
    ours = OscarForPretraining(config).to(device)
    dense = copy.deepcopy(ours)
    batch = {k: v.to(device) for k, v in pretrain_batch(batch_size, vocab_dir, rng).items()}
    with torch.no_grad():
        a, b = ours.eval()(**batch).loss.item(), dense_head_loss(dense.eval(), batch).item()
    ours.train()
    dense.train()
    steps = {"ours": our_step(ours, batch, options, device, lambda m, x: m(**x).loss, PRETRAIN_NO_DECAY),
             "dense_head": our_step(dense, batch, options, device, dense_head_loss, PRETRAIN_NO_DECAY)}
    warmup = {name: timed(step, device)[0] for name, step in steps.items()}
    times, _ = interleaved_times({n: repeated(s, case.steps_per_repeat) for n, s in steps.items()}, case.repeats, device)
    rate = {name: batch_size * case.steps_per_repeat / median(t) for name, t in times.items()}
    masked = int((batch["masked_lm_labels"] != -1).sum())
    positions = LAYOUT.max_seq_length + LAYOUT.max_img_seq_length
    flops = dense_flops_per_sample(config, positions, LAYOUT.max_img_seq_length, LAYOUT.img_feature_dim, masked / batch_size)
    tflops = {name: r * flops / 1e12 for name, r in rate.items()}
    return {
        "case": asdict(case), "params": sum(p.numel() for p in ours.parameters()),
        "masked_tokens": masked, "positions": positions,
        "loss_check": {"ours": a, "dense_head": b, "abs_diff": abs(a - b)},
        "warmup_step_s": warmup, "times_s": times, "samples_per_s": rate,
        "ratio_ours_over_dense_head": rate["ours"] / rate["dense_head"],
        "model_flops_per_sample": flops, "achieved_tflops": tflops,
        "mfu": {name: t / peak for name, t in tflops.items()} if peak else None,
    }


def main() -> None:
    parser = step_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, help="rows per step (default: bench_train_step's case batch, 16)")
    parser.add_argument("--repeats", type=int, help="timed repeats per variant (default: the case's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both forwards (inductor)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both")
    args = parser.parse_args()
    device, options, peak, cases = step_setup(args, gradient_checkpointing=args.checkpointing, compile=args.compile)
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        write_cjk_vocab(VOCAB, Path(tmp))
        results = [run_case(replace(case, batch=args.batch or case.batch, repeats=args.repeats or case.repeats), device,
                            Path(tmp), options, peak) for case in cases]
    print(f"Pretraining step (fwd+bwd+clip+AdamW), {args.amp}{' compiled' if args.compile else ''}"
          f"{' checkpointed' if args.checkpointing else ''}, {device.type}, {LAYOUT.max_seq_length} text + "
          f"{LAYOUT.max_img_seq_length} region positions, median of interleaved repeats")
    print_table(["config", "H/L/heads/I", "batch", "ours samples/s", "dense head samples/s", "ours/dense", "ours TFLOP/s",
                 "ours MFU", "loss diff"],
                [[r["case"]["name"], "/".join(str(r["case"][k]) for k in ("hidden", "layers", "heads", "intermediate")),
                  r["case"]["batch"], f"{r['samples_per_s']['ours']:.2f}", f"{r['samples_per_s']['dense_head']:.2f}",
                  f"{r['ratio_ours_over_dense_head']:.2f}", f"{r['achieved_tflops']['ours']:.3f}",
                  f"{r['mfu']['ours']:.1%}" if r["mfu"] else "-", f"{r['loss_check']['abs_diff']:.1e}"] for r in results])
    settings = {"layout": asdict(LAYOUT), "vocab": VOCAB, "amp": args.amp, "compile": args.compile,
                "gradient_checkpointing": args.checkpointing, "threads": args.threads, "peak_tflops": peak,
                "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY} (pretraining no-decay groups), fused where available, "
                             f"clip_grad_norm {MAX_GRAD_NORM}", "warmup": "one step of each", "seed": SEED}
    print(f"results: {write_results(SCRIPT, device, commit, settings, results)}")


if __name__ == "__main__":
    main()
