"""URIs → files: local paths and `s3://bucket/prefix` through pyarrow's filesystems, and the one way to write them.

S3-compatible stores (MinIO, moto in tests) are reached through the standard AWS chain: credentials from the
environment/config files and the endpoint from `AWS_ENDPOINT_URL`. Nothing here logs credentials.

Crash safety (every writer of the project goes through `write_bytes` / `publish_dir` / `publish_file`):
- locally a file is written under a unique temp name in its target dir, fsynced and renamed over the target
  (`os.replace` is atomic on POSIX), so a reader sees the old file or the whole new one, never a torn one;
- on S3 a file is one PUT / multipart upload, and S3 makes an object visible only when its upload completes, so an
  object is likewise absent or whole;
- a directory (a model export) is published with a `_COMPLETE` marker written last that lists every file and its
  size: locally the dir is assembled under a temp name and renamed into place; on S3 the old marker is deleted
  first, the files uploaded, the marker last. `check_complete` refuses a dir whose marker is missing or disagrees.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

COMPLETE_MARKER = "_COMPLETE"


def is_remote(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def absolute(uri: str) -> str:
    """`uri` with a local path made absolute against this process's working directory (s3:// unchanged): what a
    driver hands to Ray workers, whose working directory is not the driver's (Ray Train moves it)."""
    return uri if is_remote(uri) else str(Path(uri).resolve())


def _s3_endpoint() -> tuple[str, str] | None:
    """(scheme, host[:port]) of AWS_ENDPOINT_URL(_S3); a value without a scheme (`minio:9000`) means https."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if not endpoint:
        return None
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if not parts.netloc:
        raise ValueError(f"AWS_ENDPOINT_URL={endpoint!r}: no host in it")
    return parts.scheme, parts.netloc


@functools.lru_cache(maxsize=64)
def _s3_filesystem(endpoint: tuple[str, str] | None, region: str, bucket: str) -> pafs.FileSystem:
    # One client per (endpoint, bucket) per process: building one resolves credentials (IMDS on EC2) and, without
    # an endpoint, the bucket's region, which per-read would cost requests and invite throttling errors.
    if endpoint is not None:
        return pafs.S3FileSystem(endpoint_override=endpoint[1], scheme=endpoint[0], region=region)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    return fs


def filesystem_for(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI; S3 filesystems are cached per process by
    (endpoint, region, bucket)."""
    text = str(uri)
    if not is_remote(text):
        # memory-mapped reads: Parquet pages of uncompressed feature columns are used in place, not copied out of
        # the page cache first (several times the read rate); our files are only ever replaced whole, by rename,
        # so a mapping never sees a file truncated under it
        return pafs.LocalFileSystem(use_mmap=True), str(Path(text).resolve())
    path = text[len("s3://") :]
    region = os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1"))
    return _s3_filesystem(_s3_endpoint(), region, path.split("/", 1)[0]), path


