"""cluster/ and serve/ agree with the code: one Ray version, one image, entrypoints that exist, cards that
validate, and resources the cluster can actually give the cards."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from mengzi_ray.config import COMMANDS, load_card

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
IMAGE = "mengzi-ray:0.1.0"
IMAGE_ROOT = "/home/ray/mengzi_ray/"  # WORKDIR of cluster/Dockerfile


def manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))}


def containers(node: object) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        if "containers" in node:
            found.extend(node["containers"])
        for value in node.values():
            found.extend(containers(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(containers(value))
    return found


def raycluster() -> dict:
    return manifests()["raycluster.yaml"]


def worker_group(name: str) -> dict:
    return next(g for g in raycluster()["spec"]["workerGroupSpecs"] if g["groupName"] == name)


def test_dockerfile_builds_on_the_ray_version_we_test():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)
    assert base, "Dockerfile must build FROM a rayproject/ray image"
    assert base.group(1).startswith(f"{ray.__version__}-py311"), base.group(1)
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in text


def test_every_manifest_is_ray_io_v1_on_our_image_and_version():
    for name, doc in manifests().items():
        assert doc["apiVersion"] == "ray.io/v1", name
        images = {c["image"] for c in containers(doc)}
        assert images <= {IMAGE}, (name, images)
    assert raycluster()["spec"]["rayVersion"] == ray.__version__
    assert raycluster()["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert aws["docker"]["image"] == IMAGE
    assert aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    assert aws["available_node_types"]["gpu_worker"]["min_workers"] == 0


def entrypoint_jobs() -> list[tuple[str, str, Path]]:
    """(manifest, command, card path in the repo) for every RayJob."""
    jobs = []
    for name, doc in manifests().items():
        if doc["kind"] != "RayJob":
            continue
        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[0] == "mengzi-ray" and words[2] == "--config", (name, words)
        card = words[3]
        assert card.startswith(IMAGE_ROOT), (name, card)
        jobs.append((name, words[1], ROOT / card[len(IMAGE_ROOT) :]))
    return jobs


def test_rayjobs_run_commands_and_cards_that_exist_and_validate():
    jobs = entrypoint_jobs()
    assert {command for _, command, _ in jobs} >= {"extract", "pretrain"}
    for name, command, card_path in jobs:
        assert command in COMMANDS, (name, command)
        assert card_path.is_file(), (name, card_path)
        load_card(COMMANDS[command].card_class(), card_path)
        assert raycluster()["metadata"]["name"] == manifests()[name]["spec"]["clusterSelector"]["ray.io/cluster"]


@pytest.mark.parametrize("card_name", ["pretrain_base.yaml", "caption_coco.yaml", "caption_aic.yaml", "retrieval_coco.yaml"])
def test_training_cards_fit_the_gpu_group(card_name):
    card = load_card(COMMANDS["pretrain" if card_name.startswith("pretrain") else
                              "finetune-caption" if card_name.startswith("caption") else
                              "finetune-retrieval"].card_class(), ROOT / "jobs" / card_name)
    group = worker_group("gpu")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert card.scaling.use_gpu
    assert card.scaling.num_workers <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert card.scaling.cpus_per_worker <= float(limits["cpu"])


# The only values the RayService may set differently from serve/config.yaml: where things are stored, how far they
# scale and how they are reached (the local demo binds 127.0.0.1 and may be anonymous; a cluster binds 0.0.0.0 and
# requires the token), the CPUs per replica (the demo shares a 2-core laptop) and whether unplaceable replicas are
# refused (a fixed machine) or awaited (an autoscaling cluster). Everything else (limits, batching, routes, the
# token's env var) must be the same config.
CLUSTER_VALUES = {"model_dir", "features", "texts", "images_root", "num_gpus", "num_cpus", "max_replicas", "host",
                  "allow_anonymous", "resource_check"}


def without_cluster_values(node: object) -> object:
    if isinstance(node, dict):
        return {k: without_cluster_values(v) for k, v in node.items() if k not in CLUSTER_VALUES}
    if isinstance(node, list):
        return [without_cluster_values(v) for v in node]
    return node


def test_rayservice_embeds_serve_config_with_cluster_storage_and_the_vinvl_detector():
    from mengzi_ray.serving.settings import ServeAppConfig

    service = manifests()["rayservice.yaml"]
    assert service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    args = embedded["applications"][0]["args"]
    vinvl = yaml.safe_load((ROOT / "jobs" / "extract_vinvl.yaml").read_text())["detector"]
    assert args["detector"]["model"] == vinvl
    for config in (embedded, local):
        config["applications"][0]["args"]["detector"].pop("model")
    assert without_cluster_values(embedded) == without_cluster_values(local)
    ServeAppConfig.model_validate({**args, "detector": {**args["detector"], "model": vinvl}})
    uris = [args["captioner"]["model_dir"], args["retriever"]["model_dir"], *args["retriever"]["gallery"].values()]
    assert all(u.startswith("s3://") for u in uris if isinstance(u, str) and "/" in u), uris
    assert service["spec"]["rayClusterConfig"] == raycluster()["spec"]


def test_serve_cluster_config_is_the_local_one_bound_to_all_interfaces_with_the_token_required():
    from mengzi_ray.serving.settings import ServeAppConfig

    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    cluster = yaml.safe_load((ROOT / "serve" / "cluster.yaml").read_text())
    assert without_cluster_values(cluster) == without_cluster_values(local)
    assert cluster["http_options"]["host"] == "0.0.0.0" and "allow_anonymous" not in cluster["applications"][0]["args"]
    assert not ServeAppConfig.model_validate(cluster["applications"][0]["args"]).allow_anonymous


def test_the_local_serve_detector_is_the_tiny_extract_cards():
    """An upload to the local app is detected as the demo's extract stage detects (same random-init network and
    sizes), at that card's cost per image, not a larger untested variant."""
    from mengzi_ray.features.card import DetectorSection

    tiny = yaml.safe_load((ROOT / "jobs" / "extract_tiny.yaml").read_text())["detector"]
    for name in ("config.yaml", "cluster.yaml"):
        served = yaml.safe_load((ROOT / "serve" / name).read_text())["applications"][0]["args"]["detector"]["model"]
        assert DetectorSection.model_validate(served) == DetectorSection.model_validate(tiny), name


