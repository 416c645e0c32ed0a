"""The product as a cluster user runs it: `ray start --head` → `ray job submit` of the tiny extract, caption and
retrieval fine-tune and evaluate cards → `serve deploy serve/config.yaml` → an HTTP caption request answered
by the fine-tuned model → the head stopped by the PIDs this test started.

Step counts are cut with `--set` so the tier stays within CI's budget on 2 cores; what is checked is that each
job runs through `ray job submit` on a real head, writes its outputs where the card says, and that the deployed
service answers from the model the caption job exported.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from mengzi_ray.synthetic import write_synthetic_dataset

from cluster_harness import BIN, PROJECT_ROOT, RayHead, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("e2e") / "data", num_train=48, num_val=12, seed=3)


def train_overrides(ds, runs: Path, name: str, steps: int) -> list[str]:
    return [
        f"data.features={ds.features_path.parent}", f"data.text={ds.text_path}", f"run.storage_path={runs}",
        f"run.name={name}", f"schedule.max_steps={steps}", f"validation.every_steps={steps}",
        "data.max_val_images=8",
    ]


def sets(overrides: list[str]) -> list[str]:
    return [part for o in overrides for part in ("--set", o)]


def test_bringing_the_vinvl_detector_is_two_commands(ray_head: RayHead, synthetic, tmp_path: Path) -> None:
    """README "Bringing the VinVL detector": import-detector on released-format files (here a tiny random-weight
    maskrcnn_benchmark checkpoint the test writes), then the extract_vinvl card pointed at the dir, through
    `ray job submit` (the GPU actor resources cut to this CPU head). It runs before the Serve test below, whose
    deployed app holds 3.5 of the head's 4 CPUs."""
    import subprocess

    import pyarrow.parquet as pq
    import torch

    from mengzi_ray.features.card import DetectorSection
    from mengzi_ray.features.detectors.torchvision_c4 import build_network
    from vinvl_checkpoint import ATTRIBUTES, CLASSES, SEED_OVERRIDES, write_tiny_vinvl_files

    torch.manual_seed(0)
    shape = DetectorSection(depth=50, groups=2, width_per_group=4, num_classes=len(CLASSES) + 1,
                            allow_random_weights=True)
    files = write_tiny_vinvl_files(tmp_path / "released", build_network(shape, len(ATTRIBUTES) + 1))
    detector_dir, features = tmp_path / "vinvl_tiny", tmp_path / "vinvl_features"
    imported = subprocess.run(
        [str(BIN / "mengzi-ray"), "import-detector", "--weights", str(files["weights"]), "--labelmap",
         str(files["labelmap"]), "--config", str(files["config"]), "--out", str(detector_dir), *SEED_OVERRIDES],
        capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    ray_head.submit("mengzi-ray", "extract", "--config", "jobs/extract_vinvl.yaml", *sets([
        f"detector.model_dir={detector_dir}", f"input.uri={synthetic.images_dir / 'val'}", f"output={features}",
        "actors.num_gpus=0", "actors.num_cpus=1", "actors.max_size=1"]), timeout_s=600)
    summary = json.loads((features / "summary.json").read_text())
    assert summary["done"] == summary["inputs"] == synthetic.num_val and summary["failed_total"] == 0
    rows = pq.read_table(features / "features").to_pylist()
    assert all(3 <= len(r["boxes"]) <= 12 and set(r["labels"]) <= set(CLASSES) for r in rows)
    assert all(len(r["attribute_lists"]) == len(r["boxes"]) for r in rows)
    assert {r["detector"] for r in rows} == {rows[0]["detector"]} and rows[0]["detector"].startswith("torchvision_c4:")


def test_jobs_then_serve_deploy_then_http(ray_head: RayHead, synthetic, tmp_path: Path) -> None:
    ds = synthetic
    out = tmp_path
    runs = out / "runs"

    # 1. extraction over the image bucket: every input is in features/ or errors/
    extract = out / "extracted"
    ray_head.submit("mengzi-ray", "extract", "--config", "jobs/extract_tiny.yaml",
                    *sets([f"input.uri={ds.images_dir}", f"output={extract}", "actors.max_size=1"]), timeout_s=600)
    summary = json.loads((extract / "summary.json").read_text())
    assert summary["inputs"] == ds.num_train + ds.num_val
    assert summary["done"] == summary["inputs"] and summary["failed_total"] == 0

    # 2. caption and retrieval fine-tunes (2 gloo workers each), exported model dirs
    ray_head.submit("mengzi-ray", "finetune-caption", "--config", "jobs/caption_tiny.yaml",
                    *sets(train_overrides(ds, runs, "caption_e2e", 40)), timeout_s=600)
    caption_model = runs / "caption_e2e" / "model"
    assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in caption_model.iterdir()}
    ray_head.submit("mengzi-ray", "finetune-retrieval", "--config", "jobs/retrieval_tiny.yaml",
                    *sets(train_overrides(ds, runs, "retrieval_e2e", 20)), timeout_s=600)
    retrieval_model = runs / "retrieval_e2e" / "model"
    assert (retrieval_model / "model.safetensors").is_file()

    # 3. evaluation of the exported captioner
    evaluation = out / "eval"
    ray_head.submit("mengzi-ray", "evaluate", "--config", "jobs/eval_caption_tiny.yaml",
                    *sets([f"model_dir={caption_model}", f"features={ds.features_path.parent}",
                           f"references={ds.text_path}", f"output_dir={evaluation}", "actors.num_actors=1",
                           "caption.num_examples=2"]), timeout_s=600)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["task"] == "caption" and metrics["num_images"] == ds.num_val

    # 4. serve deploy of serve/config.yaml, pointed at this run's outputs
    port = free_port()
    config = yaml.safe_load((PROJECT_ROOT / "serve" / "config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    args = config["applications"][0]["args"]
    args["captioner"]["model_dir"] = str(caption_model)
    args["retriever"]["model_dir"] = str(retrieval_model)
    args["retriever"]["gallery"].update(features=str(ds.features_path.parent), texts=str(ds.text_path))
    for section in ("ingress", "detector", "captioner", "retriever"):
        args[section].update(min_replicas=1, max_replicas=1)
    deploy_file = out / "serve.yaml"
    deploy_file.write_text(yaml.safe_dump(config, allow_unicode=True))
    deployed = ray_head.run(str(BIN / "serve"), "deploy", str(deploy_file), "--address", ray_head.dashboard_url)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    base = f"http://127.0.0.1:{port}"
    image = Image.open(ds.images_dir / "val" / "000000.png").convert("RGB")
    png = io.BytesIO()
    image.save(png, format="PNG")
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=base, timeout=60) as client:
        while True:  # bounded: until the app answers or the deadline passes
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            status = ray_head.run(str(BIN / "serve"), "status", "--address", ray_head.dashboard_url)
            if "DEPLOY_FAILED" in status.stdout or time.monotonic() > deadline:
                raise AssertionError(f"serve app not healthy:\n{status.stdout}{status.stderr}")
            time.sleep(3)
        models = client.get("/v1/models").json()
        # serve/config.yaml is the anonymous local demo: it answers, but does not reveal where the models live
        assert models["captioner"]["hidden_size"] > 0 and str(caption_model) not in json.dumps(models)
        answer = client.post("/v1/caption", files={"image": ("val0.png", png.getvalue(), "image/png")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["captions"] and isinstance(body["captions"][0]["text"], str) and body["captions"][0]["text"]
        bad = client.post("/v1/caption", files={"image": ("x.png", b"not an image", "image/png")})
        assert 400 <= bad.status_code < 500 and "error" in bad.text.lower()


def test_a_failing_job_exits_non_zero_with_its_log_tail(ray_head: RayHead, tmp_path: Path) -> None:
    card = tmp_path / "bad.yaml"
    card.write_text("input: {uri: /nonexistent/images}\noutput: /tmp/never\ndetector: {backend: given_boxes, given_boxes_featurizer: pixel_crops}\n")
    with pytest.raises(AssertionError) as info:
        ray_head.submit("mengzi-ray", "extract", "--config", str(card), timeout_s=300)
    assert "exited" in str(info.value) and "/nonexistent/images" in str(info.value)

