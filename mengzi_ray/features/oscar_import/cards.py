"""The `mengzi-ray import-oscar` card: one card class per source `format:`, joined by a discriminated union.

`ImportOscarCard` (registered in mengzi_ray.config.COMMANDS) validates a YAML mapping into the card of its
`format`; unknown keys of that format are errors naming the field (e.g. `sgb_predictions.hw`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, RootModel

from mengzi_ray.config import Card
from mengzi_ray.text.tags import TagMapName


class ImportBase(Card):
    """Fields every import format shares."""

    output: str = Field(..., min_length=1, description="dataset dir (local or s3://): features/, text.jsonl, "
                        "import_summary.json, import_errors.jsonl")
    max_error_fraction: float = Field(0.05, ge=0, le=1, description="exit non-zero (outputs written) when failed "
                                      "rows / rows read exceeds this")
    tags: TagMapName = Field("corrected", description="tag map applied to the English class names: corrected "
                             "(our reviewed translation) or langboat (Langboat's chinese_label.json verbatim)")
    detector: str = Field("vinvl_import", description="value of the detector column")


class VinvlTsvImport(ImportBase):
    """3-column VinVL features.tsv (key, num_boxes, base64) + predictions.tsv (today's `vinvl`)."""

    format: Literal["vinvl"]
    features: str = Field(..., description="features.tsv (local or s3://)")
    labels: str = Field(..., description="predictions.tsv with the objects (rect, class, conf)")


class CaptionTsvImport(ImportBase):
    """Captioning feature tsv (key, {"num_boxes", "features"}) + label tsv (today's `caption`)."""

    format: Literal["caption"]
    features: str = Field(..., description="feature.tsv: key + json {num_boxes, features}")
    labels: str = Field(..., description="label tsv: key + object list (or {objects: ...})")


class SgbPredictionsImport(ImportBase):
    """scene_graph_benchmark's own predictions.tsv: every object carries its 2048-d `feature` (base64)."""

    format: Literal["sgb_predictions"]
    predictions: str = Field(..., description="predictions.tsv written by tools/test_sg_net.py")
    hw: str | None = Field(None, description="hw tsv (key, [{height, width}]) of the detector's input dataset")
    images: str | None = Field(None, description="dir or s3:// prefix holding <key>.<jpg|png|...>: sizes of rows "
                               "without an hw row or image_h/image_w are read from the image headers")


class VinvlCaptionImport(ImportBase):
    """One split of a VinVL captioning dir: its yaml (feature, label, caption keys, relative to the yaml)."""

    format: Literal["vinvl_caption"]
    yaml: str = Field(..., description="train.yaml / val.yaml / test.yaml of the captioning dir")
    split: str | None = Field(None, description="split name of the text rows; default: the yaml's stem")
    more_yamls: list[str] = Field(default_factory=list, description="further split yamls imported into the same "
                                  "output (split = each yaml's stem), so train + val form one dataset")


class VinvlRetrievalImport(ImportBase):
    """One split of a VinVL/Oscar retrieval dir ({split}_captions.pt + features + eval key/candidate lists)."""

    format: Literal["vinvl_retrieval"]
    dir: str = Field(..., description="the retrieval data dir (e.g. coco_ir)")
    split: str = Field(..., min_length=1, description="train | minival | val | test ...")
    features: str | None = Field(None, description="features file; default: <dir>/features.tsv, else the "
                                 "Oscar-v1 <dir>/<split>_img_frcnn_feats.pt")
    labels: str | None = Field(None, description="labels; default: predictions.tsv beside a features.tsv, else "
                               "<dir>/<split>_vg_labels.pt")
    img_keys: str | None = Field(None, description="evaluation image keys (.tsv one per line, or a torch-saved "
                                 "list .pt); default <dir>/<split>_img_keys_1k.tsv when present")
    caption_index: str | None = Field(None, description="candidate pairs .pt ({key: [[img_key, cap_idx], ...]}); "
                                      "default <dir>/<split>_caption_indexs_top20.pt when present")
    more_splits: list[str] = Field(default_factory=list, description="further splits of the same dir imported into "
                                   "the same output (their captions, and their features when stored per split)")


class OscarPlusCorpusImport(ImportBase):
    """The Oscar+ pretraining corpus: its yaml (corpus, corpus_file, image_label_path, image_feature_path)."""

    format: Literal["oscarplus_corpus"]
    yaml: str = Field(..., description="e.g. coco_flickr30k_gqa.yaml")
    data_dir: str | None = Field(None, description="root of image_feature_path (the original --data_dir); "
                                 "features are imported only when set")
    use_gtlabels: bool = Field(True, description="text_b from gt_objects when a label row has them (Oscar+ "
                               "--use_gtlabels 1), else from the detector objects")
    split: str = Field("train", min_length=1, description="split of the text rows")


class AicIccImport(ImportBase):
    """AIC-ICC caption_{train,validation}_annotations_*.json → text rows (5 captions per image)."""

    format: Literal["aic_icc"]
    annotations: str = Field(..., description="the annotations json: [{url, image_id: <hash>.jpg, caption: [...]}]")
    split: str = Field(..., min_length=1, description="split of the text rows (train | val)")
    image_id_prefix: str = Field("", description="prepended to <hash>: the image dir's path under the extraction "
                                 "root, so ids equal the extraction's (path relative to the root, no extension)")
    more_annotations: dict[str, str] = Field(default_factory=dict, description="{split: annotations json} imported "
                                             "into the same text.jsonl after the first")


FORMAT_CARDS = (VinvlTsvImport, CaptionTsvImport, SgbPredictionsImport, VinvlCaptionImport, VinvlRetrievalImport,
                OscarPlusCorpusImport, AicIccImport)
AnyImportCard = Union[VinvlTsvImport, CaptionTsvImport, SgbPredictionsImport, VinvlCaptionImport,
                      VinvlRetrievalImport, OscarPlusCorpusImport, AicIccImport]


class ImportOscarCard(RootModel[Annotated[AnyImportCard, Field(discriminator="format")]]):
    """`mengzi-ray import-oscar`: original Oscar/VinVL/AIC-ICC files → our features/ + text.jsonl (streams in the
    driver process: sequential scans need no cluster). The card's `format:` picks the fields."""
