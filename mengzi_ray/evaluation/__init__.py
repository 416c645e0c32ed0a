"""evaluation: caption metrics; retrieval metrics come later.

* :mod:`.caption_metrics` — BLEU-1..4, METEOR, ROUGE-L, CIDEr via pycocoevalcap on character- or jieba-tokenised
  Chinese captions, with loud input checks.
* :mod:`.cider_d` — our own CIDEr-D with a JSON-serialisable document-frequency table, for SCST rewards.
"""

from mengzi_ray.evaluation.caption_metrics import (
    METRICS,
    CaptionScores,
    format_table,
    score_captions,
    tokenize_for_metrics,
)
from mengzi_ray.evaluation.cider_d import CiderD

__all__ = [
    "METRICS",
    "CaptionScores",
    "CiderD",
    "format_table",
    "score_captions",
    "tokenize_for_metrics",
]
