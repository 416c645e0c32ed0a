"""evaluation: caption metrics, retrieval metrics and the evaluate job.

* :mod:`.caption_metrics` — BLEU-1..4, METEOR, ROUGE-L, CIDEr via pycocoevalcap on character- or jieba-tokenised
  Chinese captions, with loud input checks.
* :mod:`.cider_d` — our own CIDEr-D with a JSON-serialisable document-frequency table, for SCST rewards.
* :mod:`.retrieval_metrics` — Oscar's i2t / t2i ranks and R@K (cross-image and re-rank modes).
* :mod:`.caption_inference`, :mod:`.retrieval_eval` — batch inference on Ray (Data) model actors.
* :mod:`.card`, :mod:`.jobs` — `mengzi-ray evaluate`: EvaluateCard → :func:`.jobs.run_evaluate`.

Importing this package imports neither torch nor Ray (the inference modules do, when imported themselves).
"""

from mengzi_ray.evaluation.caption_metrics import (
    METRICS,
    CaptionScores,
    format_table,
    score_captions,
    tokenize_for_metrics,
)
from mengzi_ray.evaluation.cider_d import CiderD
from mengzi_ray.evaluation.retrieval_metrics import rerank_recall, retrieval_ranks, retrieval_recall

__all__ = [
    "METRICS",
    "CaptionScores",
    "CiderD",
    "format_table",
    "rerank_recall",
    "retrieval_ranks",
    "retrieval_recall",
    "score_captions",
    "tokenize_for_metrics",
]
