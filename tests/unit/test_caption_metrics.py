"""Caption metrics (mengzi_ray.evaluation.caption_metrics): tokenisation, hand-checked scores, loud bad input,
METEOR's JVM lifecycle."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import threading

import pytest

from pycocoevalcap.meteor.meteor import Meteor

from mengzi_ray.evaluation import caption_metrics
from mengzi_ray.evaluation.caption_metrics import format_table, score_captions, tokenize_for_metrics
from tests.system_packages import require_java

NO_METEOR = ("Bleu", "ROUGE_L", "CIDEr")


def _children_named(name: str) -> list[int]:
    """Pids of live or zombie direct children of this process whose command name is ``name`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name sits in parentheses and may itself contain spaces or parentheses.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm == name:
            found.append(int(entry))
    return found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("两个人在街上走。", "两 个 人 在 街 上 走"),
        ("两 个 人 在 街 上 走 。", "两 个 人 在 街 上 走"),  # Oscar-style spaced output
        ("一个穿T恤的男人，在打篮球！", "一 个 穿 t 恤 的 男 人 在 打 篮 球"),
        ("“你好”（测试）、好吗?", "你 好 测 试 好 吗"),
        ("iPhone 12手机", "iphone 12 手 机"),  # ASCII runs stay whole, a space between two of them separates
        ("Ｔ恤…", "t 恤"),  # NFKC: full-width letter -> ASCII
        (" 。 ", ""),
    ],
)
def test_char_tokenization(text: str, expected: str) -> None:
    assert tokenize_for_metrics(text, "char") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("一个男人在打篮球。", "一个 男人 在 打篮球"),
        ("一 个 男 人 在 打 篮 球 。", "一个 男人 在 打篮球"),  # spaces dropped before segmentation
        ("一个穿T恤的男人，在打篮球！", "一个 穿 t恤 的 男人 在 打篮球"),
        ("new york的街道上", "new york 的 街道 上"),
    ],
)
def test_jieba_tokenization(text: str, expected: str) -> None:
    assert tokenize_for_metrics(text, "jieba") == expected


def test_unknown_tokenization_is_rejected() -> None:
    with pytest.raises(ValueError, match="'char' or 'jieba'"):
        tokenize_for_metrics("两个人", "word")  # type: ignore[arg-type]


def test_identical_prediction_and_reference_score_one() -> None:
    refs = {"a": ["两个男人在街上走路"], "b": ["一只小猫趴在沙发上"], "c": ["一辆红色的车停在路边"]}
    preds = {k: v[0] for k, v in refs.items()}
    result = score_captions(preds, refs, metrics=NO_METEOR)
    for k in range(1, 5):
        assert result.scores[f"Bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert result.scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    assert set(result.per_image_cider) == set(refs)
    assert result.scores["CIDEr"] == pytest.approx(sum(result.per_image_cider.values()) / 3)
    assert (result.tokenization, result.num_images, result.missing_predictions) == ("char", 3, 0)


def test_bleu_1_by_hand() -> None:
    # Character tokens, corpus-level BLEU with the closest reference length:
    #   img1: "两 个 人" vs "两 个 男 人 在 走 路": 3 of 3 unigrams match; reference length 7.
    #   img2: "一 只 猫 猫" vs {"一 只 猫", "一 只 小 猫"}: 猫 clipped to its max reference count 1, so 3 of 4
    #         match; closest reference length to 4 is 4.
    #   precision = 6 / 7, candidate length 7 < reference length 11 -> brevity penalty exp(1 - 11/7).
    preds = {"img1": "两个人", "img2": "一只猫猫"}
    refs = {"img1": ["两个男人在走路"], "img2": ["一只猫", "一只小猫"]}
    result = score_captions(preds, refs, metrics=("Bleu",))
    assert result.scores["Bleu_1"] == pytest.approx(6 / 7 * math.exp(1 - 11 / 7), abs=1e-6)
    assert set(result.scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"}


def test_empty_prediction_scores_zero_and_jieba_is_named() -> None:
    preds = {"a": "两个男人在街上走路", "b": "", "c": "一辆车停在路边"}
    refs = {"a": ["两个男人在街上走路"], "b": ["一只小猫趴在沙发上"], "c": ["一辆红色的车停在路边"]}
    result = score_captions(preds, refs, tokenization="jieba", metrics=("CIDEr",))
    assert result.per_image_cider["b"] == 0.0
    assert result.tokenization == "jieba"
    assert "tokenization: jieba" in format_table(result)
    json.dumps(result.to_dict())


def test_meteor_runs_and_leaves_no_java_behind() -> None:
    preds = {"a": "两个男人在街上走路", "b": "一只小猫趴在沙发上"}
    refs = {"a": ["两个男人在街上走路"], "b": ["一只小猫趴在沙发上", "沙发上有一只猫"]}
    # The suite fails, never skips, without Java: `make system-deps` and cluster/Dockerfile install it.
    require_java()
    result = score_captions(preds, refs, metrics=("METEOR",))
    # Exact matches only; the fragmentation penalty keeps a perfect short match just below 1.
    assert 0.9 < result.scores["METEOR"] <= 1.0
    assert result.skipped == {}
    assert _children_named("java") == []


def test_child_process_check_sees_children() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert proc.pid in _children_named("sleep")
    finally:
        proc.kill()
        proc.wait()


class _FailingMeteor(Meteor):
    """Meteor whose "JVM" is a sleep process and whose scoring fails while holding the lock, as a crash would."""

    def __init__(self) -> None:
        pipe = subprocess.PIPE
        self.meteor_p = subprocess.Popen(["sleep", "30"], stdin=pipe, stdout=pipe, stderr=pipe)
        self.lock = threading.Lock()

    def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
        self.lock.acquire()
        raise RuntimeError("scorer crashed")


def test_meteor_process_is_stopped_when_scoring_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda _name: "/usr/bin/java")
    monkeypatch.setattr(caption_metrics, "Meteor", _FailingMeteor)
    with pytest.raises(RuntimeError, match="scorer crashed") as excinfo:
        score_captions({"a": "两个人"}, {"a": ["两个人"]}, metrics=("METEOR",))
    # The traceback still references the Meteor instance, so its __del__ has not run: the child must be gone
    # because score_captions stopped it, and the released lock lets __del__ finish later instead of hanging.
    assert _children_named("sleep") == []
    del excinfo


def test_meteor_skipped_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda _name: None)
    result = score_captions({"a": "两个人"}, {"a": ["两个人"]}, metrics=("Bleu", "METEOR"))
    assert result.skipped == {"METEOR": "METEOR needs Java, not found on PATH"}
    assert "METEOR" not in result.scores
    assert "skipped  (METEOR needs Java, not found on PATH)" in format_table(result)


def test_unknown_prediction_ids_are_rejected() -> None:
    preds = {"a": "x", "zz1": "y", "zz2": "z"}
    with pytest.raises(ValueError, match=r"2 predicted image ids have no references, e.g. \['zz1', 'zz2'\]"):
        score_captions(preds, {"a": ["x"]})


def test_missing_predictions_are_rejected_or_counted(caplog: pytest.LogCaptureFixture) -> None:
    refs = {"a": ["两个人"], "b": ["一只猫"], "c": ["一辆车"]}
    with pytest.raises(ValueError, match=r"2 images with references have no prediction, e.g. \['b', 'c'\]"):
        score_captions({"a": "两个人"}, refs)
    with caplog.at_level(logging.WARNING, logger=caption_metrics.__name__):
        result = score_captions({"a": "两个人"}, refs, metrics=("Bleu",), allow_missing_predictions=True)
    assert (result.num_images, result.missing_predictions) == (1, 2)
    assert "excluding 2 images" in caplog.text
    assert "excluded: 2 images" in format_table(result)


def test_other_bad_input_is_loud() -> None:
    with pytest.raises(ValueError, match="empty prediction set"):
        score_captions({}, {"a": ["两个人"]})
    with pytest.raises(ValueError, match="reference list for image 'b' is empty"):
        score_captions({"a": "两个人", "b": "猫"}, {"a": ["两个人"], "b": []})
    with pytest.raises(TypeError, match="references for image 'a' must be a list of strings"):
        score_captions({"a": "两个人"}, {"a": "两个人"})
    with pytest.raises(TypeError, match="prediction for image 'a' is list"):
        score_captions({"a": ["两个人"]}, {"a": ["两个人"]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="SPICE is not offered"):
        score_captions({"a": "两个人"}, {"a": ["两个人"]}, metrics=("CIDEr", "SPICE"))
    with pytest.raises(ValueError, match="unknown metrics"):
        score_captions({"a": "两个人"}, {"a": ["两个人"]}, metrics=("BLEU",))
