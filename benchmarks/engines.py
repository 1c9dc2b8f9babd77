"""Local engine vs Ray, both data stages, on the same generated input.

    python benchmarks/engines.py [--trex-mb 48] [--deps-lines 1200] [--workers 1 2]

For each stage and each worker count N, the local engine with ``workers: N`` and Ray
(a local Ray started with N CPUs) each run the stage, after an untimed warm-up, on a
small and on a full input
(T-REx: ``--trex-mb`` of JSON in 8 files from benchmarks/trex_throughput.py's
generator, and a sixth of it; dependencies: ``--deps-lines`` lines of the sample's
prose, and a sixth of it). The difference of the two runs is the marginal rate, which
leaves out every fixed cost (process and actor start-up, model loading): per worker, the
rate a cluster multiplies (N nodes of W workers ~ N x W x that rate, as long as the
driver keeps up). Ray's own start-up (``ray.init``) is timed separately. Writes
runs/bench/engines.json: per stage, engine and N the seconds of both runs, the
marginal and per-worker rates, Ray start-up, the ratio Ray / local of the per-worker
rates (target: >= 0.8), and whether all outputs are byte-identical. The load average
is recorded too: on a shared machine wall-clock rates move with it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from deps_throughput import sample_lines  # noqa: E402
from trex_throughput import build_input  # noqa: E402

from kadapter.deps import DepsConfig, build_deps  # noqa: E402
from kadapter.io import atomic_write_json, versions  # noqa: E402
from kadapter.trex import TrexConfig, build_trex_rc  # noqa: E402

TARGET_RATIO = 0.8


def digest(directory: Path, names: tuple[str, ...]) -> str:
    sha = hashlib.sha256()
    for name in names:
        sha.update((directory / name).read_bytes())
    return sha.hexdigest()


def timed(function, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(**kwargs)
    return time.perf_counter() - started, result


def trex_job(input_dir: Path, out: Path, engine: str, workers: int):
    config = TrexConfig(input=str(input_dir), min_entity_count=3, min_relation_pairs=3,
                        engine=engine, workers=workers)
    return lambda: build_trex_rc(config, seed=42, output_dir=out)


def deps_job(input_dir: Path, out: Path, engine: str, workers: int):
    config = DepsConfig(input=str(input_dir), output_dir=str(out), min_words=1, max_words=1000,
                        engine=engine, workers=workers, batch_size=64)
    return lambda: build_deps(config, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trex-mb", type=float, default=48.0)
    parser.add_argument("--deps-lines", type=int, default=1200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--source", default=str(REPO / "data/sample/trex/*.json"),
                        help="T-REx JSON to replicate (e.g. ../shared/real/trex-sample-output.json)")
    parser.add_argument("--out", default=str(REPO / "runs/bench/engines.json"))
    args = parser.parse_args()

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="engines_bench_"))
    try:
        # inputs: (small, full) per stage, in units of MB (T-REx) and sentences (deps)
        inputs = {}
        for name, mb in (("small", args.trex_mb / 6), ("full", args.trex_mb)):
            (scratch / f"trex-{name}").mkdir()
            inputs[("trex", name)] = (scratch / f"trex-{name}",
                                      build_input(scratch / f"trex-{name}", mb, 8, args.source)["input_mb"])
        for name, count in (("small", args.deps_lines // 6), ("full", args.deps_lines)):
            (scratch / f"deps-{name}").mkdir()
            (scratch / f"deps-{name}/in.txt").write_text(
                "\n".join(sample_lines(count)) + "\n", encoding="utf-8")
            inputs[("deps", name)] = (scratch / f"deps-{name}", None)  # sentences: from the manifest
        stages = {"trex": (trex_job, ("train.parquet", "dev.parquet", "relations.json"), "MB"),
                  "deps": (deps_job, ("train.parquet", "dev.parquet"), "sentences")}
        report: dict = {"stages": {}, "ray_startup_seconds": {}, "load_average_before": os.getloadavg()}
        digests: dict = {stage: set() for stage in stages}
        for workers in args.workers:
            for engine in ("local", "ray"):
                if engine == "ray":
                    seconds, _ = timed(ray.init, num_cpus=workers, include_dashboard=False,
                                       log_to_driver=False, object_store_memory=500 * 2**20,
                                       configure_logging=False)
                    report["ray_startup_seconds"][str(workers)] = round(seconds, 2)
                try:
                    for stage, (job, names, unit) in stages.items():
                        # warm-up (imports, Arrow kernels, Ray's first workers): untimed
                        job(inputs[(stage, "small")][0], scratch / f"warm-up-{stage}", engine, workers)()
                        row = {}
                        for size in ("small", "full"):
                            input_dir, amount = inputs[(stage, size)]
                            out = scratch / f"out-{stage}-{engine}-{workers}-{size}"
                            seconds, manifest = timed(job(input_dir, out, engine, workers))
                            row[f"{size}_seconds"] = round(seconds, 2)
                            if amount is None:
                                amount = manifest["counts"]["sentences"]["kept"]
                            row[f"{size}_{unit.lower()}"] = amount
                            if size == "full":
                                digests[stage].add(digest(out, names))
                        extra = row["full_seconds"] - row["small_seconds"]
                        # a difference under a tenth of the full run is noise (a loaded machine)
                        marginal = (None if extra < 0.1 * row["full_seconds"] else
                                    (row[f"full_{unit.lower()}"] - row[f"small_{unit.lower()}"]) / extra)
                        row[f"{unit.lower()}_per_s"] = marginal and round(marginal, 1)
                        row[f"{unit.lower()}_per_s_per_worker"] = marginal and round(marginal / workers, 1)
                        report["stages"].setdefault(stage, {}).setdefault(engine, {})[str(workers)] = row
                        rate = ("too noisy to tell" if marginal is None else
                                f"{marginal:.1f} {unit}/s, {marginal / workers:.1f} per worker")
                        print(f"{stage} {engine} workers={workers}: {row['small_seconds']}s / "
                              f"{row['full_seconds']}s -> {rate}", flush=True)
                finally:
                    if engine == "ray":
                        ray.shutdown()
        for stage, (_, _, unit) in stages.items():
            key = f"{unit.lower()}_per_s_per_worker"
            by_engine = report["stages"][stage]
            report["stages"][stage]["ray_vs_local_per_worker"] = {
                str(w): (round(by_engine["ray"][str(w)][key] / by_engine["local"][str(w)][key], 2)
                         if by_engine["ray"][str(w)][key] and by_engine["local"][str(w)][key]
                         else None)
                for w in args.workers}
            report["stages"][stage]["outputs_identical"] = len(digests[stage]) == 1
            print(f"{stage}: Ray / local per-worker rate "
                  f"{report['stages'][stage]['ray_vs_local_per_worker']}, outputs identical "
                  f"across engines and worker counts: {len(digests[stage]) == 1}")
        report.update({"target_ratio": TARGET_RATIO, "load_average_after": os.getloadavg(),
                       "cpu_count": os.cpu_count(), "source": args.source, "versions": versions()})
        atomic_write_json(args.out, report)
        print(f"Ray start-up (ray.init) {report['ray_startup_seconds']} s; wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