def test_runtime_env_parses_and_excludes_outputs():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert "outputs/" in env["excludes"] and ".venv/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_the_head_control_ports_are_not_open_beyond_the_cluster():
    """L16: Ray's Jobs API (8265) and Ray Client (10001) have no authentication. On AWS the dashboard binds the
    head's loopback (reached through `ray dashboard`); on K8s, where KubeRay needs it on the pod IP, a NetworkPolicy
    admits only the namespace's pods and the KubeRay operator to a head's ports, and anyone else to Serve's 8000."""
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    policy = yaml.safe_load((CLUSTER / "kuberay" / "policy" / "head-ports.yaml").read_text())
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"} and spec["policyTypes"] == ["Ingress"]
    open_ports = set()
    for rule in spec["ingress"]:
        sources = rule.get("from")
        if not sources:  # a rule without `from` admits every source: only Serve's port may be in one
            ports = rule.get("ports")
            assert ports, "a rule without `from` and without `ports` opens every port to everyone"
            open_ports |= {p["port"] for p in ports}
            continue
        for source in sources:
            assert "ipBlock" not in source, source  # no CIDR (0.0.0.0/0 or otherwise) reaches the control ports
            assert set(source) <= {"podSelector", "namespaceSelector"}
            if "namespaceSelector" in source:  # a named namespace, never `{}` (every namespace)
                assert source["namespaceSelector"].get("matchLabels"), source
    assert open_ports == {8000}
    heads = [
        (name, cluster["headGroupSpec"]) for name, doc in manifests().items()
        for cluster in (doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"],)
        if "headGroupSpec" in cluster  # RayJobs on the long-lived cluster start no head of their own
    ]
    assert {name for name, _ in heads} >= {"raycluster.yaml", "rayservice.yaml"}
    for name, head in heads:  # every head the manifests start is one the policy selects
        labels = head["template"].get("metadata", {}).get("labels", {})
        assert labels.get("ray.io/node-type", "head") == "head", name  # KubeRay's own label is not overridden
