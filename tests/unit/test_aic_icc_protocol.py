"""tokenization: aic_icc reproduces the AI Challenger kit: the kit's own scores (tests/reference/aic_icc_kit, made
by regenerate.py running the kit beside the project) are matched exactly; an empty prediction rejects the set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mengzi_ray.evaluation.caption_metrics import SubmissionRejected, aic_segment
from mengzi_ray.evaluation.caption_metrics import score_captions

KIT = json.loads((Path(__file__).resolve().parents[1] / "reference" / "aic_icc_kit" / "kit_scores.json")
                 .read_text(encoding="utf-8"))


def test_segmentation_is_the_kits_call() -> None:
    assert aic_segment(" 两个人在草地上骑马。\n") == "两个 人 在 草地 上 骑马"
    assert aic_segment("一只狗，在跑！") == "一只 狗 ， 在 跑 ！"  # full-width punctuation stays a token


def test_scores_equal_the_kit_run_beside_the_project() -> None:
    if shutil.which("java") is None:
        with pytest.raises(RuntimeError, match="needs Java"):
            score_captions(KIT["predictions"], KIT["references"], tokenization="aic_icc")
        return
    ours = score_captions(KIT["predictions"], KIT["references"], tokenization="aic_icc")
    kit = {k: v for k, v in KIT["kit_scores"].items() if k != "error"}
    assert KIT["kit_scores"]["error"] == 0 and ours.scores == pytest.approx(kit, rel=1e-12, abs=1e-12)
    # the older "jieba" reading NFKC-normalises and drops every punctuation token: not the kit's numbers
    jieba = score_captions(KIT["predictions"], KIT["references"], tokenization="jieba")
    assert jieba.scores["CIDEr"] != pytest.approx(kit["CIDEr"], rel=1e-3)


def test_an_empty_prediction_rejects_the_whole_set_as_the_kit_does() -> None:
    assert KIT["kit_with_an_empty_prediction"]["error"] == 1
    with pytest.raises(SubmissionRejected, match="rejects the whole submission: 1 empty prediction.*c3.jpg"):
        score_captions({**KIT["predictions"], "c3.jpg": ""}, KIT["references"], tokenization="aic_icc")
    lenient = score_captions({**KIT["predictions"], "c3.jpg": ""}, KIT["references"], tokenization="char",
                             metrics=("CIDEr",))
    assert lenient.per_image_cider["c3.jpg"] == 0.0
