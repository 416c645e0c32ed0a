"""Beam-search decoding with the key/value cache vs without it (OscarForCaptioning.generate, use_cache=True/False).

The baseline is the uncached path measured in the same process: every step re-encodes [caption prefix, [MASK]],
tags and regions. Models are random-init, inputs are random region features and random tag strings in the
captioning test layout. Both paths must return the same sequences and (up to float noise) the same scores.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import git_commit, interleaved_times, median, pick_device, print_table, timed, write_results
from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.modeling import GenerationOutput, OscarConfig, OscarForCaptioning, SpecialIds
from mengzi_ray.text import build_vocab, load_tokenizer, write_vocab

SCRIPT = "bench_decoding"
NUM_BEAMS = 5
MAX_LENGTH = 20  # G
A_TRAIN = 40  # caption budget of the training layout: od-label positions start here
TAG_SLOTS = 10  # od-label tokens incl. their [SEP]: L_test = G + TAG_SLOTS
REPEATS = 3
SEED = 0


@dataclass(frozen=True)
class Case:
    """One model size and the batch it decodes."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    initializer_range: float
    batch: int
    regions: int


CASES = (
    # Wide init (0.6, not 0.02) so next-token distributions are peaked and beams diverge, as in the unit tests.
    Case("tiny", 128, 2, 4, 256, 1000, 0.6, batch=32, regions=50),
    # Base size at the usual init (wider ones collapse to one repeated token). The uncached path re-encodes the
    # whole prefix + tags + regions every step, so the batch is cut to keep the script within ~4 minutes.
    Case("base", 768, 12, 12, 3072, 21128, 0.02, batch=2, regions=50),
)


def write_cjk_vocab(size: int, directory: Path) -> Path:
    """A vocab.txt of `size` tokens: the bert-base-chinese special layout, then consecutive CJK characters."""
    reserved = build_vocab([])
    chars = [chr(0x4E00 + i) for i in range(size - len(reserved))]
    return write_vocab(build_vocab([], extra_tokens=chars), directory / "vocab.txt")


def make_inputs(case: Case, vocab_dir: Path, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], SpecialIds]:
    """A test-layout batch: random tag strings (5-12 characters, truncated to the tag slots) and R random regions."""
    tokenizer = load_tokenizer(vocab_dir)
    train_layout = CaptionLayout(
        max_seq_a_length=A_TRAIN, max_seq_length=A_TRAIN + TAG_SLOTS, max_img_seq_length=case.regions
    )
    tensorizer = CaptionTensorizer(tokenizer, train_layout.for_generation(MAX_LENGTH))
    chars = [tok for tok in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) if len(tok) == 1]
    rows = []
    for _ in range(case.batch):
        tags = " ".join(rng.choice(chars, size=int(rng.integers(5, 13))))
        features = rng.random((case.regions, train_layout.img_feature_dim), dtype=np.float32)
        rows.append(tensorizer.test_example(tags, features))
    keys = ("input_ids", "attention_mask", "token_type_ids", "img_feats")
    inputs = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in keys}
    ids = SpecialIds(
        bos=tokenizer.cls_token_id, eos=tokenizer.sep_token_id, pad=tokenizer.pad_token_id, mask=tokenizer.mask_token_id
    )
    return inputs, ids


def caption_lengths(out: GenerationOutput, ids: SpecialIds) -> torch.Tensor:
    """Words per best caption ([CLS] and [SEP] not counted)."""
    return (out.sequences[:, 0] == ids.eos).int().argmax(dim=1) - 1


def run_case(case: Case, device: torch.device, work_dir: Path) -> dict[str, Any]:
    """Warm up both paths on one image, then time REPEATS interleaved runs of each on the whole batch."""
    torch.manual_seed(SEED)
    vocab_dir = work_dir / case.name
    write_cjk_vocab(case.vocab, vocab_dir)
    inputs, ids = make_inputs(case, vocab_dir, np.random.default_rng(SEED))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    config = OscarConfig(
        vocab_size=case.vocab,
        hidden_size=case.hidden,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        intermediate_size=case.intermediate,
        initializer_range=case.initializer_range,
        max_seq_a_length=A_TRAIN,
        max_seq_length=A_TRAIN + TAG_SLOTS,
        max_img_seq_length=case.regions,
    )
    model = OscarForCaptioning(config).to(device).eval()

    def decode(use_cache: bool, batch: dict[str, torch.Tensor]) -> GenerationOutput:
        return model.generate(
            **batch, num_beams=NUM_BEAMS, max_length=MAX_LENGTH, use_cache=use_cache, special_ids=ids
        )

    one_image = {k: v[:1] for k, v in inputs.items()}
    warmup = {
        "uncached": timed(lambda: decode(False, one_image), device)[0],
        "cached": timed(lambda: decode(True, one_image), device)[0],
    }
    times, outs = interleaved_times(
        {"uncached": lambda: decode(False, inputs), "cached": lambda: decode(True, inputs)}, REPEATS, device
    )
    plain, cached = outs["uncached"], outs["cached"]
    lengths = caption_lengths(cached, ids).float()
    return {
        "case": asdict(case),
        "text_slots": MAX_LENGTH + TAG_SLOTS,
        "warmup_s_one_image": warmup,
        "times_s": times,
        "uncached_s": median(times["uncached"]),
        "cached_s": median(times["cached"]),
        "speedup": median(times["uncached"]) / median(times["cached"]),
        "sequences_equal": torch.equal(plain.sequences, cached.sequences),
        "max_abs_score_diff": (plain.scores - cached.scores).abs().max().item(),
        "mean_caption_words": lengths.mean().item(),
        "distinct_captions": int(cached.sequences[:, 0].unique(dim=0).shape[0]),
    }


def main() -> None:
    torch.set_num_threads(2)
    device = pick_device()
    commit = git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_case(case, device, Path(tmp)) for case in CASES]
    print(
        f"Beam search B={NUM_BEAMS}, G={MAX_LENGTH}, {TAG_SLOTS} tag slots, random init, {device.type}, "
        f"median of {REPEATS} interleaved runs (seconds per batch)"
    )
    print_table(
        ["config", "H/L/heads/I/V", "init", "batch", "R", "uncached s", "cached s", "speedup",
         "same seqs", "max|dscore|", "words", "distinct"],
        [
            [
                r["case"]["name"],
                "/".join(str(r["case"][k]) for k in ("hidden", "layers", "heads", "intermediate", "vocab")),
                r["case"]["initializer_range"],
                r["case"]["batch"],
                r["case"]["regions"],
                f"{r['uncached_s']:.2f}",
                f"{r['cached_s']:.2f}",
                f"{r['speedup']:.2f}x",
                r["sequences_equal"],
                f"{r['max_abs_score_diff']:.1e}",
                f"{r['mean_caption_words']:.1f}",
                f"{r['distinct_captions']}/{r['case']['batch']}",
            ]
            for r in results
        ],
    )
    settings = {
        "num_beams": NUM_BEAMS,
        "max_length": MAX_LENGTH,
        "train_caption_budget": A_TRAIN,
        "tag_slots": TAG_SLOTS,
        "repeats": REPEATS,
        "seed": SEED,
        "warmup": "one run of each path on the first image of the batch",
        "inputs": "regions ~ U[0,1) of 2054-d; tags 5-12 random CJK characters (one token each)",
        "dtype": "float32",
    }
    path = write_results(SCRIPT, device, commit, settings, results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
