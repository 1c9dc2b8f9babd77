"""Small I/O helpers shared by every stage: atomic outputs, manifests, fingerprints.

Nothing half-written is ever left behind: a stage writes into a temporary sibling
directory and renames it over the final one only when everything succeeded.

A stage replaces only a directory that it wrote itself: every output directory carries a
marker file (``.kadapter-output.json``) naming its stage, and a non-empty directory without
that mark, one of another stage, the repository root, the home directory or a filesystem
root is refused (``UnsafeOutputError``). Temporaries carry the id of the process that made
them; the next run removes those whose process is gone and says how many.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

from kadapter.config import ConfigError


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
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
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


# --------------------------------------------------------------------------- output directories

OUTPUT_MARKER = ".kadapter-output.json"
"""Written into every output directory: ``{"stage": name}``; only that stage replaces it."""


class UnsafeOutputError(ConfigError):
    """An output directory that this stage must not replace (user data, another stage's)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        super().__init__(f"output directory {path}: {problem}")


def output_stage(directory: str | Path) -> str | None:
    """The stage that marked ``directory`` as its output (the marker file, or for outputs of
    earlier versions the ``stage`` of its manifest.json), else None."""
    directory = Path(directory)
    for name in (OUTPUT_MARKER, "manifest.json"):
        try:
            stage = orjson.loads((directory / name).read_bytes()).get("stage")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(stage, str):
            return stage
    return None


def _protected_dirs() -> set[Path]:
    """The working directory, the home directory and the project's root."""
    return {Path.cwd().resolve(), Path.home().resolve(), Path(__file__).resolve().parents[1]}


def check_output_dir(directory: str | Path, stage: str) -> None:
    """Refuse (UnsafeOutputError) to let ``stage`` replace or clear ``directory`` unless it
    is new, empty, or marked as ``stage``'s own output."""
    directory = Path(directory)
    resolved = directory.resolve()
    if resolved == resolved.parent or resolved in _protected_dirs() or (resolved / ".git").exists():
        raise UnsafeOutputError(directory, "is a filesystem root, the home directory or a "
                                           "repository root; a stage never replaces it")
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UnsafeOutputError(directory, "exists and is not a directory")
    owner = output_stage(directory)
    if owner == stage:
        return
    if owner is not None:
        raise UnsafeOutputError(directory, f"holds the outputs of stage {owner!r}, not {stage!r}; "
                                           "choose another output_dir")
    entries = [p for p in directory.iterdir() if not _is_own_temporary(p)]
    if not entries:
        return
    others = sorted(f"{p.name} ({output_stage(p)})" for p in entries
                    if p.is_dir() and output_stage(p) is not None)
    held = f"; it holds other stages' outputs: {', '.join(others)}" if others else ""
    raise UnsafeOutputError(directory, f"is not empty and was not written by stage {stage!r} "
                                       f"(no {OUTPUT_MARKER}){held}; choose a new or empty "
                                       "output_dir, or remove it yourself")


def mark_output_dir(directory: str | Path, stage: str) -> None:
    """Mark ``directory`` as ``stage``'s output (the marker file)."""
    if output_stage(directory) != stage or not (Path(directory) / OUTPUT_MARKER).is_file():
        atomic_write_json(Path(directory) / OUTPUT_MARKER, {"stage": stage})


def claim_output_dir(directory: str | Path, stage: str) -> Path:
    """For outputs written in place (a training run): check, create and mark ``directory``."""
    directory = Path(directory)
    check_output_dir(directory, stage)
    directory.mkdir(parents=True, exist_ok=True)
    mark_output_dir(directory, stage)
    return directory
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
def atomic_output_dir(final: str | Path, *, stage: str) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``final`` whole.

    ``final`` must be new, empty or ``stage``'s own output (checked before any work, and
    again before the swap). On any exception the temporary directory is removed and
    ``final`` is untouched.
    """
    final = Path(final)
    check_output_dir(final, stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temporary_prefix(final.name),
                                suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual mode
    try:
        mark_output_dir(tmp, stage)
        yield tmp
        replace_dir(tmp, final, stage=stage)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(source: str | Path, final: str | Path, *, stage: str) -> None:
    """Rename the directory ``source`` over ``final`` (an old ``final`` is moved aside
    first and removed only after the swap). ``final`` must be new, empty or ``stage``'s."""
    final = Path(final)
    check_output_dir(final, stage)
    remove_stale_temporaries(final.parent, final.name)
    mark_output_dir(source, stage)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(source, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, final)


# --------------------------------------------------------------------------- stale temporaries


def _temporary_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _temporary_pattern(name: str) -> re.Pattern[str]:
    """``.<name>.<pid>.<random>.tmp`` (atomic writes) and ``.<name>.old-<pid>`` (swaps)."""
    return re.compile(rf"\.{re.escape(name)}\.(?:(\d+)\.[^.]+\.tmp|old-(\d+))")


def _is_own_temporary(path: Path) -> bool:
    return re.fullmatch(r"\..+\.(?:\d+\.[^.]+\.tmp|old-\d+)", path.name) is not None


def _owner_may_be_running(pid: int, made: float) -> bool:
    """Whether process ``pid`` is running and is old enough to have made a temporary at
    time ``made`` (a running process started later only reuses the id)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: running
    try:  # Linux: start time in clock ticks after boot (field 22 of /proc/<pid>/stat)
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return True
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= made + 1.0


def remove_stale_temporaries(parent: str | Path, name: str) -> int:
    """Remove the temporaries of ``parent/name`` left by killed processes (by their naming
    pattern, only those whose process is gone or started after they were made); an old
    output moved aside by a killed swap comes back when ``name`` is missing. Prints and
    returns how many were removed."""
    parent = Path(parent)
    pattern = _temporary_pattern(name)
    removed = 0
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return 0
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid():
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if _owner_may_be_running(pid, mtime):
            continue  # its process may still be writing it
        path = Path(entry.path)
        if match.group(2) and not (parent / name).exists():
            os.replace(path, parent / name)  # a swap killed between its two renames
            print(f"{parent / name}: restored the previous output from {path.name}")
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    if removed:
        print(f"{parent / name}: removed {removed} stale temporar{'y' if removed == 1 else 'ies'} "
              "left by killed runs")
    return removed


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


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each non-blank line of a file, streamed; an unreadable
    file is a FileNotFoundError naming it."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read: {err}") from err
    with handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSON-lines file, streamed.

    A line that is not valid JSON, or not a JSON object, is an InputError naming the file
    and ``line N``; an unreadable file is a FileNotFoundError naming it.
    """
    for number, line in jsonl_lines(path):
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
