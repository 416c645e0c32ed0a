"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr) on Chinese captions, offline (microsoft/Oscar
`oscar/utils/caption_evaluate.py`).

The pycocoevalcap scorers are fed pre-tokenised text directly, bypassing PTBTokenizer (stack.md §5), so the
tokenisation is ours and every result names it:

* ``"char"`` — character level, the Oscar-native reading: each CJK character is a token.
* ``"jieba"`` — word level close to the AI Challenger (AIC-ICC) kit: "。" removed, jieba precise mode (but
  NFKC-normalised and every punctuation token dropped, which the kit does not do).
* ``"aic_icc"`` — the kit's exact protocol (below): jieba as the kit calls it, then the coco-caption PTBTokenizer
  on both sides; an empty prediction rejects the whole set (SubmissionRejected). Needs Java.

METEOR 1.5 (``-norm``) splits CJK into characters itself, so it is character level under either tokenisation.
CIDEr takes document frequencies from the evaluated references (corpus mode, as Oscar's evaluation does), so it is
only comparable between runs over the same image set and is 0 for a single image. SPICE is not offered: it fetches
Stanford CoreNLP at run time and fails offline.

The AI Challenger 2017 kit, reproduced by ``aic_icc``:

The kit (AIChallenger/AI_Challenger_2017, `Evaluation/caption_eval`) scores a submission like this:
1. `pycxtools/coco.py COCO.loadRes`: every prediction must be a non-empty string (an empty one fails an assert
   and the whole submission scores nothing); it becomes `" ".join(jieba.cut(caption.strip().replace("。", ""),
   cut_all=False))`. References go through the same segmentation here (the kit expects its reference json to be
   segmented that way already).
2. `pycxevalcap/eval.py COCOEvalCap.evaluate`: both sides through coco-caption's PTBTokenizer (Stanford CoreNLP
   3.4.1, `-preserveLines -lowerCase`), which drops only the tokens of its ASCII punctuation list, so full-width
   "，！？" stay tokens;
3. BLEU-1..4, METEOR 1.5 (`-l en -norm`), ROUGE-L and CIDEr-D with document frequencies from the scored references.
pycocoevalcap ships the same CoreNLP jar, PTBTokenizer wrapper and scorers, so steps 2-3 run that code; this
module does step 1 and the rejection rule. The PTB step needs `java` on PATH.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import jieba
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

logger = logging.getLogger(__name__)

Tokenization = Literal["char", "jieba", "aic_icc"]
METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr")
_MAX_IDS_IN_ERROR = 5
_LATIN_RUN = re.compile(r"[A-Za-z0-9]+")
_CHAR_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")


@dataclass(frozen=True)
class CaptionScores:
    """Result of :func:`score_captions`.

    ``scores`` holds Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (those requested and not skipped) as fractions (CIDEr
    is not ×100). ``num_images`` is the number of images scored; ``missing_predictions`` counts images that had
    references but no prediction and were excluded (only with ``allow_missing_predictions=True``). ``skipped``
    maps a requested metric that could not run to the reason. ``per_image_cider`` maps image id → CIDEr.
    """

    scores: dict[str, float]
    tokenization: str
    num_images: int
    missing_predictions: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    per_image_cider: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return dataclasses.asdict(self)


