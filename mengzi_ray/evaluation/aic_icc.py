"""The AI Challenger 2017 image-captioning kit's tokenisation, reproduced (`tokenization: aic_icc`).

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

import shutil
from collections.abc import Mapping, Sequence

import jieba


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
