"""Job cards: unknown keys, bad values and overrides fail before anything runs, naming the field."""

from __future__ import annotations

import pytest

from mengzi_ray.cli import run_command
from mengzi_ray.config import (
    COMMANDS,
    Card,
    ConfigError,
    RaySection,
    RunSection,
    ScalingSection,
    apply_overrides,
    load_card,
)


class ToyCard(Card):
    ray: RaySection = RaySection()
    scaling: ScalingSection = ScalingSection()
    run: RunSection
    steps: int


def write(tmp_path, text: str):
    path = tmp_path / "card.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_card_with_overrides(tmp_path):
    path = write(tmp_path, "steps: 3\nrun: {name: r1, storage_path: /tmp/x}\n")
    card = load_card(ToyCard, path, ["scaling.num_workers=2", "steps=7", "ray.num_cpus=4"])
    assert card.steps == 7 and card.scaling.num_workers == 2 and card.ray.num_cpus == 4
    assert card.run.max_failures == 2


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("steps: 3\nrun: {name: r, storage_path: s}\nscaling: {num_workrs: 2}\n", "scaling.num_workrs"),
        ("steps: 3\nrun: {name: r, storage_path: s}\nscaling: {num_workers: 0}\n", "scaling.num_workers"),
        ("steps: three\nrun: {name: r, storage_path: s}\n", "steps"),
        ("steps: 3\n", "run"),
        ("steps: 3\nrun: {name: a/b, storage_path: s}\n", "run"),
    ],
)
def test_invalid_cards_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        load_card(ToyCard, write(tmp_path, text))
    assert field in str(info.value) and str(tmp_path) in str(info.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_card(ToyCard, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_card(ToyCard, tmp_path / "nope.yaml")


def test_override_syntax():
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_every_command_resolves_to_a_card_and_a_job():
    for command in COMMANDS.values():
        from mengzi_ray.config_reference import card_variants

        assert all(issubclass(card, Card) for card in card_variants(command.card_class())), command.name
        assert callable(command.job_function()), command.name


def test_cli_exits_2_on_a_bad_card(tmp_path, capsys):
    path = write(tmp_path, "bogus_key: 1\n")
    assert run_command("extract", str(path), []) == 2
    assert "bogus_key" in capsys.readouterr().err


def test_readme_card_reference_is_current():
    from pathlib import Path

    from mengzi_ray.config_reference import current_block, generate

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert current_block(readme) == generate(), "run: mengzi-ray config-reference --write README.md"
