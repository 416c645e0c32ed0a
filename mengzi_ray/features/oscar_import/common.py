"""What every importer shares: the one image-id normalisation, streaming readers, the bad-row log.

Contracts:
- `normalize_image_id` is the only place a source id (int in `.pt` dicts, str in tsv keys and json) becomes our
  `image_id` string; importers call it on every id they read, so `391895` and `"391895"` name the same image.
- readers stream: a tsv yields one line at a time, a JSON array one element at a time (`json_array`), and lookups
  by key go through an on-disk index (`KeyedTsv`), so memory does not grow with the number of rows.
- a bad row is a `RowError` (reason code + message); the importer catches it, `ImportLog.fail` counts it by reason
  and appends it with file and line to `<output>/import_errors.jsonl`; nothing is dropped without a count.
"""

from __future__ import annotations

import io
import json
import numbers
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

import pyarrow.fs as pafs

from mengzi_ray import storage
from mengzi_ray.config import ConfigError, JobFailed

JSON_CHUNK_CHARS = 1 << 20  # characters read at a time by json_array
MAX_JSON_ELEMENT_CHARS = 16 << 20  # one array element larger than this is reported as broken json
ERRORS_KEPT_IN_SUMMARY = 20


class RowError(ValueError):
    """One bad input row: `reason` is a short code counted in the summary, the message says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalize_image_id(value: Any) -> str:
    """A source image id → our image_id string: ints (Python, numpy, 0-d tensors) print in decimal, strings are
    stripped. Leading zeros are kept (``"007"`` and ``7`` stay different images). Raises RowError("id") for
    bools, floats, empty strings and anything else."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalar / 0-d torch tensor
    if isinstance(value, bool):
        raise RowError("id", f"image id {value!r} is a bool")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise RowError("id", f"image id {value!r} ({type(value).__name__}) is neither an int nor a non-empty string")


