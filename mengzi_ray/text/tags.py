"""Chinese tag vocabulary: detector class names (English) → Chinese object tags.

Oscar feeds the detector's object labels ("tags") to the model next to the text. Mengzi-Oscar
translates the 1,594 Visual Genome class names to Chinese; the default vocabulary shipped in
``data/tag_vocab_zh.json`` is that translation with its machine-translation errors corrected
(every change is listed with a reason in ``data/tag_corrections.json``; see ``data/README.md``).

Two named tag maps (:data:`TAG_MAPS`, :meth:`TagVocabulary.named`): ``corrected`` (that default) and ``langboat``,
Langboat's ``chinese_label.json`` verbatim (``data/chinese_label.json``): the map the released Mengzi-Oscar
checkpoints were trained with, so a released model is fed the tags it learned.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from mengzi_ray.text.normalize import normalize_text

DEFAULT_VOCAB_RESOURCE = "tag_vocab_zh.json"
TAG_MAPS = {"corrected": DEFAULT_VOCAB_RESOURCE, "langboat": "chinese_label.json"}
TagMapName = Literal["corrected", "langboat"]


@dataclass(frozen=True)
class TagTranslation:
    """The result of :meth:`TagVocabulary.translate`.

    Attributes:
        tags: one tag per input label, in input order; a label the vocabulary does not know keeps
            its (whitespace-normalised) English text, so no region loses its tag.
        unknown: the distinct unknown labels, in order of first occurrence.
    """

    tags: list[str]
    unknown: list[str]


def _label_key(label: str) -> str:
    """Return the lookup key of a class name: whitespace-collapsed, trimmed, lower-case."""
    if not isinstance(label, str):
        raise TypeError(f"tag labels must be str, got {type(label).__name__}")
    key = " ".join(label.split()).lower()
    if not key:
        raise ValueError("tag labels must not be empty")
    return key


class TagVocabulary:
    """An immutable mapping from detector class names to Chinese tags.

    Lookups are case-insensitive and ignore surrounding (and repeated inner) whitespace. Every
    Chinese value is passed through :func:`normalize_text` when the vocabulary is built.
    """

    def __init__(self, mapping: Mapping[str, str]) -> None:
        """Build a vocabulary from ``{class name: Chinese tag}``.

        Raises:
            TypeError: if a key or value is not a ``str``.
            ValueError: if a key or normalised value is empty, or two keys differ only in case or
                whitespace but map to different tags.
        """
        table: dict[str, str] = {}
        for label, chinese in mapping.items():
            key = _label_key(label)
            if not isinstance(chinese, str):
                raise TypeError(f"tag for {label!r} must be str, got {type(chinese).__name__}")
            tag = normalize_text(chinese)
            if not tag:
                raise ValueError(f"tag for {label!r} is empty")
            if table.get(key, tag) != tag:
                raise ValueError(f"labels equal to {key!r} map to both {table[key]!r} and {tag!r}")
            table[key] = tag
        self._table = table

    @classmethod
    def default(cls) -> TagVocabulary:
        """Return the shipped Visual Genome vocabulary (1,594 class names); loaded once, shared."""
        return _named_vocabulary("corrected")

    @classmethod
    def named(cls, name: str) -> TagVocabulary:
        """Return a packaged tag map by name (``corrected`` | ``langboat``); loaded once, shared.

        Raises:
            ValueError: for any other name (listing the known ones).
        """
        if name not in TAG_MAPS:
            raise ValueError(f"unknown tag map {name!r}; known: {sorted(TAG_MAPS)}")
        return _named_vocabulary(name)

    @classmethod
    def from_json(cls, path: str | Path) -> TagVocabulary:
        """Load a vocabulary from a UTF-8 JSON object ``{"class name": "中文标签", ...}``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the JSON is not an object, or as for the constructor.
            TypeError: as for the constructor.
        """
        return cls._from_json_text(Path(path).read_text(encoding="utf-8"), str(path))

    @classmethod
    def _from_json_text(cls, text: str, source: str) -> TagVocabulary:
        """Parse ``text`` (a JSON object of class name → tag) read from ``source``."""
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError(f"{source}: expected a JSON object of label → tag")
        return cls(mapping)

    def translate(self, labels: Sequence[str]) -> TagTranslation:
        """Translate detector labels to Chinese tags, keeping unknown labels as English text.

        Raises:
            TypeError: if a label is not a ``str``.
            ValueError: if a label is empty or whitespace only.
        """
        tags: list[str] = []
        unknown: list[str] = []
        for label in labels:
            key = _label_key(label)
            tag = self._table.get(key)
            if tag is None:
                tag = normalize_text(label)
                if tag not in unknown:
                    unknown.append(tag)
            tags.append(tag)
        return TagTranslation(tags=tags, unknown=unknown)

    def as_dict(self) -> dict[str, str]:
        """Return a copy of the table: normalised class name → normalised Chinese tag."""
        return dict(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, label: object) -> bool:
        if not isinstance(label, str) or not label.strip():
            return False
        return _label_key(label) in self._table

    def __repr__(self) -> str:
        return f"TagVocabulary({len(self)} labels)"


@functools.lru_cache(maxsize=None)
def _named_vocabulary(name: str) -> TagVocabulary:
    """Load a packaged tag map once per process."""
    resource = resources.files("mengzi_ray.text").joinpath("data").joinpath(TAG_MAPS[name])
    return TagVocabulary._from_json_text(resource.read_text(encoding="utf-8"), str(resource))


def region_tags(labels: Sequence[str] | None, tags: Sequence[str], tag_map: str | None) -> list[str]:
    """The Chinese tags a model is fed for one image: its English `labels` translated with the model dir's
    `tag_map` when it names one and the row has one label per tag, else the stored `tags` (a dataset's own)."""
    if tag_map and labels and len(labels) == len(tags):
        return TagVocabulary.named(tag_map).translate(list(labels)).tags
    return list(tags)


def tag_string(tags: Iterable[str]) -> str:
    """Join tags with single spaces: Oscar's object-label string (e.g. ``"人 狗 草地"``).

    Raises:
        ValueError: if a tag is empty or whitespace only (it would vanish from the string and
            shift every later tag).
    """
    parts = list(tags)
    for tag in parts:
        if not tag.strip():
            raise ValueError(f"tags must not be empty, got {parts!r}")
    return " ".join(parts)
