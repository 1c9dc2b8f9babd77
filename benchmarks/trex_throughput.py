"""Throughput of the T-REx stage: MB of raw T-REx JSON per second, with 1 and 2 workers.

    python benchmarks/trex_throughput.py [--mb 256] [--files 16] [--workers 1 2] [--source GLOB]

Builds a large input in the exact dump format by replicating the sample documents
(data/sample/trex, or ``--source``, e.g. ../shared/real/trex-sample-output.json, whose
abstracts have the real dump's mix of words, mentions and triples) with perturbations: every copy gets its own docid, and its entity
URIs are renamed into one of ten groups, so entity counts and the filters behave as on
a bigger corpus. The input is compact JSON (no indentation), so MB/s counts only bytes
that carry data. Runs the whole stage (parse, count, filter, split, write parquet) once
per worker count on the same input and writes runs/bench/trex_throughput.json:
``input_mb``, and per worker count ``seconds``, ``mb_per_s``, ``mb_per_s_per_worker``,
``cpu_seconds`` (this process and its workers) and ``mb_per_cpu_s`` (the per-worker rate
on a quiet core, which a shared machine's wall clock hides), plus the speed-up of each
worker count over 1 worker. Target: 100 MB/s per worker.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kadapter.io import atomic_write_json, versions  # noqa: E402
from kadapter.trex import WIKIDATA_ENTITY, TrexConfig, build_trex_rc  # noqa: E402

TARGET_MB_PER_S_PER_WORKER = 100.0


def renamed(uri: str, group: int) -> str:
    """Q123 -> Q1234 (group 4; n -> 10n + group is one-to-one, and still an entity URI):
    the same entity within a group, another one across groups."""
    return f"{uri}{group}" if uri.startswith(WIKIDATA_ENTITY + "Q") else uri


def perturbed(doc: dict, copy: int) -> dict:
    group = copy % 10
    doc = dict(doc, docid=f"{doc['docid']}/copy{copy}")
    doc["entities"] = [dict(e, uri=renamed(e["uri"], group)) for e in doc["entities"]]
    doc["triples"] = [
        dict(t, subject=dict(t["subject"], uri=renamed(t["subject"]["uri"], group)),
             object=dict(t["object"], uri=renamed(t["object"]["uri"], group)))
        for t in doc["triples"]
    ]
    return doc


def build_input(directory: Path, target_mb: float, files: int, source: str) -> dict:
    documents = []
    for path in sorted(glob.glob(source)):
        documents.extend(orjson.loads(Path(path).read_bytes()))
    if not documents:
        raise SystemExit(f"no T-REx documents found at {source}")
    per_file = target_mb * 1e6 / files
    copy, total_docs, total_triples, total_bytes = 0, 0, 0, 0
    for index in range(files):
        chunk, size = [], 0
        while size < per_file:
            for doc in documents:
                new = perturbed(doc, copy)
                chunk.append(new)
                size += len(orjson.dumps(new)) + 1
                total_triples += len(new["triples"])
            copy += 1
        data = orjson.dumps(chunk)
        (directory / f"trex-{index:04d}.json").write_bytes(data)
        total_docs += len(chunk)
        total_bytes += len(data)
    return {"input_mb": round(total_bytes / 1e6, 2), "files": files,
            "documents": total_docs, "triples": total_triples}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for name in ("train.parquet", "dev.parquet", "relations.json"):
        sha.update((directory / name).read_bytes())
    return sha.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0, help="input size in MB (default 256)")
    parser.add_argument("--files", type=int, default=16, help="number of input files")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--source", default=str(REPO / "data/sample/trex/*.json"),
                        help="T-REx JSON file(s) to replicate (a path or glob)")
    parser.add_argument("--out", default=str(REPO / "runs/bench/trex_throughput.json"))
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="trex_bench_", dir=REPO / "runs" if (REPO / "runs").is_dir() else None))
    try:
        input_dir = scratch / "input"
        input_dir.mkdir()
        started = time.perf_counter()
        summary = build_input(input_dir, args.mb, args.files, args.source)
        print(f"built {summary['input_mb']} MB in {summary['files']} files "
              f"({summary['documents']} documents, {summary['triples']} triples) "
              f"in {time.perf_counter() - started:.1f}s")
        results, digests = {}, set()
        for workers in args.workers:
            config = TrexConfig(input=str(input_dir), min_entity_count=3, min_relation_pairs=3,
                                workers=workers)
            output = scratch / f"out-{workers}"
            started, cpu_started = time.perf_counter(), cpu_seconds()
            manifest = build_trex_rc(config, seed=42, output_dir=output)
            seconds = time.perf_counter() - started
            cpu = cpu_seconds() - cpu_started
            mb_per_s = summary["input_mb"] / seconds
            results[str(workers)] = {
                "seconds": round(seconds, 2),
                "mb_per_s": round(mb_per_s, 1),
                "mb_per_s_per_worker": round(mb_per_s / workers, 1),
                "cpu_seconds": round(cpu, 2),
                "mb_per_cpu_s": round(summary["input_mb"] / cpu, 1),
                "examples": manifest["counts"]["after_relation_filter"],
            }
            digests.add(digest(output))
            print(f"workers={workers}: {seconds:.1f}s  {mb_per_s:.1f} MB/s  "
                  f"{mb_per_s / workers:.1f} MB/s per worker  "
                  f"{summary['input_mb'] / cpu:.1f} MB per CPU-second")
        baseline = results[str(args.workers[0])]["seconds"]
        for row in results.values():
            row["speedup_vs_first"] = round(baseline / row["seconds"], 2)
        report = {
            "source": args.source,
            **summary,
            "workers": results,
            "baseline_workers": args.workers[0],
            "outputs_identical_across_workers": len(digests) == 1,
            "target_mb_per_s_per_worker": TARGET_MB_PER_S_PER_WORKER,
            "cpu_count": os.cpu_count(),
            "versions": versions(),
        }
        atomic_write_json(args.out, report)
        print(f"speed-up: {({w: r['speedup_vs_first'] for w, r in results.items()})}; "
              f"outputs identical across worker counts: {len(digests) == 1}; wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
