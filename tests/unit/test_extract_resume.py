"""Extraction resume without Ray: torn parts are quarantined, transient errors are tried again, S3 reads retry,
and local entries that cannot be read stay inputs."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mengzi_ray.config import ConfigError
from mengzi_ray.features import extract, inputs
from mengzi_ray.features.card import InputSection
from mengzi_ray.features.extract import _errors_only, _to_retry, drop_error_rows, read_and_decode, scan_output
from mengzi_ray.features.schema import ERRORS_SCHEMA
from tests.unit.test_storage_s3 import s3_endpoint  # noqa: F401  (the moto fixture)


def _errors(rows: list[tuple[str, str]], job_id: str = "j") -> pa.Table:
    """An errors/ part as run_chunk writes it, for (image_id, stage) rows."""
    batch = pa.Table.from_pylist(
        [{"source": f"file:///{i}.png", "image_id": i, "stage": stage, "error": "E: x"} for i, stage in rows]
    )
    return _errors_only(batch, job_id)


def test_errors_carry_the_transient_flag_and_retry_failed_picks_them() -> None:
    table = _errors([("a", "read"), ("b", "decode"), ("c", "detect")])
    assert table.schema.equals(ERRORS_SCHEMA)
    assert table.column("transient").to_pylist() == [True, False, False]
    failed = {"a": "read", "b": "decode", "c": "detect"}
    assert (_to_retry(failed, "transient"), _to_retry(failed, "all"), _to_retry(failed, "none")) == (
        {"a"}, {"a", "b", "c"}, set()
    )


def test_torn_part_is_quarantined_and_its_rows_redone(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    (out / "errors").mkdir(parents=True)
    pq.write_table(_errors([("a", "read"), ("b", "decode")]), out / "errors" / "part-0.parquet")
    whole = pa.table({"image_id": ["c", "d"]})
    pq.write_table(whole, out / "features-good.parquet")
    (out / "features").mkdir()
    os.replace(out / "features-good.parquet", out / "features" / "good.parquet")
    data = (out / "features" / "good.parquet").read_bytes()
    (out / "features" / "torn.parquet").write_bytes(data[: len(data) // 2])  # a crash mid-write, before this fix
    assert extract.existing_ids(str(out)) == {"a", "b", "c", "d"}  # reports, moves nothing
    done, failed, torn = scan_output(str(out))
    assert done == {"c", "d"} and failed == {"a": "read", "b": "decode"}
    assert torn == [str(out / "features" / "torn.parquet")]
    assert (out / "quarantine" / "features" / "torn.parquet").read_bytes() == data[: len(data) // 2]
    assert pq.read_table(out / "features").num_rows == 2  # readers of features/ no longer trip over it


def test_dropping_retried_error_rows_rewrites_only_their_parts(tmp_path: Path) -> None:
    errors = tmp_path / "ds" / "errors"
    errors.mkdir(parents=True)
    pq.write_table(_errors([("a", "read"), ("b", "decode")]), errors / "p1.parquet")
    pq.write_table(_errors([("c", "read")]), errors / "p2.parquet")
    pq.write_table(_errors([("d", "detect")]), errors / "p3.parquet")
    before = (errors / "p3.parquet").stat().st_mtime_ns
    drop_error_rows(str(tmp_path / "ds"), {"a", "c"})
    assert sorted(p.name for p in errors.iterdir()) == ["p1.parquet", "p3.parquet"]
    assert pq.read_table(errors).column("image_id").to_pylist() == ["b", "d"]
    assert (errors / "p3.parquet").stat().st_mtime_ns == before
    assert not any((tmp_path / "ds" / "_staging").iterdir())


class FlakyFilesystem:
    """Wraps a real filesystem; the first `failures` opens raise the error an S3 throttle/timeout gives."""

    def __init__(self, fs: Any, failures: int) -> None:
        self.fs, self.failures, self.opens = fs, failures, 0

    def open_input_stream(self, path: str) -> Any:
        self.opens += 1
        if self.opens <= self.failures:
            raise OSError("When reading information for key 'x': AWS Error SLOW_DOWN (HTTP status code: 503)")
        return self.fs.open_input_stream(path)


def test_an_s3_read_failing_twice_then_succeeding_is_decoded(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="imgs")
    Image.new("RGB", (12, 9), (0, 200, 0)).save(tmp_path / "g.png")
    s3.upload_file(str(tmp_path / "g.png"), "imgs", "g.png")
    with pytest.raises(FileNotFoundError):  # a missing key is not retried (the backoff would take minutes)
        inputs.read_uri("s3://imgs/absent.png", attempts=3, backoff_s=60)
    real = inputs.uri_location
    flaky: dict[str, FlakyFilesystem] = {}

    def location(uri: str) -> tuple[Any, str]:
        fs, path = real(uri)
        flaky.setdefault(uri, FlakyFilesystem(fs, failures=2))
        return flaky[uri], path

    monkeypatch.setattr(inputs, "uri_location", location)
    monkeypatch.setattr(extract, "READ_ATTEMPTS", 3)
    row = {"source": "s3://imgs/g.png", "image_id": "g", "boxes_json": "", "labels_json": ""}
    out = read_and_decode(pa.Table.from_pylist([row]), max_pixels=10_000).to_pylist()
    assert flaky["s3://imgs/g.png"].opens == 3
    assert out[0]["stage"] == "" and (out[0]["width"], out[0]["height"]) == (12, 9)
    flaky.clear()
    monkeypatch.setattr(extract, "READ_ATTEMPTS", 2)  # one failure too many: a read error, marked transient
    failed = read_and_decode(pa.Table.from_pylist([row]), max_pixels=10_000)
    assert failed.column("stage").to_pylist() == ["read"] and "SLOW_DOWN" in failed.column("error")[0].as_py()


def test_a_dangling_symlink_is_an_input_with_a_read_error(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").symlink_to(tmp_path / "deleted.png")
    rows = inputs.list_inputs(InputSection(uri=str(tmp_path)))
    assert [r["image_id"] for r in rows] == ["broken", "ok"]
    out = read_and_decode(pa.Table.from_pylist(rows), max_pixels=10_000).to_pylist()
    assert [(r["image_id"], r["stage"]) for r in out] == [("broken", "read"), ("ok", "")]


class DeniedFilesystem:
    """The local filesystem, except that opening `denied` fails as pyarrow fails on EACCES (an OSError with errno
    13, which Python makes a PermissionError). This machine's tests run as root, which file modes do not stop."""

    def __init__(self, denied: str) -> None:
        self.fs, self.denied = pafs.LocalFileSystem(), denied

    def open_input_stream(self, path: str) -> Any:
        if path == self.denied:
            raise OSError(errno.EACCES, f"Failed to open local file '{path}'. Detail: [errno 13] Permission denied")
        return self.fs.open_input_stream(path)


