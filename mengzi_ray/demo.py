"""`make demo`: the whole product on the embedded local Ray, with tiny models and synthetic data, in minutes.

Each stage is the same job function that `ray job submit -- mengzi-ray <command> --config jobs/<card>` runs on a
cluster, fed the tiny cards in `jobs/` with their paths pointed under `out_dir`:

  synthetic set → extract (Ray Data, detector actors) → pretrain → fine-tune caption → fine-tune retrieval
  (Ray Train, 2 workers each) → evaluate (Ray Data model actors) → serve (Ray Serve) → caption over HTTP.

The detector of the tiny extract card has random weights (its features mean nothing); the training stages read
the synthetic set's given-box region features instead, which carry the colours, shapes and positions a caption
talks about. That is said in the banner, not hidden.

Console (console.py): Ray's own progress bars and worker output are off (worker logs stay in the Ray session's
log dir, named at the end); each stage has one live line while it runs and one result line when it ends, and the
run ends with a table of every stage's time and result.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from mengzi_ray.config import COMMANDS, load_card
from mengzi_ray.console import StageProgress, format_seconds, quiet_ray
from mengzi_ray.synthetic import write_synthetic_dataset
from mengzi_ray.ray_runtime import start_local_ray

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"
STAGES = 8


def banner(index: int, text: str) -> None:
    print(f"\n=== [{index}/{STAGES}] {text} " + "=" * max(0, 64 - len(text)), flush=True)


class Stages:
    """Runs the demo's stages, each under one StageProgress, and keeps (stage, seconds, result) for the summary."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def run_job(self, command: str, card_file: str, overrides: list[str], result: Any = None) -> dict[str, Any]:
        """Validate a tiny card with `overrides` and run its job in this driver; prints the `mengzi-ray` equivalent.
        `result(summary) -> str` makes the stage's result line."""
        print(f"$ mengzi-ray {command} --config jobs/{card_file} " + " ".join(f"--set {o}" for o in overrides), flush=True)
        card = load_card(COMMANDS[command].card_class(), JOBS_DIR / card_file, overrides)
        with StageProgress(command) as progress:
            summary = COMMANDS[command].job_function()(card)
            progress.done(result(summary) if result else "")
        self.rows.append((command, progress.seconds, progress.result))
        return summary

    def table(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        lines = [f"  {'stage':<{width}}  {'time':>5}  result"]
        lines += [f"  {name:<{width}}  {format_seconds(seconds):>5}  {result}" for name, seconds, result in self.rows]
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_ask(out: Path, data_dir: Path, caption_model: str, retrieval_model: str, sample_id: str) -> dict[str, Any]:
    """Deploy serve/config.yaml's app (paths pointed at this demo's outputs) on 127.0.0.1 and ask it twice:
    an image upload (detector → captioner) and a Chinese text search; returns both answers."""
    import yaml
    from ray import serve

    from mengzi_ray.serving.app import compose_app
    from mengzi_ray.serving.settings import ServeAppConfig

    config = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))
    args = config["applications"][0]["args"]
    args["captioner"]["model_dir"] = caption_model
    args["retriever"]["model_dir"] = retrieval_model
    args["retriever"]["gallery"].update(
        features=str(data_dir / "features"), texts=str(data_dir / "text.jsonl"), images_root=str(data_dir / "images")
    )
    for section in ("ingress", "detector", "captioner", "retriever"):
        args[section].update(min_replicas=1, max_replicas=1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose_app(ServeAppConfig.model_validate(args)), name="mengzi", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    image_path = data_dir / "images" / f"{sample_id}.png"
    with httpx.Client(base_url=base, timeout=120) as client:
        caption = client.post("/v1/caption", files={"image": (image_path.name, image_path.read_bytes(), "image/png")})
        search = client.post("/v1/search/images", json={"text": "红色的圆形", "k": 3})
    answers = {"url": base, "image": str(image_path), "caption": caption.json(), "search": search.json()}
    (out / "http_answers.json").write_text(json.dumps(answers, ensure_ascii=False, indent=2), encoding="utf-8")
    serve.shutdown()
    return answers


def _val_metrics(summary: dict[str, Any]) -> str:
    """A training summary's final validation metrics, e.g. `step 800, val_cider 2.31, val_loss 1.92`."""
    final = summary.get("final_metrics", {})
    shown = [f"{k} {v:.3f}" for k, v in final.items() if k.startswith("val_") and isinstance(v, (int, float))]
    return ", ".join([f"step {summary.get('steps', 0)}"] + shown[:3])


CAPTION_LR = 2.0e-3
"""The caption stage's learning rate. It starts from the pretrained trunk and has 800 steps. Over three seeds, the
final val CIDEr (char, 40 images) was 1.81 / 2.10 / 2.04 at the card's 5e-4, 1.94 / 2.44 / 2.33 at 1e-3, and
2.29 / 2.14 / 2.59 at 2e-3. More steps (1000) or twice the train images did not help."""


def run_demo(out_dir: str | Path, *, fast: bool = False) -> tuple[dict[str, Any], Stages]:
    """Run every stage under `out_dir` on the embedded Ray; returns what each stage reported and the stage table.

    fast: fewer training steps (a smoke run of the same code, not a learning run).
    """
    out = Path(out_dir).resolve()
    caption_steps, pretrain_steps, retrieval_steps = (60, 20, 20) if fast else (800, 100, 150)
    ray_section = load_card(COMMANDS["extract"].card_class(), JOBS_DIR / "extract_tiny.yaml").ray
    context = start_local_ray(ray_section.num_cpus, include_dashboard=False, **quiet_ray())
    results: dict[str, Any] = {"ray_logs": str(Path(context.address_info["session_dir"]) / "logs")}
    stages = Stages()

    banner(1, f"synthetic Chinese image-caption set → {out / 'data'}")
    with StageProgress("synthetic") as progress:
        ds = write_synthetic_dataset(out / "data", num_train=200, num_val=40, seed=0)
        progress.done(f"{ds.num_train} train + {ds.num_val} val images, {ds.num_captions} captions; "
                      f"given-box region features in {ds.features_path}")
    stages.rows.append(("synthetic", progress.seconds, f"{ds.num_train} + {ds.num_val} images"))

    banner(2, "extract: Ray Data → detector actors (random-init tiny detector) → features/ + errors/")
    results["extract"] = stages.run_job(
        "extract", "extract_tiny.yaml", [f"input.uri={ds.images_dir}", f"output={out / 'extracted'}"],
        lambda s: f"{s['inputs']} images: {s['done']} extracted, {s['failed_total']} failed, {s['images_per_s']:.1f} "
                  "images/s (random detector weights: training below reads the given-box features)")

    data = [f"data.features={ds.features_path.parent}", f"data.text={ds.text_path}", f"run.storage_path={out / 'runs'}"]
    banner(3, f"pretrain: Ray Train, 2 workers, {pretrain_steps} steps (MLM + 3-way image-text match)")
    results["pretrain"] = stages.run_job("pretrain", "pretrain_tiny.yaml", data + [
        "run.name=pretrain", f"schedule.max_steps={pretrain_steps}", f"validation.every_steps={pretrain_steps}"],
        _val_metrics)

    banner(4, f"fine-tune captioning from the pretrained model: {caption_steps} steps")
    results["caption"] = stages.run_job("finetune-caption", "caption_tiny.yaml", data + [
        "run.name=caption", f"schedule.max_steps={caption_steps}", f"validation.every_steps={max(caption_steps // 4, 1)}",
        "model.tiny=null", f"model.init_from={results['pretrain']['model_dir']}",
        f"optim.learning_rate={CAPTION_LR}"], _val_metrics)

    banner(5, f"fine-tune retrieval: {retrieval_steps} steps")
    results["retrieval"] = stages.run_job("finetune-retrieval", "retrieval_tiny.yaml", data + [
        "run.name=retrieval", f"schedule.max_steps={retrieval_steps}", f"validation.every_steps={retrieval_steps}"],
        _val_metrics)

    banner(6, "evaluate the captioner on val: Ray Data model actors, beam 5, BLEU/METEOR/ROUGE-L/CIDEr")
    results["evaluate"] = stages.run_job("evaluate", "eval_caption_tiny.yaml", [
        f"model_dir={results['caption']['model_dir']}", f"features={ds.features_path.parent}",
        f"references={ds.text_path}", f"output_dir={out / 'eval'}"],
        lambda s: f"{s['num_images']} val images, CIDEr (char) {s['metrics']['char']['CIDEr']:.3f}")
    for tokenization, scores in results["evaluate"]["metrics"].items():
        print(f"{tokenization:>6}: " + "  ".join(f"{name} {value:.3f}" for name, value in scores.items()))
    print(f"report: {results['evaluate']['files'].get('report', out / 'eval')}")

    banner(7, "serve: Ray Serve app (detector → captioner, retriever) on 127.0.0.1, asked over HTTP")
    with StageProgress("serve") as progress:
        results["serve"] = serve_and_ask(out, ds.root, results["caption"]["model_dir"], results["retrieval"]["model_dir"], "val/000000")
        captions = results["serve"]["caption"].get("captions") or [{}]
        progress.done(f"caption: {json.dumps(captions[0].get('text', captions[0]), ensure_ascii=False)}")
    stages.rows.append(("serve", progress.seconds, progress.result))
    print(f"POST {results['serve']['url']}/v1/caption  ({results['serve']['image']})")
    print(json.dumps(results["serve"]["caption"].get("captions"), ensure_ascii=False))
    print(f"POST {results['serve']['url']}/v1/search/images  {{\"text\": \"红色的圆形\"}}")
    print(json.dumps(results["serve"]["search"], ensure_ascii=False)[:400])
    return results, stages


def print_next_steps(out: Path, results: dict[str, Any]) -> None:
    banner(8, "where everything is, and what to try next")
    rows = [
        ("synthetic data", out / "data"),
        ("extracted features", out / "extracted" / "features"),
        ("extraction errors", out / "extracted" / "errors"),
        ("pretrained model", results["pretrain"]["model_dir"]),
        ("caption model", results["caption"]["model_dir"]),
        ("retrieval model", results["retrieval"]["model_dir"]),
        ("training curves", f"{results['caption']['run_dir']}/*.png"),
        ("evaluation", out / "eval"),
        ("HTTP answers", out / "http_answers.json"),
        ("Ray worker logs", results["ray_logs"]),
    ]
    for name, where in rows:
        print(f"  {name:<20} {where}")
    print("\nnext:")
    print("  serve run serve/config.yaml          # the web page at http://127.0.0.1:8000/ (train the tiny cards first)")
    print("  ray job submit --working-dir . -- mengzi-ray finetune-caption --config jobs/caption_tiny.yaml")
    print("  see jobs/README.md for every job card and cluster/ for AWS and Kubernetes")


def main(out_dir: str, fast: bool = False) -> int:
    # the jobs' and HTTP clients' INFO lines repeat what the stage lines say (`mengzi-ray <command>` keeps them)
    logging.getLogger().setLevel(logging.WARNING)
    start = time.perf_counter()
    results, stages = run_demo(out_dir, fast=fast)
    print_next_steps(Path(out_dir).resolve(), results)
    print("\nsummary:")
    print(stages.table())
    print(f"\ndemo finished in {format_seconds(time.perf_counter() - start)}")
    return 0