def tokenize_for_metrics(text: str, tokenization: Tokenization) -> str:
    """Tokenise one caption into space-separated tokens for the scorers.

    Common rules: NFKC normalisation (full-width letters/digits/punctuation become ASCII); whitespace is
    dropped, so Oscar-style "两 个 人" equals "两个人", except that a space between two ASCII letter/digit runs
    still separates them ("new york"); tokens that consist only of Unicode punctuation (category P*: 。，、！？“”
    （）.,!? …) are removed, like PTBTokenizer removes punctuation; tokens are lower-cased (PTB ``-lowerCase``).

    * ``"char"``: every remaining character is a token, except that a run of ASCII letters/digits stays one
      token ("T恤" → "t 恤", "iPhone12手机" → "iphone12 手 机").
    * ``"jieba"``: "。" removed, then ``jieba.lcut`` (precise mode, as the AIC-ICC kit); jieba keeps words such
      as "T恤" whole ("一个穿T恤的男人" → "一个 穿 t恤 的 男人").

    Raises ValueError for an unknown tokenization.
    """
    if tokenization not in ("char", "jieba"):
        raise ValueError(f"tokenization must be 'char' or 'jieba', got {tokenization!r}")
    joined = _drop_spaces(unicodedata.normalize("NFKC", text))
    if tokenization == "char":
        tokens = _CHAR_TOKEN.findall(joined)
    else:
        tokens = [t for t in jieba.lcut(joined.replace("。", "")) if not t.isspace()]
    return " ".join(t.lower() for t in tokens if not _is_punctuation(t))


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    tokenization: Tokenization = "char",
    metrics: Sequence[str] = METRICS,
    allow_missing_predictions: bool = False,
) -> CaptionScores:
    """Score one predicted caption per image against its reference captions.

    ``predictions``: image id → caption; ``references``: image id → non-empty list of captions. Raw or
    space-separated text; both sides go through :func:`tokenize_for_metrics` with ``tokenization``.
    ``metrics``: any of "Bleu" (gives Bleu_1..Bleu_4), "METEOR", "ROUGE_L", "CIDEr".

    Raises ValueError when there are no predictions, a prediction has no references, an image's reference list
    is empty, or images with references lack a prediction (unless ``allow_missing_predictions``, which excludes
    them, counts them in ``missing_predictions`` and logs a warning); TypeError when a caption is not a string.
    METEOR is skipped, with the reason in ``skipped``, when no ``java`` is on PATH. An empty prediction is
    allowed and scores 0, except under ``aic_icc``, which raises SubmissionRejected as the kit does.
    """
    wanted = _check_metrics(metrics)
    ids, missing = _check_inputs(predictions, references, allow_missing_predictions)
    if tokenization == "aic_icc":
        gts, res = aic_icc_inputs(predictions, references, ids)
    else:
        res = {i: [tokenize_for_metrics(predictions[i], tokenization)] for i in ids}
        gts = {i: [tokenize_for_metrics(r, tokenization) for r in references[i]] for i in ids}

    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    per_image_cider: dict[str, float] = {}
    if "Bleu" in wanted:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{k + 1}": float(v) for k, v in enumerate(bleu)})
    if "METEOR" in wanted:
        if shutil.which("java") is None:
            skipped["METEOR"] = "METEOR needs Java, not found on PATH"
        else:
            scores["METEOR"] = _meteor(gts, res)
    if "ROUGE_L" in wanted:
        rouge, _ = Rouge().compute_score(gts, res)
        scores["ROUGE_L"] = float(rouge)
    if "CIDEr" in wanted:
        cider, per_image = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(cider)
        # Cider returns per-image scores in the iteration order of gts.
        per_image_cider = {i: float(s) for i, s in zip(gts, per_image)}
    return CaptionScores(
        scores=scores,
        tokenization=tokenization,
        num_images=len(ids),
        missing_predictions=missing,
        skipped=skipped,
        per_image_cider=per_image_cider,
    )


def format_table(scores: CaptionScores) -> str:
    """Fixed-width table of ``scores`` for humans: a header naming tokenisation and image count, one line per
    metric (skipped metrics with their reason), and the number of excluded images when there were any."""
    lines = [
        f"caption metrics (tokenization: {scores.tokenization}, images: {scores.num_images})",
        f"{'metric':<9} {'score':>8}",
    ]
    lines += [f"{name:<9} {value:>8.4f}" for name, value in scores.scores.items()]
    lines += [f"{name:<9} {'skipped':>8}  ({reason})" for name, reason in scores.skipped.items()]
    if scores.missing_predictions:
        lines.append(f"excluded: {scores.missing_predictions} images with references but no prediction")
    return "\n".join(lines)


