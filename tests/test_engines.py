"""engine: ray gives the local engine's bytes (T-REx and dependency stages), survives a
killed worker, treats bad input alike; inputs and outputs by fsspec URL."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kadapter.deps import DepsConfig, build_deps
from kadapter.io import OUTPUT_MARKER, InputError, UnsafeOutputError
from kadapter.trex import WIKIDATA_ENTITY, TrexConfig, build_trex_rc

ray = pytest.importorskip("ray")

TREX_OUTPUTS = ("train.parquet", "dev.parquet", "relations.json")
DEPS_OUTPUTS = ("train.parquet", "dev.parquet")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs, a small object store) for the module, shut down after."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=400 * 2**20,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def renamed(uri: str, group: int) -> str:
    """Q123 -> Q1232 (group 2): n -> 10n + group is one-to-one and still an entity URI."""
    return f"{uri}{group}" if uri.startswith(WIKIDATA_ENTITY + "Q") else uri


def generated_dump(directory: Path, repo_root: Path, files: int, copies: int) -> Path:
    """``files`` T-REx files, each ``copies`` perturbed copies of the sample's documents
    (own docids; entity URIs renamed into 3 groups so the filters have work to do)."""
    documents = [doc for path in sorted((repo_root / "data/sample/trex").glob("*.json"))
                 for doc in json.loads(path.read_text(encoding="utf-8"))]
    directory.mkdir(parents=True)
    copy = 0
    for index in range(files):
        chunk = []
        for _ in range(copies):
            group = copy % 3
            for doc in documents:
                chunk.append(dict(
                    doc, docid=f"{doc['docid']}/copy{copy}",
                    entities=[dict(e, uri=renamed(e["uri"], group)) for e in doc["entities"]],
                    triples=[dict(t, subject=dict(t["subject"], uri=renamed(t["subject"]["uri"], group)),
                                  object=dict(t["object"], uri=renamed(t["object"]["uri"], group)))
                             for t in doc["triples"]]))
            copy += 1
        (directory / f"part-{index:03d}.json").write_text(json.dumps(chunk), encoding="utf-8")
    return directory


def trex_run(inputs, out: Path, **overrides) -> dict:
    settings = {"min_entity_count": 3, "min_relation_pairs": 3, "dev_fraction": 0.2, **overrides}
    return build_trex_rc(TrexConfig(input=inputs, **settings), seed=5, output_dir=out)


def same_outputs(first: Path, second: Path, names) -> None:
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (first, second)]
    for key in ("counts", "relations", "relations_dropped_by_pair_filter", "skipped_line_examples",
                "empty_files"):
        assert manifests[0].get(key) == manifests[1].get(key), key


def kill_when(condition, title: str, found: list, thread: threading.Thread) -> None:
    """Once ``condition()`` holds, SIGKILL the first of this test's Ray worker processes
    (descendants of this process) whose title starts with ``title``: the worker running
    that task or actor. Its pid goes into ``found``."""
    import psutil

    me = psutil.Process(os.getpid())
    while not found and thread.is_alive():
        if condition():
            for process in me.children(recursive=True):
                try:
                    name = process.name()
                except psutil.NoSuchProcess:
                    continue
                if name.startswith(title):
                    os.kill(process.pid, signal.SIGKILL)
                    found.append(process.pid)
                    return
        time.sleep(0.002)


def in_background(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["value"] = function(*args, **kwargs)
        except BaseException as err:  # reported by the test
            result["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


# --------------------------------------------------------------------------- T-REx


def test_trex_same_bytes_on_both_engines(tmp_path, repo_root, local_ray):
    dump = generated_dump(tmp_path / "dump", repo_root, files=5, copies=6)  # 2,880 documents
    for name, inputs in (("sample", str(repo_root / "data/sample/trex")), ("dump", str(dump))):
        local = tmp_path / f"{name}-local"
        manifest = trex_run(inputs, local, workers=2)
        trex_run(inputs, tmp_path / f"{name}-ray", engine="ray", workers=2)
        same_outputs(local, tmp_path / f"{name}-ray", TREX_OUTPUTS)
        assert manifest["counts"]["examples"]["dev"] > 0
    assert manifest["counts"]["documents"] == 2880 and manifest["counts"]["files"] == 5


def test_trex_killed_worker_is_retried(tmp_path, repo_root, local_ray):
    dump = generated_dump(tmp_path / "dump", repo_root, files=8, copies=4)
    trex_run(str(dump), tmp_path / "local")
    killed: list = []
    thread, result = in_background(trex_run, str(dump), tmp_path / "ray", engine="ray",
                                   workers=2)
    kill_when(lambda: True, "ray::MapBatches(_scan_files)", killed, thread)
    thread.join()
    assert killed, "no scan task was seen running"
    assert "error" not in result, result.get("error")
    same_outputs(tmp_path / "local", tmp_path / "ray", TREX_OUTPUTS)


def test_trex_bad_input_as_on_the_local_engine(tmp_path, repo_root, local_ray):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in (repo_root / "data/sample/trex").glob("*.json"):
        (inputs / path.name).write_bytes(path.read_bytes())
    documents = json.loads((inputs / "people-1.json").read_text())
    documents[1]["triples"][0]["sentence_id"] = 99
    documents[2] = [1, 2]
    (inputs / "people-1.json").write_text(json.dumps(documents))
    (inputs / "zz-broken.json").write_bytes(b'[{"docid": ')
    errors = []
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as err:
            trex_run(str(inputs), tmp_path / engine, engine=engine)
        errors.append(str(err.value))
        assert not (tmp_path / engine).exists()
        trex_run(str(inputs), tmp_path / engine, engine=engine, on_error="skip")
    assert errors[0] == errors[1]
    assert "people-1.json, record document 1" in errors[0]
    same_outputs(tmp_path / "local", tmp_path / "ray", TREX_OUTPUTS)
    counts = json.loads((tmp_path / "ray/manifest.json").read_text())["counts"]
    assert counts["files_skipped_invalid_json"] == 1
    assert counts["triples_dropped"]["bad_sentence_id"] == 1
    assert counts["documents_skipped_by_reason"]["malformed_document"] == 1


class OpenedFiles:
    """The names of the files opened in a directory, by any process, while in the
    ``with`` block (Linux inotify through libc; no cooperation from the code watched)."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, directory: Path):
        self.directory, self.names = directory, set()

    def __enter__(self) -> OpenedFiles:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(
                self.fd, str(self.directory).encode(), self.IN_OPEN) < 0:
            pytest.skip("inotify is not available here")
        return self

    def __exit__(self, *exc) -> None:
        import struct

        data = b""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            data += chunk
        os.close(self.fd)
        while data:  # struct inotify_event: wd, mask, cookie, len, then the name
            _, _, _, length = struct.unpack_from("iIII", data)
            if length:  # an event on the directory itself has no name
                self.names.add(data[16:16 + length].rstrip(b"\0").decode())
            data = data[16 + length:]


