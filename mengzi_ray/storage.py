"""URIs → files: local paths and `s3://bucket/prefix` through pyarrow's filesystems.

S3-compatible stores (MinIO, moto in tests) are reached through the standard AWS chain: credentials from the
environment/config files and the endpoint from `AWS_ENDPOINT_URL`. Nothing here logs credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


def is_remote(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def filesystem_for(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    text = str(uri)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        fs = pafs.S3FileSystem(
            endpoint_override=host.rstrip("/"),
            scheme=scheme,
            region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
        )
        return fs, text[len("s3://") :]
    return pafs.FileSystem.from_uri(text)


def read_bytes(uri: str) -> bytes:
    """The whole file at a local path or s3:// URI."""
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file (local path or s3:// URI), creating local parent dirs; locally via a temp name + rename,
    so a reader never sees half a file."""
    if not is_remote(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    fs, path = filesystem_for(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def download_dir(uri: str, destination: str | Path | None = None) -> Path:
    """Copy every file under `uri` (recursively) into a local dir and return it; local paths are returned as is."""
    if not is_remote(uri):
        return Path(uri)
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory in the object store")
    dest = Path(destination) if destination else Path(tempfile.mkdtemp(prefix="mengzi_ray_"))
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def upload_dir(local_dir: str | Path, uri: str) -> str:
    """Copy a local dir to `uri` (local or s3://); returns the URI."""
    if not is_remote(uri):
        shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        return uri
    fs, path = filesystem_for(uri)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def json_lines(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) for every non-blank line of a JSON-lines text; a line that is not JSON
    raises ValueError("<source> line <n>: not JSON (...)")."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} line {number}: not JSON ({exc})") from None
