"""The seed's recipe as job cards: every card's inputs are an earlier card's outputs (no --set), text splits line up,
and jobs/README.md lists the cards in this order."""

from __future__ import annotations

import re
from pathlib import Path
from pathlib import PurePosixPath

from mengzi_ray.config import COMMANDS, load_card

JOBS = Path(__file__).resolve().parents[2] / "jobs"
# (card, command): import or extract → pretrain → caption COCO → caption AIC-ICC → SCST → evaluate AIC-ICC val;
# retrieval COCO-IR → evaluate AIC-ICC 1k.
RECIPE = [
    ("import_pretrain_corpus", "import-oscar"),
    ("pretrain_base", "pretrain"),
    ("import_coco_caption", "import-oscar"),
    ("caption_coco", "finetune-caption"),
    ("extract_aic_icc", "extract"),
    ("import_aic_icc", "import-oscar"),
    ("caption_aic", "finetune-caption"),
    ("caption_scst", "finetune-caption"),
    ("eval_caption_aic", "evaluate"),
    ("import_coco_ir", "import-oscar"),
    ("retrieval_coco", "finetune-retrieval"),
    ("eval_retrieval_aic1k", "evaluate"),
]


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def outputs(card, command: str) -> tuple[set[str], dict[str, set[str]]]:
    """(paths the card's job writes, {text.jsonl path: splits written there})."""
    if command == "extract":
        out = _norm(card.output)
        return {f"{out}/features", f"{out}/errors", f"{out}/summary.json"}, {}
    if command == "import-oscar":
        c, out = card.root, _norm(card.root.output)
        paths = {f"{out}/features", f"{out}/text.jsonl", f"{out}/import_summary.json"}
        if c.format == "vinvl_caption":
            splits = {c.split or PurePosixPath(c.yaml).stem, *(PurePosixPath(y).stem for y in c.more_yamls)}
            paths |= {f"{out}/references_{s}.json" for s in splits}
        elif c.format == "vinvl_retrieval":
            splits = {c.split, *c.more_splits}
            paths |= {f"{out}/eval_image_keys.txt", f"{out}/eval_candidates.json"}
        elif c.format == "aic_icc":
            splits = {c.split, *c.more_annotations}
        elif c.format == "oscarplus_corpus":
            splits = {c.split}
        else:
            splits = set()
        return paths, {f"{out}/text.jsonl": splits}
    if command == "evaluate":
        return {_norm(card.output_dir)}, {}
    return {f"{_norm(card.run.storage_path)}/{card.run.name}/model"}, {}


def inputs(card, command: str) -> tuple[set[str], dict[str, set[str]]]:
    """(paths the card reads that must come from the recipe, {text path: splits it needs})."""
    if command in ("extract", "import-oscar"):
        return set(), {}  # raw data: the recipe's sources
    if command == "evaluate":
        paths = {card.model_dir, card.features, card.references}
        if card.task == "retrieval":
            paths |= {p for p in (card.retrieval.image_keys, card.retrieval.candidates) if p}
        return {_norm(p) for p in paths}, {_norm(card.references): {card.split}}
    paths = {card.data.features, card.data.text} | ({card.model.init_from} if card.model.init_from else set())
    return {_norm(p) for p in paths}, {_norm(card.data.text): {card.data.train_split, card.data.val_split}}


def test_every_card_input_is_an_earlier_cards_output() -> None:
    produced: dict[str, str] = {}
    splits: dict[str, set[str]] = {}
    for name, command in RECIPE:
        card = load_card(COMMANDS[command].card_class(), JOBS / f"{name}.yaml")
        needed, needed_splits = inputs(card, command)
        for path in sorted(needed):
            assert path in produced, f"{name}.yaml reads {path}, which no earlier card of the recipe writes"
        for path, wanted in needed_splits.items():
            assert wanted <= splits.get(path, set()), f"{name}.yaml needs splits {wanted} of {path}, " \
                                                      f"written: {splits.get(path)}"
        written, written_splits = outputs(card, command)
        for path in written:
            produced.setdefault(path, name)
        for path, new in written_splits.items():
            splits.setdefault(path, set()).update(new)
    assert produced["s3://mengzi-ray/data/aic-icc/features"] == "extract_aic_icc"
    assert produced["s3://mengzi-ray/data/aic-icc/text.jsonl"] == "import_aic_icc"


def test_jobs_readme_lists_the_recipe_in_order() -> None:
    readme = (JOBS / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The recipe"):]
    listed = re.findall(r"`jobs/([a-z0-9_]+)\.yaml`", section.split("\n## ")[0])
    assert listed == [name for name, _ in RECIPE]