def test_trex_first_bad_file_stops_the_scan(tmp_path, repo_root, local_ray):
    """With on_error: raise, a bad first file is reported as soon as it is parsed, and
    the files after it are not parsed (Ray Data, left to itself, parsed them all first;
    each takes ~0.1 s here), then or afterwards."""
    dump = generated_dump(tmp_path / "dump", repo_root, files=16, copies=4)  # ~5.6 MB a file
    (dump / "part-000.json").write_bytes(b'[{"docid": ')
    for engine in ("local", "ray"):
        with OpenedFiles(dump) as opened:
            with pytest.raises(InputError, match="part-000.json"):
                trex_run(str(dump), tmp_path / engine, engine=engine, workers=2)
            time.sleep(1.5)  # time enough for scans still running to open the other files
        assert "part-000.json" in opened.names
        assert len(opened.names) <= 8, (engine, sorted(opened.names))


def test_trex_docid_repeated_across_files_as_on_the_local_engine(tmp_path, repo_root, local_ray):
    """A document of one file again in a later one: the same error on both engines under
    raise; under skip the same counted skip and the bytes of a run without the copy."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in (repo_root / "data/sample/trex").glob("*.json"):
        (inputs / path.name).write_bytes(path.read_bytes())
    trex_run(str(inputs), tmp_path / "without")
    repeated = json.loads((inputs / "people-1.json").read_text())[2]
    (inputs / "zz-copy.json").write_text(json.dumps([repeated]))
    errors = []
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as err:
            trex_run(str(inputs), tmp_path / engine, engine=engine, workers=2)
        errors.append(str(err.value))
        assert not (tmp_path / engine).exists()
        trex_run(str(inputs), tmp_path / engine, engine=engine, workers=2, on_error="skip")
    assert errors[0] == errors[1]
    assert (f"zz-copy.json, record document 0 (docid {repeated['docid']}): docid also in "
            f"{inputs / 'people-1.json'}") in errors[0]
    same_outputs(tmp_path / "local", tmp_path / "ray", TREX_OUTPUTS)
    for name in TREX_OUTPUTS:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "without" / name).read_bytes()
    counts = json.loads((tmp_path / "ray/manifest.json").read_text())["counts"]
    assert counts["documents_skipped_by_reason"]["duplicate_docid"] == 1
    assert counts["triples_dropped"]["in_skipped_document"] == len(repeated["triples"])


def test_trex_inputs_and_outputs_by_url(tmp_path, repo_root):
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in sorted((repo_root / "data/sample/trex").glob("*.json")):
        memory.pipe(f"/trex-in/{path.name}", path.read_bytes())
    trex_run("memory://trex-in/*.json", "memory://trex-out")
    trex_run(str(repo_root / "data/sample/trex"), tmp_path / "local")
    for name in TREX_OUTPUTS:
        assert memory.cat(f"/trex-out/{name}") == (tmp_path / "local" / name).read_bytes()
    assert json.loads(memory.cat(f"/trex-out/{OUTPUT_MARKER}")) == {"stage": "data_trex"}
    trex_run("memory://trex-in/*.json", "memory://trex-out")  # its own output: replaced
    memory.pipe("/user-data/notes.txt", b"mine")
    with pytest.raises(UnsafeOutputError, match="was not written by stage 'data_trex'"):
        trex_run("memory://trex-in/*.json", "memory://user-data")
    with pytest.raises(UnsafeOutputError, match="holds the outputs of stage 'data_trex'"):
        deps_run(repo_root / "data/sample/books", "memory://trex-out")
    assert memory.cat("/user-data/notes.txt") == b"mine"
    manifest = json.loads(memory.cat("/trex-out/manifest.json"))
    first = manifest["inputs"][0]["path"]
    assert first.startswith("memory://") and first.endswith("/trex-in/countries-europe.json")
    assert manifest["counts"] == json.loads((tmp_path / "local/manifest.json").read_text())["counts"]


# --------------------------------------------------------------------------- dependencies


def books(directory: Path, repo_root: Path, files: int, lines: int) -> Path:
    """``files`` text files of ``lines`` lines of the sample's prose each, plus bad lines."""
    prose = [line for path in sorted((repo_root / "data/sample/books").glob("*.txt"))
             for line in path.read_bytes().splitlines()]
    directory.mkdir(parents=True)
    for index in range(files):
        part = prose[index * lines:(index + 1) * lines]
        # binary junk past the up-front sniff (SNIFF_BYTES), then more prose
        body = (b"\n".join(part[:-5]) + b"\ncaf\xe9 undecodable\n" + b"long " * 5000
                + b"\nbinary \0 junk\n" + b"\n".join(part[-5:]) + b"\n")
        (directory / f"book-{index:02d}.txt").write_bytes(body)
    return directory


