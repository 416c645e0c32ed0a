"""One import run: the output dir, its writers, the bad-row log, the tag map, and the set of image ids written.

Every format module receives an ImportRun and calls `add_feature` / `add_text` / `fail`; `finish` closes the
writers and writes `import_summary.json` (raising JobFailed above the card's max_error_fraction).
"""

from __future__ import annotations

import shutil
from typing import Any

from mengzi_ray import storage
from mengzi_ray.features.oscar_import.common import ImportLog, KeySet, RowError, open_binary
from mengzi_ray.features.oscar_import.writers import FeatureRecord, FeatureWriter, TextWriter
from mengzi_ray.text.tags import TagVocabulary


class ImportRun:
    """Outputs of one import under `card.output` (local or s3://), created lazily: a format that has no features
    writes no features/ dir, one without texts no text.jsonl."""

    def __init__(self, card: Any) -> None:
        self.card = card
        self.fs, root = storage.filesystem_for(card.output)
        self.root = root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)
        self.log = ImportLog(self.fs, self.root, card.format)
        self.tags = TagVocabulary.named(card.tags)
        self.image_ids = KeySet()
        self._features: FeatureWriter | None = None
        self._text: TextWriter | None = None
        self.files: list[str] = []

    def fail(self, table: str, file: str, line: int | None, error: RowError, image_id: str | None = None) -> None:
        self.log.fail(table, file, line, error, image_id)

    def add_feature(self, record: FeatureRecord, file: str, line: int | None) -> None:
        """Write one image's regions; a second row for an image id already written fails as duplicate_id."""
        if not self.image_ids.add(record.image_id):
            self.fail("features", file, line, RowError("duplicate_id", f"image {record.image_id!r} occurs again "
                                                       f"in {file}"), record.image_id)
            return
        if self._features is None:
            self._features = FeatureWriter(self.fs, self.root)
            self.files.append("features/")
        self._features.add(record)
        self.log.written["features"] += 1

    def has_features(self) -> bool:
        return self._features is not None

    def add_text(self, row: dict[str, Any]) -> None:
        if self._text is None:
            self._text = TextWriter(self.fs, self.root)
            self.files.append("text.jsonl")
        self._text.add(row)
        self.log.written["text"] += 1

    def copy_file(self, uri: str, name: str) -> None:
        """Copy a source file byte for byte to `<output>/<name>` (streamed)."""
        with open_binary(uri) as src, self.fs.open_output_stream(f"{self.root}/{name}") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)  # type: ignore[misc]
        self.files.append(name)

    def write_text_file(self, name: str, lines: Any) -> None:
        """Write `<output>/<name>` from an iterable of str lines (each gets a newline)."""
        with self.fs.open_output_stream(f"{self.root}/{name}") as f:
            for line in lines:
                f.write((line + "\n").encode("utf-8"))
        self.files.append(name)

    def finish(self, **extra: Any) -> dict[str, Any]:
        if self._features is not None:
            self._features.close()
        if self._text is not None:
            self._text.close()
        self.image_ids.close()
        return self.log.finish(self.card.max_error_fraction,
                               {"output": self.card.output, "tags": self.card.tags, "files": self.files, **extra})