def _drop_spaces(text: str) -> str:
    chunks = text.split()
    if not chunks:
        return ""
    out = [chunks[0]]
    for prev, chunk in zip(chunks, chunks[1:]):
        latin_boundary = _LATIN_RUN.fullmatch(prev[-1]) and _LATIN_RUN.fullmatch(chunk[0])
        out.append(" " + chunk if latin_boundary else chunk)
    return "".join(out)


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def _check_metrics(metrics: Sequence[str]) -> set[str]:
    if isinstance(metrics, str):
        raise TypeError("metrics must be a sequence of metric names, not one string")
    if not metrics:
        raise ValueError("no metrics requested")
    if "SPICE" in metrics:
        raise ValueError("SPICE is not offered: it downloads Stanford CoreNLP at run time and fails offline")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    return set(metrics)


def _check_inputs(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    allow_missing_predictions: bool,
) -> tuple[list[str], int]:
    """Return the image ids to score (prediction order) and the number of excluded reference-only images."""
    if not predictions:
        raise ValueError("no predictions to score (empty prediction set)")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image {image_id!r} is {type(caption).__name__}, expected str")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references for image {image_id!r} must be a list of strings")
        if len(refs) == 0:
            raise ValueError(f"reference list for image {image_id!r} is empty")
    unknown = [i for i in predictions if i not in references]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted image ids have no references, e.g. {unknown[:_MAX_IDS_IN_ERROR]}"
        )
    missing = [i for i in references if i not in predictions]
    if missing and not allow_missing_predictions:
        raise ValueError(
            f"{len(missing)} images with references have no prediction, e.g. {missing[:_MAX_IDS_IN_ERROR]}; "
            "pass allow_missing_predictions=True to exclude them"
        )
    if missing:
        logger.warning(
            "excluding %d images with references but no prediction, e.g. %s",
            len(missing),
            missing[:_MAX_IDS_IN_ERROR],
        )
    return list(predictions), len(missing)


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    """Corpus METEOR through one short-lived JVM, which is always stopped before returning."""
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        proc = meteor.meteor_p
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            # Closing stdin flushes unsent input, which fails once the JVM is gone; the fd is closed anyway.
            with contextlib.suppress(BrokenPipeError):
                stream.close()
        # compute_score leaves its lock held when it raises, and Meteor.__del__ acquires that lock:
        # without this release garbage collection of the instance would block forever.
        if meteor.lock.locked():
            meteor.lock.release()
    return float(score)


# ---------------------------------------------------------------- the AIC-ICC kit's protocol (aic_icc)
class SubmissionRejected(ValueError):
    """The kit would not score this prediction set at all (e.g. an empty prediction)."""


def aic_segment(caption: str) -> str:
    """The kit's segmentation: strip, remove every "。", jieba precise mode, tokens joined by single spaces."""
    return " ".join(jieba.cut(caption.strip().replace("。", ""), cut_all=False))


def check_submission(predictions: Mapping[str, str]) -> None:
    """Raise SubmissionRejected naming the images whose prediction is the empty string (the kit asserts
    `caption != ''` for every prediction, which fails the whole submission)."""
    empty = [image_id for image_id, caption in predictions.items() if caption == ""]
    if empty:
        raise SubmissionRejected(
            f"the AIC-ICC kit rejects the whole submission: {len(empty)} empty prediction(s), e.g. images "
            f"{empty[:5]}"
        )


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """coco-caption's PTBTokenizer (Stanford CoreNLP 3.4.1, lower-cased, its punctuation list removed) over
    {image id: [captions]}. RuntimeError when java is not on PATH."""
    if shutil.which("java") is None:
        raise RuntimeError("tokenization aic_icc needs Java (the kit's Stanford PTB tokenizer); not found on PATH")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def aic_icc_inputs(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], ids: Sequence[str]
                   ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(gts, res) for the scorers exactly as the kit builds them, over `ids`. Raises SubmissionRejected first."""
    check_submission({i: predictions[i] for i in ids})
    res = ptb_tokenize({i: [aic_segment(predictions[i])] for i in ids})
    gts = ptb_tokenize({i: [aic_segment(r) for r in references[i]] for i in ids})
    return gts, res