def deps_run(inputs, out: Path, **overrides) -> dict:
    settings = {"dev_fraction": 0.2, "batch_size": 32, "max_line_chars": 2000, **overrides}
    return build_deps(DepsConfig(input=str(inputs), output_dir=str(out), **settings), seed=3)


def test_deps_same_bytes_on_both_engines(tmp_path, repo_root, local_ray):
    inputs = books(tmp_path / "books", repo_root, files=3, lines=70)
    deps_run(inputs, tmp_path / "local")
    deps_run(inputs, tmp_path / "ray", engine="ray", workers=2)
    same_outputs(tmp_path / "local", tmp_path / "ray", DEPS_OUTPUTS)
    manifest = json.loads((tmp_path / "ray/manifest.json").read_text())
    assert manifest["counts"]["lines"]["undecodable"] == 3
    assert manifest["counts"]["lines"]["too_long"] == 3
    assert manifest["counts"]["lines"]["binary"] == 3  # a NUL byte mid-file, on both engines
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == [
        OUTPUT_MARKER, "dev.parquet", "manifest.json", "train.parquet"], "the pieces are cleaned up"

    # stopping at max_sentences: the same sentences and counts
    deps_run(inputs, tmp_path / "local-max", max_sentences=100)
    deps_run(inputs, tmp_path / "ray-max", engine="ray", workers=2, max_sentences=100)
    same_outputs(tmp_path / "local-max", tmp_path / "ray-max", DEPS_OUTPUTS)


