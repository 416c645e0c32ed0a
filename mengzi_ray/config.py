"""Job cards: YAML → validated pydantic models, checked before anything starts.

A job is `job card → validated card → one library function`. Each stage defines its own card model next to its
code (`features/card.py`, `training/card.py`, ...), built from the shared sections here; `COMMANDS` maps every
`mengzi-ray <command>` to its card class and job function, by import path, so importing this module imports no
stage (and no Ray).

Conventions every card follows:
- unknown keys are errors (`extra="forbid"`), at every level, so a typo never silently falls back to a default;
- errors name the card file and the dotted field (`ConfigError`);
- paths are strings that may be local or `s3://`; relative local paths are resolved against the working directory
  of the job (under `ray job submit --working-dir .` that is the uploaded project root).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CardT = TypeVar("CardT", bound="Card")


class ConfigError(ValueError):
    """A job card that cannot run: names the card and the field."""


class JobFailed(RuntimeError):
    """A job that ran to the end but must exit non-zero (e.g. too many failed inputs); outputs are written."""


class Section(BaseModel):
    """Base of every card section: unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Card(Section):
    """Base of every job card."""


class RaySection(Section):
    """How the job reaches Ray. Used only when the process has no Ray yet (a test may have started one).

    Under `ray job submit` the driver joins the cluster it was submitted to (RAY_ADDRESS is set by the job
    supervisor); on a laptop `ray.init()` starts an embedded Ray.
    """

    address: str | None = Field(None, description="Ray address; None joins RAY_ADDRESS or starts an embedded Ray")
    num_cpus: int | None = Field(
        None, ge=1, description="logical CPUs of an embedded Ray (may exceed the cores: tiny CPU jobs overcommit)"
    )


class ScalingSection(Section):
    """Ray Train / actor-pool resources: mirrors `ray.train.ScalingConfig`."""

    num_workers: int = Field(1, ge=1, description="training workers (one process each, one GPU each if use_gpu)")
    use_gpu: bool = Field(False, description="one GPU per worker; CPU workers use the gloo backend")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")

    def scaling_config(self) -> Any:
        from ray.train import ScalingConfig

        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker={"CPU": self.cpus_per_worker},
        )


class RunSection(Section):
    """Where a Ray Train/Tune run keeps its state, and how it recovers."""

    name: str = Field(..., min_length=1, description="run name: re-submitting the same name resumes the run")
    storage_path: str = Field(..., description="local dir or s3:// URI for checkpoints, results and exports")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1: forever)")
    allow_infinite_retries: bool = Field(
        False, description="must be true for max_failures: -1 (a deterministic failure would then retry forever)"
    )

    @model_validator(mode="after")
    def _name_is_a_path_part(self) -> "RunSection":
        if "/" in self.name or self.name in {".", ".."}:
            raise ValueError(f"run name {self.name!r} must be one path component")
        if self.max_failures == -1 and not self.allow_infinite_retries:
            raise ValueError(
                "max_failures: -1 retries forever, also a failure that repeats on every try: set a number, or "
                "allow_infinite_retries: true if that is what you want"
            )
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value (dotted key, YAML value)")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b=value` override set (intermediate mappings are created)."""
    result = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {key!r} is not a mapping")
            node = child
        node[keys[-1]] = value
    return result


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (plain YAML keeps the last one silently, so a
    second `optim:` block would replace the whole first one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the later one would silently win)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")


def credential_uris(node: Any, path: str = "") -> list[str]:
    """Dotted paths of every string in `node` that is a URI with user info (`s3://KEY:SECRET@bucket/...`)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in credential_uris(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in credential_uris(v, f"{path}[{i}]")]
    return [path or "(card)"] if isinstance(node, str) and _USERINFO.match(node.strip()) else []


def validate_card(card_cls: type[CardT], data: dict[str, Any], source: str) -> CardT:
    """Validate a mapping as `card_cls`; a failure is one ConfigError listing every bad field by dotted path. A URI
    with credentials in it is refused (cards are echoed to logs, summary.json and training_card.json)."""
    leaked = credential_uris(data)
    if leaked:
        raise ConfigError(
            f"{source}: {', '.join(leaked)}: a URI with credentials in it (user:secret@); give credentials through "
            "the environment / instance profile, never in a card"
        )
    try:
        return card_cls.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "(card)"
            problems.append(f"  {field}: {err['msg']}")
        raise ConfigError(f"{source}: invalid {card_cls.__name__}\n" + "\n".join(problems)) from None


def load_card(card_cls: type[CardT], path: str | Path, overrides: list[str] | None = None) -> CardT:
    """Read a YAML card, apply `--set` overrides, validate. Raises ConfigError naming the file and fields."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: job card not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job card is a YAML mapping, got {type(data).__name__}")
    return validate_card(card_cls, apply_overrides(data, overrides or []), str(path))


def resolve(target: str) -> Any:
    """`package.module:attribute` → the attribute."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@dataclass(frozen=True)
class Command:
    """One `mengzi-ray <name> --config card.yaml` command: its card model and the function that runs it.

    The job function takes the validated card and returns a JSON-able summary dict; it raises `JobFailed`
    (after writing its outputs) when the job must exit non-zero.
    """

    name: str
    card: str
    run: str
    help: str

    def card_class(self) -> type[Card]:
        return resolve(self.card)

    def job_function(self) -> Callable[[Card], dict[str, Any]]:
        return resolve(self.run)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "extract",
            "mengzi_ray.features.card:ExtractCard",
            "mengzi_ray.features.extract:run_extract",
            "images (local dir, s3:// prefix or manifest) → region-feature Parquet dataset + errors",
        ),
        Command(
            "import-oscar",
            "mengzi_ray.features.oscar_import.cards:ImportOscarCard",
            "mengzi_ray.features.oscar_import:run_import",
            "released Oscar/VinVL/Mengzi-Oscar files or AIC-ICC annotations → our features/ and text.jsonl",
        ),
        Command(
            "export-oscar",
            "mengzi_ray.features.card:ExportOscarCard",
            "mengzi_ray.features.oscar_tsv:run_export",
            "our feature dataset → VinVL TSV layout with .lineidx",
        ),
        Command(
            "pretrain",
            "mengzi_ray.training.card:PretrainCard",
            "mengzi_ray.training.jobs:run_pretrain",
            "masked-token + image-text-match pretraining on Ray Train",
        ),
        Command(
            "finetune-caption",
            "mengzi_ray.training.card:CaptionCard",
            "mengzi_ray.training.jobs:run_finetune_caption",
            "caption fine-tuning (cross-entropy or SCST) on Ray Train",
        ),
        Command(
            "finetune-retrieval",
            "mengzi_ray.training.card:RetrievalCard",
            "mengzi_ray.training.jobs:run_finetune_retrieval",
            "image-text retrieval fine-tuning on Ray Train",
        ),
        Command(
            "evaluate",
            "mengzi_ray.evaluation.card:EvaluateCard",
            "mengzi_ray.evaluation.jobs:run_evaluate",
            "caption metrics or retrieval R@K of a model dir on a feature dataset",
        ),
        Command(
            "index",
            "mengzi_ray.index.card:IndexCard",
            "mengzi_ray.index.job:run_index",
            "embed a feature dataset's images with a model dir's dual encoder into a resumable embedding index",
        ),
        Command(
            "tune",
            "mengzi_ray.training.tune_card:TuneCard",
            "mengzi_ray.training.tune:run_tune",
            "learning-rate sweep (ASHA) over any training task",
        ),
    ]
}
