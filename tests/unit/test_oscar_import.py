"""import-oscar on hand-written files in every original layout: golden values, int/str ids, tag maps, bad rows."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mengzi_ray.config import ConfigError, JobFailed, validate_card
from mengzi_ray.features.oscar_import import run_import
from mengzi_ray.features.oscar_import.cards import ImportOscarCard
from mengzi_ray.features.oscar_import.common import RowError, json_array, normalize_image_id
from mengzi_ray.text.tags import TagVocabulary
from tests.oscar_originals import (
    OriginalImage,
    b64,
    make_images,
    write_aic_annotations,
    write_caption_dir,
    write_oscarplus_corpus,
    write_retrieval_dir,
    write_sgb_predictions,
    write_tsv,
    write_vinvl_features,
)


def card(**fields) -> ImportOscarCard:
    return validate_card(ImportOscarCard, fields, "test card")


def features(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in pq.read_table(out / "features").to_pylist()}


def texts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "text.jsonl").read_text(encoding="utf-8").splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "import_summary.json").read_text())


def assert_image(row: dict, im: OriginalImage, tags: TagVocabulary = TagVocabulary.default()) -> None:
    np.testing.assert_allclose(np.asarray(row["features"], np.float32), im.vectors, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(row["features"], np.float32)[:, :2048], im.appearance)
    np.testing.assert_allclose(np.asarray(row["boxes"], np.float32), im.rects, rtol=1e-6)
    assert row["labels"] == im.classes and row["tags"] == tags.translate(im.classes).tags
    assert (row["width"], row["height"]) == (im.width, im.height)
    np.testing.assert_allclose(row["scores"], im.confs, rtol=1e-6)


def test_ids_normalise_once_ints_and_strings_agree() -> None:
    assert normalize_image_id(391895) == normalize_image_id("391895") == normalize_image_id(" 391895 ") == "391895"
    assert normalize_image_id(np.int64(7)) == normalize_image_id(torch.tensor(7)) == "7"
    assert normalize_image_id("007") == "007"  # leading zeros name another image
    for bad in (True, 1.0, "", None, [1]):
        with pytest.raises(RowError, match="image id"):
            normalize_image_id(bad)


def test_card_format_picks_fields_and_names_the_bad_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sgb_predictions.predictions"):
        card(format="sgb_predictions", output="o")
    with pytest.raises(ConfigError, match="aic_icc.features"):
        card(format="aic_icc", annotations="a.json", split="val", output="o", features="x")
    with pytest.raises(ConfigError, match="format"):
        card(format="nope", output="o")


def test_sgb_predictions_with_hw_tsv_langboat_tags(tmp_path: Path) -> None:
    images = make_images(3, int_keys=False)
    preds, hw = write_sgb_predictions(tmp_path / "sgb", images)
    out = tmp_path / "out"
    result = run_import(card(format="sgb_predictions", predictions=str(preds), hw=str(hw), output=str(out),
                             tags="langboat"))
    rows = features(out)
    for im in images:
        assert_image(rows[str(im.key)], im, TagVocabulary.named("langboat"))
    assert result["written"] == {"features": 3} and result["tags"] == "langboat"
    assert TagVocabulary.named("langboat").translate(["airport"]).tags == ["航空站"]  # Langboat's table, verbatim
    assert TagVocabulary.named("corrected").translate(["airport"]).tags == ["机场"]
    # without hw and without image_h/w in the rows there is no size: every row fails, naming file and line
    with pytest.raises(JobFailed, match="3 of 3 rows failed"):
        run_import(card(format="sgb_predictions", predictions=str(preds), output=str(tmp_path / "nohw")))
    first = json.loads((tmp_path / "nohw" / "import_errors.jsonl").read_text().splitlines()[0])
    assert first["reason"] == "image_size" and first["line"] == 1 and first["file"] == str(preds)
    # sizes from the image files themselves (PNG headers named by key); a key without a file fails by name
    from PIL import Image

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for im in images[:2]:
        Image.new("RGB", (im.width, im.height)).save(image_dir / f"{im.key}.png")
    with pytest.raises(JobFailed, match="1 of 3 rows failed"):
        run_import(card(format="sgb_predictions", predictions=str(preds), images=str(image_dir),
                        output=str(tmp_path / "sized"), tags="langboat"))
    rows = features(tmp_path / "sized")
    for im in images[:2]:
        assert_image(rows[str(im.key)], im, TagVocabulary.named("langboat"))
    error = json.loads((tmp_path / "sized" / "import_errors.jsonl").read_text().splitlines()[0])
    assert error["reason"] == "image_size" and f"{images[2].key}.<jpg" in error["error"]


def test_vinvl_caption_split_features_texts_references(tmp_path: Path) -> None:
    images = make_images(4)
    spec = write_caption_dir(tmp_path / "coco_caption", "val", images)
    out = tmp_path / "out"
    result = run_import(card(format="vinvl_caption", yaml=str(spec), output=str(out)))
    rows = features(out)
    for im in images:
        assert_image(rows[str(im.key)], im)
    rows = texts(out)
    assert len(rows) == 20 and {r["split"] for r in rows} == {"val"} and rows[0] == {
        "image_id": "100", "text": images[0].captions[0], "kind": "caption", "split": "val"}
    assert (out / "references_val.json").read_bytes() == (tmp_path / "coco_caption" /
                                                          "val_caption_coco_format.json").read_bytes()
    assert result["failed"] == {} and result["read"] == {"features": 4, "text": 20}
    train = write_caption_dir(tmp_path / "coco_caption", "train", make_images(3, seed=5)[:2])  # ids 100, 101 again
    both = run_import(card(format="vinvl_caption", yaml=str(train), more_yamls=[str(spec)], output=str(tmp_path / "b"),
                           max_error_fraction=0.5))
    assert both["splits"] == {"train": {"references": "references_train.json"},
                              "val": {"references": "references_val.json"}}
    assert both["failed_by_reason"] == {"duplicate_id": 2}  # an image in two splits is reported, not merged


@pytest.mark.parametrize("oscar_v1", [False, True], ids=["features_tsv", "oscar_v1_pt"])
def test_vinvl_retrieval_dir_int_keys_join_string_keys(tmp_path: Path, oscar_v1: bool) -> None:
    images = make_images(4)
    write_retrieval_dir(tmp_path / "coco_ir", "minival", images, oscar_v1=oscar_v1)
    out = tmp_path / "out"
    extra = {"img_keys": str(tmp_path / "coco_ir" / "minival_img_keys_1k.pt")} if oscar_v1 else {}
    result = run_import(card(format="vinvl_retrieval", dir=str(tmp_path / "coco_ir"), split="minival",
                             output=str(out), **extra))
    assert result["failed"] == {}, result["error_examples"]
    rows = features(out)  # features keyed by int (.pt) or by the tsv's string key: the same ids
    assert sorted(rows) == ["100", "101", "102", "103"]
    for i, im in enumerate(images):
        if oscar_v1 and i % 2 == 0:  # a tag-string label: regions kept, the string is the tag
            np.testing.assert_array_equal(np.asarray(rows[str(im.key)]["features"], np.float32), im.vectors)
            assert rows[str(im.key)]["tags"] == [" ".join(im.classes)] and rows[str(im.key)]["labels"] == []
        else:
            assert_image(rows[str(im.key)], im)
    text = texts(out)
    assert [(r["image_id"], r["caption_index"]) for r in text[:6]] == [("100", j) for j in range(5)] + [("101", 0)]
    assert (out / "eval_image_keys.txt").read_text().split() == ["100", "101", "102", "103"]
    candidates = json.loads((out / "eval_candidates.json").read_text())
    assert candidates["103"] == [["103", 0], ["100", 1], ["101", 2], ["102", 3]]


def test_retrieval_id_collision_int_vs_str_is_one_image(tmp_path: Path) -> None:
    images = make_images(2)
    write_retrieval_dir(tmp_path / "ir", "test", images)
    torch.save({100: ["a"], "100": ["b"], 101: ["c"]}, tmp_path / "ir" / "test_captions.pt")
    out = tmp_path / "out"
    result = run_import(card(format="vinvl_retrieval", dir=str(tmp_path / "ir"), split="test", output=str(out),
                             max_error_fraction=0.5))
    assert result["failed_by_reason"] == {"duplicate_id": 1}
    assert [(r["image_id"], r["text"]) for r in texts(out)] == [("100", "a"), ("101", "c")]


def test_pt_needing_a_full_unpickle_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    images = make_images(1)
    write_retrieval_dir(tmp_path / "ir", "test", images)
    torch.save({100: Payload()}, tmp_path / "ir" / "test_captions.pt")
    with pytest.raises(ConfigError, match="refused: torch.load\\(weights_only=True\\)"):
        run_import(card(format="vinvl_retrieval", dir=str(tmp_path / "ir"), split="test", output=str(tmp_path / "o")))
    assert not (tmp_path / "pwned").exists()


def test_oscarplus_corpus_text_b_from_gt_tags_and_qa_answers(tmp_path: Path) -> None:
    images = make_images(4)
    spec = write_oscarplus_corpus(tmp_path / "corpus", tmp_path / "data", images)
    out = tmp_path / "out"
    result = run_import(card(format="oscarplus_corpus", yaml=str(spec), data_dir=str(tmp_path / "data"),
                             output=str(out)))
    assert result["failed"] == {} and result["kinds"] == {"caption": 4, "question": 2}
    rows = texts(out)
    assert rows[0] == {"image_id": "coco_100", "text": images[0].captions[0], "text_b": "男人 桌子",
                       "text_b_source": "gt_tags", "kind": "caption", "split": "train", "dataset": "coco"}
    assert rows[-1]["text_b"] == "狗 草地" and rows[-1]["text_b_source"] == "qa_answers"
    assert rows[-1]["kind"] == "question" and rows[-1]["image_id"] == "gqa_103"
    assert sorted(features(out)) == ["coco_100", "coco_101", "gqa_102", "gqa_103"]
    assert_image(features(out)["gqa_102"], images[2])
    # use_gtlabels false: text_b from the detector objects
    run_import(card(format="oscarplus_corpus", yaml=str(spec), use_gtlabels=False, output=str(tmp_path / "o2")))
    first = texts(tmp_path / "o2")[0]
    assert first["text_b"] == " ".join(TagVocabulary.default().translate(images[0].classes).tags)
    assert first["text_b_source"] == "tags" and not (tmp_path / "o2" / "features").exists()


def test_aic_icc_ids_match_extraction_ids(tmp_path: Path) -> None:
    images = make_images(3, int_keys=False)
    path = write_aic_annotations(tmp_path / "caption_validation_annotations_20170910.json", images)
    out = tmp_path / "out"
    result = run_import(card(format="aic_icc", annotations=str(path), split="val", output=str(out)))
    rows = texts(out)
    assert len(rows) == 15 and rows[0] == {"image_id": "img000", "text": images[0].captions[0], "kind": "caption",
                                           "split": "val"}
    assert result["images"] == {"val": 3} and result["written"] == {"text": 15}
    train = write_aic_annotations(tmp_path / "caption_train_annotations_20170902.json", make_images(2, seed=1))
    both = run_import(card(format="aic_icc", annotations=str(train), split="train", output=str(tmp_path / "both"),
                           more_annotations={"val": str(path)}, image_id_prefix="aic/"))
    assert both["images"] == {"train": 2, "val": 3}
    assert [(r["split"], r["image_id"]) for r in texts(tmp_path / "both")][9:11] == [("train", "aic/101"),
                                                                                     ("val", "aic/img000")]


def test_corrupted_rows_are_counted_with_file_and_line(tmp_path: Path) -> None:
    images = make_images(4, int_keys=False)
    d = tmp_path / "tsv"
    write_vinvl_features(d, images[:3])
    good = (d / "features.tsv").read_text().splitlines()
    bad = [
        good[0],
        "img001\t2\t###not-base64###",  # bad base64
        f"img002\t3\t{b64(np.zeros((2, 2054)))}",  # 2 vectors, num_boxes 3
        f"img003\t{len(images[3].classes)}\t{b64(images[3].vectors)}",  # no label row
        "img004\t1",  # missing column
    ]
    (d / "features.tsv").write_text("\n".join(bad) + "\n")
    out = tmp_path / "out"
    with pytest.raises(JobFailed, match="4 of 5 rows failed"):
        run_import(card(format="vinvl", features=str(d / "features.tsv"), labels=str(d / "predictions.tsv"),
                        output=str(out)))
    s = summary(out)
    assert s["failed_by_reason"] == {"base64": 1, "feature_length": 1, "no_labels": 1, "tsv_columns": 1}
    assert s["written"] == {"features": 1} and len(features(out)) == 1
    errors = [json.loads(x) for x in (out / "import_errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"]) for e in errors] == [(2, "base64"), (3, "feature_length"), (4, "no_labels"),
                                                          (5, "tsv_columns")]
    # the same input under a lenient max_error_fraction: exit 0, the same counts
    ok = run_import(card(format="vinvl", features=str(d / "features.tsv"), labels=str(d / "predictions.tsv"),
                         output=str(tmp_path / "ok"), max_error_fraction=0.9))
    assert ok["failed"] == {"features": 4}


def test_broken_json_captions_and_ids_without_features(tmp_path: Path) -> None:
    images = make_images(3)
    spec = write_caption_dir(tmp_path / "cap", "train", images[:2])
    caption_json = tmp_path / "cap" / "train_caption.json"
    rows = json.loads(caption_json.read_text())
    rows.append({"image_id": "102", "caption": "没有特征的图。"})  # image without features
    text = json.dumps(rows, ensure_ascii=False, indent=1)
    written = text[: text.rindex("}")] + ', "caption": }\n]'  # last element broken
    caption_json.write_text(written)
    bad_line = next(n for n, x in enumerate(written.splitlines(), start=1) if '"caption": }' in x)
    out = tmp_path / "out"
    result = run_import(card(format="vinvl_caption", yaml=str(spec), output=str(out), max_error_fraction=0.2))
    assert result["failed_by_reason"] == {"json": 1}
    assert result["written"]["text"] == 10
    broken = [json.loads(x) for x in (out / "import_errors.jsonl").read_text().splitlines()][0]
    assert "broken json" in broken["error"] and f"line {bad_line}:" in broken["error"]
    rows[-1]["caption"] = "没有特征的图。"
    caption_json.write_text(json.dumps(rows, ensure_ascii=False))
    result = run_import(card(format="vinvl_caption", yaml=str(spec), output=str(tmp_path / "o2"),
                             max_error_fraction=0.2))
    assert result["failed_by_reason"] == {"no_features": 1}


def test_json_array_streams_across_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mengzi_ray.features.oscar_import.common as common

    monkeypatch.setattr(common, "JSON_CHUNK_CHARS", 7)
    values = [{"a": "长文本" * 5, "b": [1, 2, {"c": None}]}, 3, "x,]", []]
    path = tmp_path / "a.json"
    path.write_text("[\n" + ",\n".join(json.dumps(v, ensure_ascii=False) for v in values) + "\n]\n")
    assert list(json_array(str(path))) == [(2, values[0]), (3, 3), (4, "x,]"), (5, [])]


def test_tsv_label_files_in_any_order_and_duplicate_keys(tmp_path: Path) -> None:
    images = make_images(3, int_keys=False)
    d = tmp_path / "tsv"
    write_vinvl_features(d, images)
    lines = (d / "predictions.tsv").read_text().splitlines()
    write_tsv(d / "predictions.tsv", [x.split("\t") for x in [lines[2], lines[0], lines[1], lines[0]]])
    result = run_import(card(format="vinvl", features=str(d / "features.tsv"), labels=str(d / "predictions.tsv"),
                             output=str(tmp_path / "o"), max_error_fraction=0.5))
    assert result["failed_by_reason"] == {"duplicate_id": 1} and result["written"] == {"features": 3}
    for im in images:
        assert_image(features(tmp_path / "o")[str(im.key)], im)


def test_a_re_import_replaces_the_previous_outputs_whole(tmp_path: Path) -> None:
    images = make_images(4, int_keys=False)
    preds, hw = write_sgb_predictions(tmp_path / "sgb", images)
    out = tmp_path / "out"
    run_import(card(format="sgb_predictions", predictions=str(preds), hw=str(hw), output=str(out)))
    (out / "text.jsonl").write_text('{"stale": true}\n')  # left by an earlier import of another format
    (out / "features" / "part-00099.parquet").write_bytes(b"a torn part of an earlier run")
    fewer, hw2 = write_sgb_predictions(tmp_path / "sgb2", images[:2])
    run_import(card(format="sgb_predictions", predictions=str(fewer), hw=str(hw2), output=str(out)))
    assert sorted(features(out)) == sorted(str(im.key) for im in images[:2])  # nothing of the first import left
    assert not (out / "text.jsonl").exists() and not (out / "_import_staging").exists()
    assert sorted(p.name for p in (out / "features").iterdir()) == ["part-00000.parquet"]