def test_deps_killed_parser_is_retried(tmp_path, repo_root, local_ray):
    inputs = books(tmp_path / "books", repo_root, files=2, lines=80)
    deps_run(inputs, tmp_path / "local", batch_size=8)
    killed: list = []
    thread, result = in_background(deps_run, inputs, tmp_path / "ray", engine="ray",
                                   workers=2, batch_size=8)

    def first_piece_written() -> bool:
        return any(tmp_path.glob(".ray*/.pieces/*.parquet"))

    kill_when(first_piece_written, "ray::MapWorker", killed, thread)
    thread.join()
    assert killed, "no parser was seen at work"
    assert "error" not in result, result.get("error")
    same_outputs(tmp_path / "local", tmp_path / "ray", DEPS_OUTPUTS)


def test_deps_bad_input_as_on_the_local_engine(tmp_path, local_ray):
    (tmp_path / "books").mkdir()
    (tmp_path / "books/a.txt").write_bytes(b"\x1f\x8b\x08\x00\x00binary")
    errors = []
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as err:
            deps_run(tmp_path / "books", tmp_path / engine, engine=engine)
        errors.append(str(err.value))
    (tmp_path / "books/a.txt").write_bytes(b"* * *\n\n1 2 3\n")
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as err:
            deps_run(tmp_path / "books", tmp_path / engine, engine=engine)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "NUL bytes" in errors[0]
    assert errors[2] == errors[3] and "no sentence kept" in errors[2]
    assert not (tmp_path / "local").exists() and not (tmp_path / "ray").exists()


def test_deps_inputs_and_outputs_by_url(tmp_path, repo_root):
    import fsspec

    memory = fsspec.filesystem("memory")
    inputs = books(tmp_path / "books", repo_root, files=2, lines=15)
    for path in sorted(inputs.iterdir()):
        memory.pipe(f"/books-in/{path.name}", path.read_bytes())
    deps_run("memory://books-in", "memory://books-out")
    deps_run(inputs, tmp_path / "local")
    for name in DEPS_OUTPUTS:
        assert memory.cat(f"/books-out/{name}") == (tmp_path / "local" / name).read_bytes()
    manifest = json.loads(memory.cat("/books-out/manifest.json"))
    local = json.loads((tmp_path / "local/manifest.json").read_text())
    assert manifest["counts"] == local["counts"]
    assert [i["sha256"] for i in manifest["inputs"]] == [i["sha256"] for i in local["inputs"]]
    assert manifest["skipped_line_examples"][0]["file"].startswith("memory://")
