"""s3:// model dirs through an S3-compatible server on 127.0.0.1 (moto), reached via AWS_ENDPOINT_URL."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from mengzi_ray import storage
from mengzi_ray.modeling import OscarForRetrieval
from tests.conftest import tiny_config
from tests.unit.test_modeling_forward import batch


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    try:
        yield endpoint
    finally:
        server.stop()


def test_model_dir_round_trip_through_s3(tmp_path: Path, tiny_vocab_file: Path, s3_endpoint: str) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mengzi-models")
    model = OscarForRetrieval(tiny_config()).eval()
    local = model.save_pretrained(tmp_path / "local", vocab_file=tiny_vocab_file)
    storage.upload_dir(local, "s3://mengzi-models/retrieval/v1")
    loaded = OscarForRetrieval.from_pretrained("s3://mengzi-models/retrieval/v1")
    inputs = batch(loaded.config)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="s3://mengzi-models/nothing-here: no such directory"):
        OscarForRetrieval.from_pretrained("s3://mengzi-models/nothing-here")
