"""Inputs and outputs by local path or fsspec URL (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

Local paths go through ``kadapter.io`` unchanged (so local runs list, read and write
exactly as before); anything with a ``scheme://`` goes through fsspec, which needs the
filesystem's package (s3fs, gcsfs, pyarrow's HDFS...) installed by the user.

An output directory on a URL is built in a local temporary directory and uploaded when
complete, the stage's output marker first and ``manifest.json`` last: object stores have
no atomic directory rename, so a directory there without its manifest is an unfinished
upload. As locally, a URL that holds files is replaced only when marked as the same
stage's output.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from kadapter.io import (
    OUTPUT_MARKER,
    UnsafeOutputError,
    atomic_output_dir,
    expand_inputs,
    file_fingerprint,
    mark_output_dir,
)

MANIFEST = "manifest.json"


def is_url(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def filesystem_of(path: str | Path):
    """(fsspec filesystem, path inside it) for a URL or a local path."""
    if is_url(path):
        return _filesystem(str(path))
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), str(path)


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:  # the scheme's package is not installed
        raise FileNotFoundError(f"{url}: cannot open this filesystem: {err}") from err


def expand_any(spec: str | Path | list[str], suffixes: tuple[str, ...] = ()) -> list[Any]:
    """``io.expand_inputs`` for local specs; URL specs (a file, a directory searched
    recursively, or a glob) are listed with fsspec and kept as URLs. Sorted, no dot-files."""
    specs = [str(item) for item in (spec if isinstance(spec, list) else [spec])]
    if not any(is_url(item) for item in specs):
        return expand_inputs(specs, suffixes)
    found: set[Any] = set()
    for item in specs:
        if not is_url(item):
            found.update(expand_inputs(item, suffixes))
            continue
        fs, path = _filesystem(item)
        if fs.isdir(path):
            matches = fs.find(path)
        elif fs.isfile(path):
            matches = [path]
        else:
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
        matches = [p for p in matches if p.endswith(suffixes or ("",))
                   and not p.rsplit("/", 1)[-1].startswith(".")]
        if not matches:
            want = f" with suffix {'/'.join(suffixes)}" if suffixes else ""
            raise FileNotFoundError(f"input {item!r}: no files found{want}")
        found.update(fs.unstrip_protocol(p) for p in matches)
    return sorted(found, key=str)


def open_binary(path: str | Path) -> IO[bytes]:
    if is_url(path):
        import fsspec

        _filesystem(path)  # a clear error for a missing filesystem package
        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def read_bytes(path: str | Path) -> bytes:
    with open_binary(path) as handle:
        return handle.read()


def size_of(path: str | Path) -> int:
    if is_url(path):
        fs, inner = _filesystem(path)
        return int(fs.size(inner))
    return Path(path).stat().st_size


def fingerprint_any(path: str | Path, full_hash: bool = True) -> dict[str, Any]:
    """``io.file_fingerprint`` for local files; the same fields for a URL."""
    if not is_url(path):
        return file_fingerprint(path, full_hash=full_hash)
    entry: dict[str, Any] = {"path": str(path), "bytes": size_of(path)}
    if full_hash:
        digest = hashlib.sha256()
        with open_binary(path) as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        entry["sha256"] = digest.hexdigest()
    return entry


def _url_output_stage(fs: Any, target: str) -> str | None:
    """``io.output_stage`` for a directory on a filesystem URL."""
    for name in (OUTPUT_MARKER, MANIFEST):
        try:
            with fs.open(f"{target.rstrip('/')}/{name}", "rb") as handle:
                stage = orjson.loads(handle.read()).get("stage")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(stage, str):
            return stage
    return None


def _check_url_output_dir(fs: Any, final: str, target: str, stage: str) -> None:
    """``io.check_output_dir`` for a URL: new, empty or ``stage``'s own output."""
    if not fs.exists(target):
        return
    if not fs.isdir(target):
        raise UnsafeOutputError(final, "exists and is not a directory")
    owner = _url_output_stage(fs, target)
    if owner == stage:
        return
    if owner is not None:
        raise UnsafeOutputError(final, f"holds the outputs of stage {owner!r}, not {stage!r}; "
                                       "choose another output_dir")
    if fs.ls(target, detail=False):
        raise UnsafeOutputError(final, f"is not empty and was not written by stage {stage!r} "
                                       f"(no {OUTPUT_MARKER}); choose a new or empty "
                                       "output_dir, or remove it yourself")


@contextlib.contextmanager
def output_dir_any(final: str | Path, *, stage: str) -> Iterator[Path]:
    """A local directory to write into, marked as ``stage``'s output; on success it becomes
    ``final``: renamed over it (``io.atomic_output_dir``) or, for a URL, uploaded over it
    with the marker first and the manifest last. ``final`` must be new, empty or
    ``stage``'s own output (checked before any work and again before replacing it)."""
    if not is_url(final):
        with atomic_output_dir(final, stage=stage) as tmp:
            yield tmp
        return
    fs, target = _filesystem(str(final))
    _check_url_output_dir(fs, str(final), target, stage)
    staging = Path(tempfile.mkdtemp(prefix="kadapter-upload-"))
    try:
        mark_output_dir(staging, stage)
        yield staging
        _check_url_output_dir(fs, str(final), target, stage)
        if fs.exists(target):
            fs.rm(target, recursive=True)
        fs.makedirs(target, exist_ok=True)
        names = sorted(p.name for p in staging.iterdir() if p.is_file())
        # the marker first (a partial upload is still this stage's), the manifest last
        for name in sorted(names, key=lambda n: (n != OUTPUT_MARKER, n == MANIFEST)):
            fs.put_file(str(staging / name), f"{target.rstrip('/')}/{name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
