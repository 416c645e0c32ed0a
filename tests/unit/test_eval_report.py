"""report.md and examples.png: a CJK font is found and used; without one the report says so instead of a PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mengzi_ray.evaluation import caption_report
from mengzi_ray.evaluation.caption_metrics import CaptionScores
from mengzi_ray.evaluation.caption_report import Example, draw_examples, find_cjk_font, write_report
from tests.system_packages import require_cjk_font

SUMMARY = {
    "model_dir": "m", "features": "f", "references": "r", "split": "val", "num_images": 2, "num_beams": 5,
    "max_gen_length": 20, "warnings": ["3 of 5 feature images have no references and are not evaluated"],
}
SCORES = [CaptionScores({"CIDEr": 1.25}, "char", 2), CaptionScores({"CIDEr": 0.5}, "jieba", 2)]


def _examples(tmp_path) -> list[Example]:
    path = tmp_path / "图 1.png"  # non-ASCII and a space: file:// URIs are percent-encoded
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(path)
    return [Example("val/0", path.as_uri(), "红色的圆形", ["红色的圆形", "一个红色的圆形"]), Example("val/1", str(path), "蓝色", ["蓝色的正方形"])]


def test_cjk_font_is_found_and_drawn(tmp_path):
    font = require_cjk_font()
    assert font == find_cjk_font() and font.is_file()
    png = draw_examples(_examples(tmp_path), tmp_path / "out" / "examples.png", font)
    with Image.open(png) as image:
        assert image.size[0] >= 600 and image.size[1] >= 300


def test_report_has_tables_warnings_and_png_link(tmp_path):
    report = write_report(tmp_path / "report.md", SCORES, SUMMARY, tmp_path / "examples.png", _examples(tmp_path), None)
    text = report.read_text(encoding="utf-8")
    assert "tokenization: char" in text and "tokenization: jieba" in text and "1.2500" in text
    assert "warning: 3 of 5 feature images have no references" in text
    assert "![examples](examples.png)" in text
    assert "`val/0`: **红色的圆形**" in text


def test_without_cjk_font_the_report_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_report, "CJK_FONT_NAMES", ("No Such Font",))
    assert caption_report.find_cjk_font() is None
    reason = "no CJK font installed"
    text = write_report(tmp_path / "report.md", SCORES, SUMMARY, None, _examples(tmp_path), reason).read_text("utf-8")
    assert f"(no examples.png: {reason})" in text and "![examples]" not in text