def read_bytes(uri: str) -> bytes:
    """The whole file at a local path or s3:// URI."""
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _temp_sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file (local path or s3:// URI) atomically (see the module docstring), creating parent dirs."""
    if not is_remote(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(target, "tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem_for(uri)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_json(uri: str, value: Any) -> None:
    """`value` as indented UTF-8 JSON, written atomically."""
    write_bytes(uri, json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8"))


def publish_file(fs: pafs.FileSystem, source: str, target: str) -> None:
    """Move a finished file (e.g. a staged Parquet part) to its final name on the same filesystem: a rename
    locally; on S3 a server-side copy, which makes the object appear whole, then a delete of the source."""
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    fs.move(source, target)


DOWNLOADED_FLAG = ".downloaded"


def cache_root() -> Path:
    """Where s3:// dirs are downloaded: $MENGZI_RAY_CACHE, else <tmp>/mengzi_ray_cache."""
    return Path(os.environ.get("MENGZI_RAY_CACHE") or Path(tempfile.gettempdir()) / "mengzi_ray_cache")


def download_dir(uri: str, destination: str | Path | None = None) -> Path:
    """Copy every file under `uri` (recursively) into a local dir and return it; local paths are returned as is.

    Without `destination`, the copy goes to one cache slot per URI (cache_root()/<sha256 of the URI>), reused while
    it is current: a dir published with a `_COMPLETE` marker is fetched again only when the remote marker changed,
    one without a marker (a Ray checkpoint, which is never rewritten) once. Worker restarts, Serve replicas and the
    driver therefore share one copy instead of leaving a new temp dir each. A slot is filled under a temp name and
    renamed into place, so a reader never sees a partial copy."""
    if not is_remote(uri):
        return Path(uri)
    fs, path = filesystem_for(uri)
    path = path.rstrip("/")
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory in the object store")
    if destination is not None:
        dest = Path(destination)
        dest.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return dest
    slot = cache_root() / hashlib.sha256(uri.rstrip("/").encode("utf-8")).hexdigest()[:32]
    marker = f"{path}/{COMPLETE_MARKER}"
    remote_marker = read_bytes(f"s3://{marker}") if fs.get_file_info(marker).type == pafs.FileType.File else None
    if (slot / DOWNLOADED_FLAG).is_file():
        local_marker = (slot / COMPLETE_MARKER).read_bytes() if (slot / COMPLETE_MARKER).is_file() else None
        if local_marker == remote_marker:
            return slot
    slot.parent.mkdir(parents=True, exist_ok=True)
    staged, old = _temp_sibling(slot, "tmp"), _temp_sibling(slot, "old")
    staged.mkdir()
    pafs.copy_files(path, str(staged), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    (staged / DOWNLOADED_FLAG).write_text(uri, encoding="utf-8")
    if slot.exists():
        os.replace(slot, old)
    os.replace(staged, slot)
    shutil.rmtree(old, ignore_errors=True)
    return slot


def upload_dir(local_dir: str | Path, uri: str) -> str:
    """Copy each file of a local dir to `uri` (local or s3://), each file atomically; files already at `uri` that
    the dir lacks stay. For a dir that must be complete and unmixed (a model), use `publish_dir`."""
    base = Path(local_dir)
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        write_bytes(f"{uri.rstrip('/')}/{path.relative_to(base).as_posix()}", path.read_bytes())
    return uri


def mark_complete(local_dir: str | Path) -> Path:
    """Write `<dir>/_COMPLETE` (last): {"files": {relative path: size} of every other file, "export": a fresh id}."""
    base = Path(local_dir)
    files = {
        p.relative_to(base).as_posix(): p.stat().st_size
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }
    marker = base / COMPLETE_MARKER
    # `export` tells two exports with equal file sizes apart (download_dir's cache compares markers)
    body = {"files": files, "export": uuid.uuid4().hex}
    write_bytes(str(marker), json.dumps(body, indent=1, sort_keys=True).encode("utf-8"))
    return marker


def check_complete(local_dir: str | Path) -> None:
    """Raise ValueError naming the dir unless its `_COMPLETE` marker exists and every file it lists is there with
    its size (a crashed or mixed export fails here)."""
    base = Path(local_dir)
    marker = base / COMPLETE_MARKER
    if not marker.is_file():
        raise ValueError(
            f"{base}: no {COMPLETE_MARKER} marker, so the export that wrote this dir did not finish (or it was written "
            "before markers existed); re-export it, or, if you know it is whole, mark it with "
            "`python -c 'from mengzi_ray import storage; storage.mark_complete(\"DIR\")'`"
        )
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{marker}: not a completion marker ({exc})") from None
    wrong = [
        name for name, size in files.items() if not (base / name).is_file() or (base / name).stat().st_size != size
    ]
    if wrong:
        raise ValueError(f"{base}: files {wrong[:5]} are missing or differ from its {COMPLETE_MARKER} marker")


def publish_dir(local_dir: str | Path, uri: str) -> str:
    """Publish a local dir as `uri` so that a reader sees the old dir, or the whole new one with its marker:
    locally it is copied to a temp sibling, marked, and renamed into place (the old dir removed after); on S3 the
    old marker and files are deleted, the files uploaded and the marker written last. Returns the URI."""
    if not is_remote(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged, old = _temp_sibling(target, "tmp"), _temp_sibling(target, "old")
        shutil.copytree(local_dir, staged)
        mark_complete(staged)
        if target.exists():
            os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)
        return uri
    mark_complete(local_dir)
    fs, path = filesystem_for(uri)
    path = path.rstrip("/")
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)  # the marker goes with it, so readers refuse the dir until it is whole again
    for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        write_bytes(f"s3://{path}/{file.relative_to(local_dir).as_posix()}", file.read_bytes())
    write_bytes(f"s3://{path}/{COMPLETE_MARKER}", (Path(local_dir) / COMPLETE_MARKER).read_bytes())
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
