"""A trained model dir → a ready-to-call model with its input layout: the one place inputs are built for a
trained model.

* :class:`Captioner` — region sets → beam-search captions (`OscarForCaptioning`).
* :class:`MatchScorer` — (text, od labels, regions) pairs → match probabilities (`OscarForRetrieval`).
* :class:`DualEmbedder` — captions and images → dual-encoder unit vectors (`OscarForRetrieval` with its dual heads).

Both read the whole input layout from the model dir's config (text budgets, region count, od labels, attention
mask type, tag map, tokenizer casing) via `from_model_dir`, or take a model already in memory (training-time
validation). Evaluation's actors, Serve's replicas and validation wrap them; none of them builds tensors itself.
Sits above `data`/`modeling`/`text`, below `evaluation`/`serving`/`training`; imports no Ray.
"""

from mengzi_ray.inference.batch import collate, load_model_dir
from mengzi_ray.inference.captioner import Captioner, generation_layout
from mengzi_ray.inference.embedder import DualEmbedder
from mengzi_ray.inference.scorer import MatchScorer, Pair

__all__ = ["Captioner", "DualEmbedder", "MatchScorer", "Pair", "collate", "generation_layout", "load_model_dir"]
