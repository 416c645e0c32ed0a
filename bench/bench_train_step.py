"""Captioning train-step throughput of our OscarForCaptioning step vs the original Oscar step on the same weights
and the same batch (bench/oscar_original.py re-states the original: eager attention over every position, the
pooler, erf gelu, a dense smoothed one-hot loss, pytorch_transformers' per-parameter AdamW).

One step = forward, backward, gradient clipping (1.0) and an AdamW step. Both run the training layout of
CaptionTensorizer.train_example: text L=70 (caption budget A=40, then tags) followed by R=50 regions of 2054-d,
the 3-D seq2seq mask and up to 3 masked caption tokens per row; label smoothing 0.1; dropout 0.1, train mode,
the same batch every step. Ours is the project's TrainStep (packed read-out forward, fused AdamW where available;
`--amp bf16|fp16` autocasts ours). Before timing, both losses are computed on the batch with dropout off: they
must agree (`loss_check`).

Model FLOPs per sample are the dense model's (every position, every layer, the head at the masked tokens), the
same count for both implementations: TFLOP/s = samples/s x FLOPs/sample; MFU = that / the device's peak (dense
bf16 peak of a known GPU, or `--peak-tflops`); CPUs have no listed peak, so MFU is reported there only when given.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_decoding import write_cjk_vocab
from common import git_commit, interleaved_times, median, pick_device, print_table, timed, write_results
from oscar_original import OriginalCaptioningStep, check_same_loss

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.modeling import OscarConfig, OscarForCaptioning
from mengzi_ray.text import load_tokenizer
from mengzi_ray.inference import collate
from mengzi_ray.training.tasks import caption_loss
from mengzi_ray.training.optim import CAPTION_NO_DECAY, build_optimizer
from mengzi_ray.training.step import StepOptions, TrainStep

SCRIPT = "bench_train_step"
LAYOUT = CaptionLayout(max_seq_a_length=40, max_seq_length=70, max_img_seq_length=50, img_feature_dim=2054)
SEQ_LEN = LAYOUT.max_seq_length + LAYOUT.max_img_seq_length  # 120
VOCAB = 21128
LR, WEIGHT_DECAY, MAX_GRAD_NORM, LABEL_SMOOTHING = 1e-4, 0.05, 1.0, 0.1
SEED = 0
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


@dataclass(frozen=True)
class Case:
    """One model size, its batch (rows per step), and how many steps one timed repeat runs."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    steps_per_repeat: int
    repeats: int


CASES = (
    Case("small", 256, 4, 4, 1024, batch=16, steps_per_repeat=4, repeats=3),
    Case("base", 768, 12, 12, 3072, batch=16, steps_per_repeat=1, repeats=2),
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


def our_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], options: StepOptions, device: torch.device,
             loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] = caption_loss,
             no_decay: tuple[str, ...] = CAPTION_NO_DECAY) -> Callable[[], float]:
    """A closure running one optimiser step of the project's TrainStep on `loss_fn(forward, batch)`; returns the
    loss. `no_decay`: the task's AdamW groups (training/optim.py)."""
    optimizer = build_optimizer(model, LR, WEIGHT_DECAY, no_decay, fused=options.fused)
    step = TrainStep(model, optimizer, options, device)
    forward = step.forward_module(model)

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        with step.autocast():
            loss = loss_fn(forward, batch)
        step.backward(loss)
        step.update()
        return loss.item()

    return run


def repeated(step: Callable[[], float], times: int) -> Callable[[], None]:
    """A closure running `step` `times` times."""

    def run() -> None:
        for _ in range(times):
            step()

    return run


