"""Oscar models: config, trunk, task heads, checkpoint IO and decoding (original key names throughout)."""

from mengzi_ray.modeling.checkpoint import LoadReport, OscarPreTrainedModel
from mengzi_ray.modeling.config import OscarConfig
from mengzi_ray.modeling.generation import GenerationOutput, SpecialIds
from mengzi_ray.modeling.heads import OscarForCaptioning, OscarForPretraining, OscarForRetrieval, TaskOutput
from mengzi_ray.modeling.oscar import OscarModel, OscarOutput

__all__ = [
    "GenerationOutput",
    "LoadReport",
    "OscarConfig",
    "OscarForCaptioning",
    "OscarForPretraining",
    "OscarForRetrieval",
    "OscarModel",
    "OscarOutput",
    "OscarPreTrainedModel",
    "SpecialIds",
    "TaskOutput",
]
