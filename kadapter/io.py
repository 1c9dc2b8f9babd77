"""Small I/O helpers shared by every stage: atomic outputs, manifests, fingerprints.

Nothing half-written is ever left behind: a stage writes into a temporary sibling
directory and renames it over the final one only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson


def json_dumps(obj: Any) -> bytes:
    """Deterministic, human-readable JSON (sorted keys, 2-space indent, trailing newline)."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, json_dumps(obj))


def ordinary_permissions(path: str | Path) -> None:
    """Give a written file the mode an ordinary ``open()`` would (0644 under umask 022):
    safetensors and ``tempfile`` create files 0600."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_save_safetensors(tensors: dict[str, Any], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` via a temporary sibling, with ordinary permissions."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``final`` whole.

    On any exception the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual mode
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: str | Path, final: str | Path) -> None:
    """Rename the directory ``source`` over ``final`` (an old ``final`` is moved aside
    first and removed only after the swap)."""
    final = Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(source, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, final)


def expand_inputs(spec: str | Path | list[str], suffixes: tuple[str, ...] = ()) -> list[Path]:
    """A file, a directory (its files, recursively), a glob, or a list of these -> sorted paths.

    Raises FileNotFoundError naming the spec when nothing matches.
    """
    specs = spec if isinstance(spec, list) else [spec]
    found: set[Path] = set()
    for item in specs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            matches = [p for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()]
        if suffixes:
            matches = [p for p in matches if p.name.endswith(suffixes)]
        matches = [p for p in matches if not p.name.startswith(".")]
        if not matches:
            want = f" with suffix {'/'.join(suffixes)}" if suffixes else ""
            raise FileNotFoundError(f"input {item!r}: no files found{want}")
        found.update(matches)
    return sorted(found)


def file_fingerprint(path: str | Path, full_hash: bool = True) -> dict[str, Any]:
    """Path, size and (unless ``full_hash`` is False) the sha256 of a file's bytes."""
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size}
    if full_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        entry["sha256"] = digest.hexdigest()
    return entry


def fingerprint_of(obj: Any) -> str:
    """A short stable hash of any JSON-serialisable object."""
    return hashlib.sha256(json_dumps(obj)).hexdigest()[:16]


_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "pyarrow",
    "pandas",
    "orjson",
    "spacy",
    "stanza",
)


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that shape outputs."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        found["kadapter"] = metadata.version("kadapter")
    except metadata.PackageNotFoundError:
        pass
    return found


def split_of(key: str, seed: int, dev_fraction: float) -> str:
    """``"dev"`` for a seeded-hash share ``dev_fraction`` of keys, else ``"train"``.

    Depends only on (key, seed): the same key (a document id, a sentence) always lands on
    the same side, whatever the file order or the number of workers.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=str(seed).encode()).digest()
    return "dev" if int.from_bytes(digest, "big") < dev_fraction * 2**64 else "train"


def read_json(path: str | Path) -> Any:
    """Read a JSON file; an unreadable file is a FileNotFoundError and invalid JSON (or
    invalid UTF-8) an InputError, both naming the file."""
    path = Path(path)
    try:
        return orjson.loads(path.read_bytes())
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read: {err}") from err
    except orjson.JSONDecodeError as err:
        raise InputError(path, None, f"not valid JSON: {err}") from err


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSON-lines file, streamed.

    A line that is not valid JSON, or not a JSON object, is an InputError naming the file
    and ``line N``; an unreadable file is a FileNotFoundError naming it.
    """
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read: {err}") from err
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise InputError(path, f"line {number}", f"not valid JSON: {err}") from None
            if not isinstance(record, dict):
                raise InputError(path, f"line {number}",
                                 f"expected a JSON object, got {type(record).__name__}")
            yield number, record


class InputError(ValueError):
    """Bad input data. The message names the file and the record (index or id)."""

    def __init__(self, path: str | Path, record: Any, problem: str):
        self.path, self.record, self.problem = str(path), record, problem
        where = f"{path}" if record is None else f"{path}, record {record}"
        super().__init__(f"{where}: {problem}")