def dense_flops_per_sample(config: OscarConfig, positions: int, regions: int, feature_dim: int,
                           masked_per_sample: float) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one sample through the dense model: every one of
    `positions` (text + regions) through every layer (matmuls 2·params·tokens, attention scores and context
    4·N²·H per layer), the embedding of `regions` feature_dim-d regions, and the MLM head at the masked tokens
    only (what the loss needs; a head over every position is work the model does not need, not model FLOPs)."""
    h, i, n = config.hidden_size, config.intermediate_size, positions
    per_layer = 2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h
    embed = 2 * regions * feature_dim * h
    head = 2 * masked_per_sample * (h * h + h * config.vocab_size)
    return 3.0 * (config.num_hidden_layers * per_layer + embed + head)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def run_case(case: Case, device: torch.device, vocab_dir: Path, options: StepOptions, peak: float | None) -> dict[str, Any]:
    """Same weights and batch for both; warm up one step each, then time interleaved repeats."""
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    config = OscarConfig(
        vocab_size=VOCAB, hidden_size=case.hidden, num_hidden_layers=case.layers, num_attention_heads=case.heads,
        intermediate_size=case.intermediate, max_seq_a_length=LAYOUT.max_seq_a_length,
        max_seq_length=LAYOUT.max_seq_length, max_img_seq_length=LAYOUT.max_img_seq_length,
        label_smoothing=LABEL_SMOOTHING,
    )
    ours = OscarForCaptioning(config).to(device).train()
    original = OriginalCaptioningStep(copy.deepcopy(ours), LR, WEIGHT_DECAY, MAX_GRAD_NORM)
    batch = {k: v.to(device) for k, v in oscar_batch(case, vocab_dir, rng).items()}
    loss_check = check_same_loss(ours, original, batch)
    steps = {"ours": our_step(ours, batch, options, device), "original": lambda: original.step(batch)}
    warmup = {name: timed(step, device)[0] for name, step in steps.items()}
    times, _ = interleaved_times(
        {name: repeated(step, case.steps_per_repeat) for name, step in steps.items()}, case.repeats, device
    )
    samples = case.batch * case.steps_per_repeat
    rate = {name: samples / median(t) for name, t in times.items()}
    masked = int(batch["masked_pos"].sum())
    flops = dense_flops_per_sample(config, SEQ_LEN, LAYOUT.max_img_seq_length, LAYOUT.img_feature_dim, masked / case.batch)
    tflops = {name: r * flops / 1e12 for name, r in rate.items()}
    live = int((batch["attention_mask"].amax(dim=1) > 0).sum())
    return {
        "case": asdict(case),
        "params": sum(p.numel() for p in ours.parameters()),
        "masked_tokens": masked,
        "live_positions": live,
        "positions": case.batch * SEQ_LEN,
        "loss_check": loss_check,
        "warmup_step_s": warmup,
        "times_s": times,
        "samples_per_s": rate,
        "ratio_ours_over_original": rate["ours"] / rate["original"],
        "model_flops_per_sample": flops,
        "achieved_tflops": tflops,
        "mfu": {name: t / peak for name, t in tflops.items()} if peak else None,
    }


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The options every train-step bench takes: --cases, --amp, --peak-tflops, --threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="comma-separated case names")
    parser.add_argument("--amp", choices=("fp32", "bf16", "fp16"), default="fp32", help="precision of our step")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: known GPUs)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


def step_setup(args: argparse.Namespace, **options: Any) -> tuple[torch.device, StepOptions, float | None, list[Case]]:
    """Threads set; (device, the step's options with `options` added, peak TFLOP/s or None, the chosen cases)."""
    torch.set_num_threads(args.threads)
    device = pick_device()
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    step = StepOptions(amp_dtype=amp, fused=True, max_grad_norm=MAX_GRAD_NORM, **options)
    return device, step, peak_tflops(device, args.peak_tflops), [c for c in CASES if c.name in args.cases.split(",")]


def main() -> None:
    args = step_arguments(__doc__.split("\n\n")[0]).parse_args()
    device, options, peak, cases = step_setup(args)
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_dir = Path(tmp)
        write_cjk_vocab(VOCAB, vocab_dir)
        results = [run_case(case, device, vocab_dir, options, peak) for case in cases]
    print(f"Train step (fwd+bwd+clip+AdamW), ours {args.amp} vs the original fp32, {device.type}, {SEQ_LEN} positions, "
          f"vocab {VOCAB}, median of interleaved repeats")
    print_table(
        ["config", "H/L/heads/I", "batch", "ours samples/s", "original samples/s", "ours/original", "ours TFLOP/s",
         "ours MFU", "loss diff"],
        [
            [
                r["case"]["name"],
                "/".join(str(r["case"][k]) for k in ("hidden", "layers", "heads", "intermediate")),
                r["case"]["batch"],
                f"{r['samples_per_s']['ours']:.2f}",
                f"{r['samples_per_s']['original']:.2f}",
                f"{r['ratio_ours_over_original']:.2f}",
                f"{r['achieved_tflops']['ours']:.3f}",
                f"{r['mfu']['ours']:.1%}" if r["mfu"] else "-",
                f"{r['loss_check']['abs_diff']:.1e}",
            ]
            for r in results
        ],
    )
    settings = {
        "ours": f"OscarForCaptioning + TrainStep ({args.amp}, fused AdamW where available), text "
        f"L={LAYOUT.max_seq_length} (A={LAYOUT.max_seq_a_length}) + R={LAYOUT.max_img_seq_length} regions x "
        f"{LAYOUT.img_feature_dim}-d, 3-D seq2seq mask",
        "original": "bench/oscar_original.py: the original captioning step re-stated on the same weights (fp32)",
        "vocab": VOCAB,
        "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY} (caption no-decay groups), clip_grad_norm {MAX_GRAD_NORM}",
        "label_smoothing": LABEL_SMOOTHING,
        "dropout": 0.1,
        "threads": args.threads,
        "peak_tflops": peak,
        "warmup": "one step of each",
        "seed": SEED,
    }
    path = write_results(SCRIPT, device, commit, settings, results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
