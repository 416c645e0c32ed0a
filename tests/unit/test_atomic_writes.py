"""Crash-safe writes: a process killed mid-write leaves the old file or dir whole (or none), never a torn one, and
readers refuse or skip what a crash left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any, Callable

import boto3
import pytest

from mengzi_ray import storage
from mengzi_ray.modeling import OscarForRetrieval
from tests.conftest import tiny_config
from tests.unit.test_storage_s3 import s3_endpoint  # noqa: F401  (the moto fixture)


def _die(*_: Any, **__: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def killed_during(target: Callable[[], None], patch: tuple[Any, str, Callable[..., Any]]) -> None:
    """Run `target` in a forked child in which `patch` (object, attribute, replacement) is applied; the child is
    expected to die by SIGKILL inside the patched call."""

    def child() -> None:
        owner, name, replacement = patch
        setattr(owner, name, replacement)
        target()
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL, f"the child was not killed mid-write (exit {process.exitcode})"


def test_a_file_killed_mid_write_keeps_its_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state" / "summary.json"
    storage.write_json(str(target), {"version": 1})
    killed_during(lambda: storage.write_json(str(target), {"version": 2, "pad": "x" * 100_000}), (os, "fsync", _die))
    assert json.loads(target.read_text()) == {"version": 1}
    storage.write_json(str(target), {"version": 3})
    assert json.loads(target.read_text()) == {"version": 3}
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".")] == ["summary.json"]


def _model_dir(tmp_path: Path, vocab: Path, name: str, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    return OscarForRetrieval(tiny_config()).save_pretrained(tmp_path / name, vocab_file=vocab)


def test_a_model_export_killed_mid_publish_leaves_the_old_model_loadable(tmp_path: Path, tiny_vocab_file: Path) -> None:
    import torch

    old, new = _model_dir(tmp_path, tiny_vocab_file, "old", 1), _model_dir(tmp_path, tiny_vocab_file, "new", 2)
    published = tmp_path / "run" / "model"
    storage.publish_dir(old, str(published))
    killed_during(lambda: storage.publish_dir(new, str(published)), (storage, "mark_complete", _die))
    loaded = OscarForRetrieval.from_pretrained(published)
    reference = OscarForRetrieval.from_pretrained(old)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    storage.publish_dir(new, str(published))
    # the killed run's staged copy is a dot-named sibling, never read as the model; the next publish does not mix it in
    assert [p.name for p in published.parent.iterdir() if not p.name.startswith(".")] == ["model"]  # no temp or old dirs remain
    assert (published / "config.json").read_bytes() == (new / "config.json").read_bytes()


def test_from_pretrained_refuses_an_unfinished_or_mixed_export(tmp_path: Path, tiny_vocab_file: Path) -> None:
    from safetensors.torch import save_file

    model = OscarForRetrieval(tiny_config())
    crashed = tmp_path / "crashed"
    killed_during(lambda: model.save_pretrained(crashed, vocab_file=tiny_vocab_file), (storage, "mark_complete", _die))
    assert (crashed / "model.safetensors").is_file() and not (crashed / storage.COMPLETE_MARKER).exists()
    with pytest.raises(ValueError, match=r"crashed: no _COMPLETE marker, so the export that wrote this dir did not finish"):
        OscarForRetrieval.from_pretrained(crashed)
    mixed = model.save_pretrained(tmp_path / "mixed", vocab_file=tiny_vocab_file)
    save_file({"x": __import__("torch").zeros(3)}, str(mixed / "model.safetensors"))  # new weights, old marker
    with pytest.raises(ValueError, match=r"mixed: files \['model.safetensors'\] are missing or differ"):
        OscarForRetrieval.from_pretrained(mixed)


def test_s3_export_is_refused_until_its_marker_is_written(tmp_path: Path, tiny_vocab_file: Path, s3_endpoint: str) -> None:  # noqa: F811
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    old, new = _model_dir(tmp_path, tiny_vocab_file, "old", 1), _model_dir(tmp_path, tiny_vocab_file, "new", 2)
    uri = "s3://models/run/model"
    storage.publish_dir(old, uri)
    calls = {"n": 0}
    real = storage.write_bytes

    def die_before_vocab(target: str, data: bytes) -> None:  # calls: the local marker, config.json, weights, vocab
        calls["n"] += 1
        if calls["n"] == 4:
            _die()
        real(target, data)

    storage._s3_filesystem.cache_clear()  # the child must not reuse the parent's S3 client across fork
    killed_during(lambda: storage.publish_dir(new, uri), (storage, "write_bytes", die_before_vocab))
    with pytest.raises(ValueError, match="no _COMPLETE marker"):
        OscarForRetrieval.from_pretrained(uri)
    storage.publish_dir(new, uri)
    OscarForRetrieval.from_pretrained(uri)
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="models")["Contents"]]
    assert sorted(k.rsplit("/", 1)[-1] for k in keys if not k.endswith("/")) == sorted(
        ["_COMPLETE", "config.json", "model.safetensors", "vocab.txt"]
    )


def test_s3_filesystems_are_cached_per_endpoint_and_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    a, _ = storage.filesystem_for("s3://one/x.png")
    b, _ = storage.filesystem_for("s3://one/y/z.png")
    c, _ = storage.filesystem_for("s3://two/x.png")
    assert a is b and a is not c
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.internal:9000")  # no scheme: https, host and port kept
    fs, path = storage.filesystem_for("s3://one/x.png")
    assert path == "one/x.png" and fs is not a


def test_a_torn_sweep_record_is_reported_and_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A sweep_card.json torn by a crash of an older, non-atomic write is skipped with a warning (the caller writes it
    anew) instead of failing the resume with a bare JSONDecodeError."""
    import pyarrow.fs as pafs

    from mengzi_ray.training.tune import _read_record

    record = tmp_path / "sweep_card.json"
    record.write_text('{"tune": {"run": ')
    assert _read_record(pafs.LocalFileSystem(), str(record)) is None
    assert "is torn" in caplog.text


def test_s3_dirs_download_once_into_a_per_uri_cache(
    tmp_path: Path, tiny_vocab_file: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv("MENGZI_RAY_CACHE", str(tmp_path / "cache"))
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    old, new = _model_dir(tmp_path, tiny_vocab_file, "old", 1), _model_dir(tmp_path, tiny_vocab_file, "new", 2)
    storage.publish_dir(old, "s3://models/m")
    first = storage.download_dir("s3://models/m")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert storage.download_dir("s3://models/m/") == first  # reused: no second copy, nothing left in /tmp
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    storage.publish_dir(new, "s3://models/m")  # a new export under the same URI: its marker changed
    again = storage.download_dir("s3://models/m")
    assert again == first and (again / "config.json").read_bytes() == (new / "config.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]
    OscarForRetrieval.from_pretrained("s3://models/m")
