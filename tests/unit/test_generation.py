"""Decoding: greedy and beam search checked against exhaustive enumeration on a tiny fixed model, and the
key/value cache checked to give the same ids and scores as the uncached path (microsoft/Oscar
`oscar/modeling/modeling_bert.py` `BertForImageCaptioning.generate`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from mengzi_ray.data.captioning import CaptionLayout, CaptionTensorizer
from mengzi_ray.modeling import OscarForCaptioning, SpecialIds
from mengzi_ray.text import load_tokenizer
from tests.conftest import TINY_VOCAB, tiny_config

IDS = SpecialIds(bos=TINY_VOCAB.index("[CLS]"), eos=TINY_VOCAB.index("[SEP]"), pad=0, mask=TINY_VOCAB.index("[MASK]"))
A_TRAIN = 8


def setup(tiny_vocab_file: Path, G: int, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    # A wide init makes next-token distributions peaked, so the search has real choices to get right.
    model = OscarForCaptioning(tiny_config(initializer_range=0.6, max_seq_a_length=A_TRAIN)).eval()
    tok = load_tokenizer(tiny_vocab_file.parent)
    lay = CaptionLayout(max_seq_a_length=A_TRAIN, max_seq_length=A_TRAIN + 3, max_img_seq_length=3, img_feature_dim=12)
    tz = CaptionTensorizer(tok, lay.for_generation(G))
    rng = np.random.default_rng(seed)
    rows = [tz.test_example(labels, rng.normal(size=(2 + i % 2, 12))) for i, labels in zip(range(batch), itertools.cycle(["红 方", "蓝"]))]
    inputs = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in ("input_ids", "attention_mask", "token_type_ids", "img_feats")}
    return model, inputs


@torch.no_grad()
def next_logprobs(model, inputs, b: int, prefix: list[int], G: int) -> torch.Tensor:
    """Spec §4.1, written independently: [prefix, MASK] ‖ labels ‖ regions, caption rows/cols len+1..G-1 removed,
    label positions from max(A_train, G)."""
    t = len(prefix)
    labels = inputs["input_ids"][b, G:]
    keep = list(range(t + 1)) + list(range(G, inputs["attention_mask"].shape[1]))
    mask = inputs["attention_mask"][b][keep][:, keep]
    ids = torch.tensor(prefix + [IDS.mask] + labels.tolist())
    text_keep = keep[: t + 1 + len(labels)]
    start = max(A_TRAIN, G)
    pos = torch.tensor(list(range(t + 1)) + list(range(start, start + len(labels))))
    out = model(input_ids=ids[None], attention_mask=mask[None], token_type_ids=inputs["token_type_ids"][b, text_keep][None],
                img_feats=inputs["img_feats"][b][None], position_ids=pos[None], is_training=False)
    return out.logits[0, t].float().log_softmax(-1)


def test_greedy_follows_the_argmax_chain(tiny_vocab_file: Path) -> None:
    G = 6
    model, inputs = setup(tiny_vocab_file, G)
    out = model.generate(**inputs, max_length=G, num_beams=1, special_ids=IDS, use_cache=False)
    assert out.sequences.shape == (2, 1, G)
    for b in range(2):
        seq = out.sequences[b, 0].tolist()
        prefix, logps = [IDS.bos], []
        while len(prefix) < G:
            lp = next_logprobs(model, inputs, b, prefix, G)
            word = int(lp.argmax())
            logps.append(float(lp[word]))
            prefix.append(word)
            if word == IDS.eos:
                break
        if prefix[-1] != IDS.eos:
            prefix[-1] = IDS.eos  # out of room: the last token is overwritten by [SEP], its log-prob still counts
        assert seq[: len(prefix)] == prefix and all(x == IDS.pad for x in seq[len(prefix):])
        assert out.scores[b, 0].item() == pytest.approx(np.mean(logps), abs=1e-5)


def test_beam_search_finds_the_exhaustive_optimum(tiny_vocab_file: Path) -> None:
    G, lp_exp = 4, 1.0
    model, inputs = setup(tiny_vocab_file, G, batch=1, seed=3)
    words = [w for w in range(len(TINY_VOCAB)) if w != IDS.eos]
    best_score, best_seq = -np.inf, None
    for n in range(G - 1):  # prefixes [CLS] + n words, n = 0..G-2
        for tail in itertools.product(words, repeat=n):
            prefix = [IDS.bos, *tail]
            logp_prefix = sum(float(next_logprobs(model, inputs, 0, prefix[:i], G)[prefix[i]]) for i in range(1, len(prefix)))
            lp = next_logprobs(model, inputs, 0, prefix, G)
            enders = range(len(TINY_VOCAB)) if len(prefix) + 1 == G else [IDS.eos]
            for w in enders:
                score = (logp_prefix + float(lp[w])) / len(prefix) ** lp_exp
                if score > best_score:
                    best_score, best_seq = score, prefix + [IDS.eos]
    beams = len(words) ** (G - 2)  # enough beams to keep every live prefix: the search becomes exhaustive
    out = model.generate(**inputs, max_length=G, num_beams=beams, length_penalty=lp_exp, special_ids=IDS, use_cache=False)
    seq = out.sequences[0, 0].tolist()
    assert seq[: len(best_seq)] == best_seq
    assert out.scores[0, 0].item() == pytest.approx(best_score, abs=1e-5)


@pytest.mark.parametrize("num_beams,keep", [(1, 1), (3, 1), (4, 2)])
def test_cache_gives_identical_ids_and_scores(tiny_vocab_file: Path, num_beams: int, keep: int) -> None:
    G = 9
    model, inputs = setup(tiny_vocab_file, G, batch=3, seed=5)
    plain = model.generate(**inputs, max_length=G, num_beams=num_beams, num_keep_best=keep, special_ids=IDS, use_cache=False)
    cached = model.generate(**inputs, max_length=G, num_beams=num_beams, num_keep_best=keep, special_ids=IDS, use_cache=True)
    assert torch.equal(plain.sequences, cached.sequences)
    torch.testing.assert_close(plain.scores, cached.scores, atol=1e-5, rtol=1e-5)
    assert plain.sequences.shape == (3, keep, G)
    assert (plain.sequences[:, :, 0] == IDS.bos).all()


def test_length_penalty_changes_the_normalisation(tiny_vocab_file: Path) -> None:
    G = 6
    model, inputs = setup(tiny_vocab_file, G, batch=1, seed=7)
    for lp in (0.0, 1.0, 2.0):
        out = model.generate(**inputs, max_length=G, num_beams=3, length_penalty=lp, special_ids=IDS)
        seq = out.sequences[0, 0].tolist()
        n = seq.index(IDS.eos)  # hypothesis length = [CLS] + words, without the [SEP]
        total = sum(float(next_logprobs(model, inputs, 0, seq[:i], G)[seq[i]]) for i in range(1, n))
        last = next_logprobs(model, inputs, 0, seq[:n], G)
        # A hypothesis that ran out of room scored its best last word, then got [SEP] written in its place.
        total += float(last.max() if n + 1 == G else last[IDS.eos])
        assert out.scores[0, 0].item() == pytest.approx(total / n**lp, abs=1e-4)


def test_generation_input_errors(tiny_vocab_file: Path) -> None:
    G = 6
    model, inputs = setup(tiny_vocab_file, G)
    with pytest.raises(ValueError, match="fewer than max_length"):
        model.generate(**inputs, max_length=30, special_ids=IDS)
    with pytest.raises(ValueError, match="num_keep_best"):
        model.generate(**inputs, max_length=G, num_beams=2, num_keep_best=3, special_ids=IDS)
    with pytest.raises(ValueError, match="pass special_ids"):
        model.generate(**inputs, max_length=G)
