"""Model dirs: original Oscar layout in (pytorch_model.bin, weights_only), safetensors out, strict key checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mengzi_ray.modeling import OscarForCaptioning, OscarForPretraining, OscarForRetrieval
from tests.conftest import tiny_config
from tests.unit.test_modeling_forward import batch

# microsoft/Oscar `oscar/modeling/modeling_bert.py` `BertImgModel`, written out by hand for a 1-layer model with image
# LayerNorm.
ORIGINAL_TRUNK_KEYS = {
    "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias",
    *(f"bert.encoder.layer.0.attention.self.{n}.{p}" for n in ("query", "key", "value") for p in ("weight", "bias")),
    *(f"bert.encoder.layer.0.{m}.{p}" for m in ("attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm") for p in ("weight", "bias")),
    "bert.pooler.dense.weight", "bert.pooler.dense.bias",
    "bert.img_embedding.weight", "bert.img_embedding.bias", "bert.LayerNorm.weight", "bert.LayerNorm.bias",
}
MLM_KEYS = {
    "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias", "cls.predictions.decoder.weight",
}


def original_dir(tmp_path: Path, model, vocab_file: Path, config_extra: dict | None = None, tf_names: bool = False) -> Path:
    """Write `model` the way the original code saves: config.json with 0/1 flags, pytorch_model.bin, vocab.txt."""
    out = tmp_path / "original"
    out.mkdir()
    cfg = model.config.to_dict()
    for key in ("max_seq_a_length", "max_seq_length", "max_img_seq_length", "add_od_labels"):
        cfg.pop(key)  # the original keeps these in training_args.bin, not config.json
    cfg["use_img_layernorm"] = int(cfg["use_img_layernorm"])
    cfg.update({"architectures": ["BertForMaskedLM"], "output_past": True, **(config_extra or {})})
    (out / "config.json").write_text(json.dumps(cfg))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if tf_names:
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    torch.save(state, out / "pytorch_model.bin")
    shutil.copy(vocab_file, out / "vocab.txt")
    return out


def test_state_dict_keys_are_the_originals() -> None:
    cfg = tiny_config(num_hidden_layers=1)
    assert set(OscarForCaptioning(cfg).state_dict()) == ORIGINAL_TRUNK_KEYS | MLM_KEYS
    assert set(OscarForRetrieval(cfg).state_dict()) == ORIGINAL_TRUNK_KEYS | {"classifier.weight", "classifier.bias"}
    assert set(OscarForPretraining(cfg).state_dict()) == ORIGINAL_TRUNK_KEYS | MLM_KEYS | {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    no_ln = tiny_config(num_hidden_layers=1, use_img_layernorm=False)
    assert "bert.LayerNorm.weight" not in OscarForCaptioning(no_ln).state_dict()


@pytest.mark.parametrize("cls", [OscarForCaptioning, OscarForRetrieval, OscarForPretraining])
def test_original_dir_loads_exactly(tmp_path: Path, tiny_vocab_file: Path, cls) -> None:
    source = cls(tiny_config(num_contrast_classes=3)).eval()
    path = original_dir(tmp_path, source, tiny_vocab_file, tf_names=True)
    loaded = cls.from_pretrained(path)
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    assert loaded.config.use_img_layernorm is True and loaded.config.extra["output_past"] is True
    inputs = batch(loaded.config)
    torch.testing.assert_close(loaded(**inputs).logits, source(**inputs).logits, atol=0, rtol=0)


def test_safetensors_round_trip_keeps_ties_and_outputs(tmp_path: Path, tiny_vocab_file: Path) -> None:
    model = OscarForCaptioning(tiny_config(tie_weights=True)).eval()
    out = model.save_pretrained(tmp_path / "ours", vocab_file=tiny_vocab_file)
    assert sorted(p.name for p in out.iterdir()) == ["_COMPLETE", "config.json", "model.safetensors", "vocab.txt"]
    loaded = OscarForCaptioning.from_pretrained(out)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    inputs = batch(loaded.config, three_d=True)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert loaded.config == model.config


def test_pretraining_checkpoint_into_task_models(tmp_path: Path, tiny_vocab_file: Path) -> None:
    pre = OscarForPretraining(tiny_config(num_contrast_classes=3))
    path = pre.save_pretrained(tmp_path / "pre", vocab_file=tiny_vocab_file)
    cap = OscarForCaptioning.from_pretrained(path)
    assert sorted(cap.load_report.unexpected) == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    ret = OscarForRetrieval.from_pretrained(path)
    assert set(ret.load_report.missing) == {"classifier.weight", "classifier.bias"}
    assert all(k.startswith("cls.") for k in ret.load_report.unexpected)
    torch.testing.assert_close(ret.bert.img_embedding.weight, pre.bert.img_embedding.weight)
    two_way = OscarForPretraining.from_pretrained(path, num_contrast_classes=2)  # 3-way head → fresh 2-way
    assert sorted(two_way.load_report.mismatched) == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]


def test_bert_mlm_checkpoint_initialises_the_trunk(tmp_path: Path, tiny_vocab_file: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    cfg = tiny_config()
    bert = BertForMaskedLM(BertConfig(vocab_size=cfg.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    bert_dir = tmp_path / "mengzi-bert"
    bert.save_pretrained(bert_dir)
    shutil.copy(tiny_vocab_file, bert_dir / "vocab.txt")
    json_cfg = json.loads((bert_dir / "config.json").read_text())
    json_cfg.update(img_feature_dim=12, use_img_layernorm=1)
    (bert_dir / "config.json").write_text(json.dumps(json_cfg))
    with pytest.raises(ValueError, match="missing key bert.img_embedding"):
        OscarForCaptioning.from_pretrained(bert_dir)
    model = OscarForCaptioning.from_pretrained(bert_dir, from_bert=True)
    torch.testing.assert_close(model.bert.encoder.layer[1].output.dense.weight, bert.bert.encoder.layer[1].output.dense.weight)
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight)
    assert "bert.img_embedding.weight" in model.load_report.missing


def test_unexpected_key_is_an_error_naming_the_file(tmp_path: Path, tiny_vocab_file: Path) -> None:
    model = OscarForCaptioning(tiny_config())
    path = original_dir(tmp_path, model, tiny_vocab_file)
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(2)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: checkpoint does not fit OscarForCaptioning: unexpected key bert\.encoder\.layer\.9"):
        OscarForCaptioning.from_pretrained(path)


class NotAStateDict:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path, tiny_vocab_file: Path) -> None:
    model = OscarForCaptioning(tiny_config())
    path = original_dir(tmp_path, model, tiny_vocab_file)
    torch.save({"model": NotAStateDict()}, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a plain tensor state dict, refused to unpickle"):
        OscarForCaptioning.from_pretrained(path)
    torch.save({"step": 3}, path / "pytorch_model.bin")  # loads under weights_only but is not a state dict
    with pytest.raises(ValueError, match="expected a dict of parameter name"):
        OscarForCaptioning.from_pretrained(path)


def test_missing_vocab_or_weights_or_config(tmp_path: Path, tiny_vocab_file: Path) -> None:
    model = OscarForCaptioning(tiny_config())
    path = original_dir(tmp_path, model, tiny_vocab_file)
    (path / "vocab.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt: a model dir needs vocab\.txt"):
        OscarForCaptioning.from_pretrained(path)
    shutil.copy(tiny_vocab_file, path / "vocab.txt")
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        OscarForCaptioning.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        OscarForCaptioning.from_pretrained(path)
