"""Smaller reliability fixes: one gradient collective per SCST step, a load test that counts non-JSON answers,
plotting that leaves pyplot's backend alone, and an S3 endpoint without a scheme."""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mengzi_ray import storage


def test_gradients_are_averaged_in_one_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from mengzi_ray.training.loop import _average_gradients

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model(torch.ones(1, 3)).sum().backward()
        before = [p.grad.clone() for p in model.parameters()]
        calls = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(t.numel()) or real(t, *a, **k))
        _average_gradients(model, world=2)  # a world of 2 whose other rank sent zeros: every gradient halves
        assert calls == [sum(p.numel() for p in model.parameters())]  # one flat buffer, not one per parameter
        for grad, old in zip((p.grad for p in model.parameters()), before):
            torch.testing.assert_close(grad, old / 2)
    finally:
        dist.destroy_process_group()


def test_a_200_that_is_not_json_is_counted_not_lost() -> None:
    from mengzi_ray.serving.loadtest import run_load

    class NotJson(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["content-length"]))
            body = b"<html>proxy error page</html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            """No per-request lines on stderr."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotJson)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        report = run_load(f"http://127.0.0.1:{server.server_port}/v1/x", {"a": 1}, total=6, concurrency=2)
    finally:
        server.shutdown()
    assert report.errors == {"bad JSON": 6} and report.ok == 0


def test_writing_training_plots_leaves_the_pyplot_backend_alone(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import matplotlib; matplotlib.use('svg'); from pathlib import Path; "
        "from mengzi_ray.training.report import write_metrics; "
        f"out = write_metrics([{{'step': 1, 'train_loss': 2.0, 'val_cider': 0.1}}], Path({str(tmp_path)!r})); "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); print(sorted(p.name for p in out))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['loss.png', 'metrics.jsonl', 'validation.png']"
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_an_endpoint_without_a_scheme_is_https_with_its_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.internal:9000")
    assert storage._s3_endpoint() == ("https", "minio.internal:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")
    assert storage._s3_endpoint() == ("http", "127.0.0.1:9000")