def test_a_file_without_read_permission_is_a_permanent_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ok", "secret"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "secret.png").chmod(0o000)
    rows = inputs.list_inputs(InputSection(uri=str(tmp_path)))
    assert [r["image_id"] for r in rows] == ["ok", "secret"]  # listed, not dropped
    denied = DeniedFilesystem(str(tmp_path / "secret.png"))
    monkeypatch.setattr(inputs, "uri_location", lambda uri: (denied, inputs.unquote(inputs.urlparse(uri).path)))
    out = read_and_decode(pa.Table.from_pylist(rows), max_pixels=10_000)
    assert [(r["image_id"], r["stage"]) for r in out.to_pylist()] == [("ok", ""), ("secret", "access")]
    assert "Permission denied" in out.column("error")[1].as_py()
    errors = _errors_only(out, "job")
    assert errors.column("transient").to_pylist() == [False]  # a re-run would only repeat it
    assert _to_retry({"secret": "access"}, "transient") == set() and _to_retry({"secret": "access"}, "all") == {"secret"}


def test_a_directory_that_cannot_be_listed_stops_the_job_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "locked").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "locked" / "hidden.png")
    scandir = os.scandir

    def denying_scandir(path: Any = ".") -> Any:
        if str(path) == str(tmp_path / "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denying_scandir)
    with pytest.raises(ConfigError, match=f"cannot list {tmp_path / 'locked'}: Permission denied"):
        inputs.list_inputs(InputSection(uri=str(tmp_path)))