def open_binary(uri: str) -> IO[bytes]:
    """A seekable binary reader of a local or s3:// file; ConfigError naming the file when it does not exist."""
    fs, path = storage.filesystem_for(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ConfigError(f"{uri}: file not found")
    if isinstance(fs, pafs.LocalFileSystem):
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    return io.BufferedReader(fs.open_input_file(path))  # type: ignore[arg-type]


def exists(uri: str) -> bool:
    fs, path = storage.filesystem_for(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def tsv_lines(uri: str) -> Iterator[tuple[int, int, list[str]]]:
    """(1-based line number, byte offset, tab-split stripped columns) of every non-blank line of a tsv.

    A line that is not UTF-8 is yielded with columns == [] so the caller can count it as a bad row."""
    with open_binary(uri) as stream:
        offset = 0
        for number, raw in enumerate(stream, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, start, []
                continue
            if line.strip():
                yield number, start, [col.strip() for col in line.rstrip("\r\n").split("\t")]


def json_array(uri: str) -> Iterator[tuple[int, Any]]:
    """(line number where the element starts, element) of a JSON file holding one top-level array, read in chunks.

    Raises RowError("json") at the first element that does not parse (a JSON array cannot be re-synchronised
    after a syntax error); elements before it have been yielded."""
    decoder = json.JSONDecoder()
    with open_binary(uri) as raw, io.TextIOWrapper(raw, encoding="utf-8") as text:
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = text.read(JSON_CHUNK_CHARS)
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def skip(chars: str) -> str:
            """Skip whitespace and `chars`; return the next significant character ("" at end of input)."""
            nonlocal pos, line
            while True:
                while pos < len(buf) and (buf[pos].isspace() or buf[pos] in chars):
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        if skip("") != "[":
            raise RowError("json", f"{uri} line {line}: expected a JSON array")
        pos += 1
        while True:
            nxt = skip(",")
            if nxt == "]":
                return
            if nxt == "":
                raise RowError("json", f"{uri} line {line}: JSON array is not closed (file truncated?)")
            while True:
                try:
                    element, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as exc:
                    at = line + buf.count("\n", pos, exc.pos)
                    if eof or len(buf) - pos > MAX_JSON_ELEMENT_CHARS or not more():
                        raise RowError("json", f"{uri} line {at}: broken json ({exc.msg})") from None
            yield line, element
            line += buf.count("\n", pos, end)
            pos = end


class KeyedTsv:
    """Random access by key to a tsv `key \\t ... \\t json`: one scan records key → byte offset in an on-disk
    sqlite index (constant memory), then `get(key)` seeks and parses that line.

    Keys are normalised with normalize_image_id. Duplicate keys: the first line wins and later ones are listed in
    `duplicates` (line numbers), for the importer to report."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._dir = tempfile.TemporaryDirectory(prefix="mengzi_ray_index_")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "index.sqlite"))
        self._db.execute("CREATE TABLE k (key TEXT PRIMARY KEY, offset INTEGER, line INTEGER)")
        self.duplicates: list[tuple[int, str]] = []
        self.bad_lines: list[int] = []
        with self._db:
            for number, offset, cols in tsv_lines(uri):
                if len(cols) < 2:
                    self.bad_lines.append(number)
                    continue
                key = cols[0]
                cursor = self._db.execute("INSERT OR IGNORE INTO k VALUES (?, ?, ?)", (key, offset, number))
                if cursor.rowcount == 0:
                    self.duplicates.append((number, key))
        self._file = open_binary(uri)

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM k WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM k").fetchone()[0])

    def get(self, key: str) -> tuple[int, Any]:
        """(line number, parsed json of the last column) of `key`; RowError("no_labels") if absent,
        RowError("json") if that line's json is broken."""
        found = self._db.execute("SELECT offset, line FROM k WHERE key = ?", (key,)).fetchone()
        if found is None:
            raise RowError("no_labels", f"image {key!r} has no row in {self.uri}")
        offset, number = found
        self._file.seek(offset)
        cols = self._file.readline().decode("utf-8").rstrip("\r\n").split("\t")
        try:
            return number, json.loads(cols[-1])
        except json.JSONDecodeError as exc:
            raise RowError("json", f"{self.uri} line {number}: json does not parse ({exc.msg})") from None

    def close(self) -> None:
        self._file.close()
        self._db.close()
        self._dir.cleanup()


class KeySet:
    """A set of strings kept in an on-disk sqlite table (constant memory); used to join text rows to the image
    ids written to features/."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="mengzi_ray_keys_")
        self._db = sqlite3.connect(os.path.join(self._dir.name, "keys.sqlite"))
        self._db.execute("CREATE TABLE s (key TEXT PRIMARY KEY)")

    def add(self, key: str) -> bool:
        """Add `key`; False if it was already there."""
        return self._db.execute("INSERT OR IGNORE INTO s VALUES (?)", (key,)).rowcount == 1

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM s WHERE key = ?", (key,)).fetchone() is not None

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()


class ImportLog:
    """Counts rows read / written / failed (by reason) per table and streams every failure, with file and line,
    to `<root>/import_errors.jsonl`."""

    def __init__(self, fs: pafs.FileSystem, root: str, fmt: str) -> None:
        self.fs, self.root, self.format = fs, root, fmt
        self.read: Counter[str] = Counter()
        self.written: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.failed_rows: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []
        self._errors = fs.open_output_stream(f"{root}/import_errors.jsonl")

    def fail(self, table: str, file: str, line: int | None, error: RowError, image_id: str | None = None) -> None:
        """Count one failed row of `table` (features | text | ...) and record where it is."""
        self.failed[error.reason] += 1
        self.failed_rows[table] += 1
        record = {"table": table, "file": file, "line": line, "image_id": image_id, "reason": error.reason,
                  "error": str(error)}
        self._errors.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        if len(self.examples) < ERRORS_KEPT_IN_SUMMARY:
            self.examples.append(record)

    def finish(self, max_error_fraction: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Write `<root>/import_summary.json` and return it; raise JobFailed (after writing) when failed rows /
        rows read exceeds max_error_fraction."""
        self._errors.close()
        read, failed = sum(self.read.values()), sum(self.failed_rows.values())
        summary = {"format": self.format, "read": dict(self.read), "written": dict(self.written),
                   "failed": dict(self.failed_rows), "failed_by_reason": dict(self.failed),
                   "error_examples": self.examples, **extra}
        with self.fs.open_output_stream(f"{self.root}/import_summary.json") as f:
            f.write(json.dumps(summary, ensure_ascii=False, indent=2).encode("utf-8"))
        if read == 0 and failed == 0:
            raise JobFailed(f"import-oscar ({self.format}): the input holds no rows")
        if failed and failed / max(read, 1) > max_error_fraction:
            raise JobFailed(
                f"import-oscar ({self.format}): {failed} of {read} rows failed ({dict(self.failed)}), above "
                f"max_error_fraction={max_error_fraction}; first: {self.examples[0]['error']}; all in "
                f"{self.root}/import_errors.jsonl"
            )
        return summary
