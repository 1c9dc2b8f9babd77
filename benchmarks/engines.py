"""Local engine vs Ray, both data stages, on the same generated input.

    python benchmarks/engines.py [--trex-mb 192] [--deps-lines 7200] [--workers 1 2]
        [--repeats 3] [--stages trex deps]

For each worker count N the two engines take turns, ``--repeats`` rounds (the first
engine alternates from round to round), so the other users of a shared machine weigh on
both alike. In a round an engine runs each stage on a small and on a full input (T-REx:
``--trex-mb`` of JSON in 8 files from benchmarks/trex_throughput.py's generator, and a
sixth of it; dependencies: ``--deps-lines`` lines of the sample's prose, and a sixth of
it), after an untimed warm-up; the Ray rounds start a local Ray with N CPUs each
(``ray.init``, timed apart) and shut it down after. The difference between the full and
the small run is the marginal rate, which leaves out every fixed cost (process and actor
start-up, model loading, Ray Data planning), per wall second and per CPU-second of this
process and every process it starts (benchmarks/cputime.py: pool workers, Ray's raylet,
workers and actors), of which the driver's (this process's) share is given apart. Per
CPU-second is the per-worker rate a cluster multiplies (N nodes of W workers ~ N x W x
that rate, as long as the driver keeps up), and it holds up on a shared machine where
wall-clock rates follow the other users' load.

Writes runs/bench/engines.json: per stage, engine and N the seconds of every run, the
rates from the medians over the rounds, Ray start-up, and the ratios Ray / local of the
per-CPU-second and per-worker wall rates (target: >= 0.8), both from the medians and
round by round (the spread says how far one figure can be trusted), whether all outputs
are byte-identical, and the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cputime import marginal, timed, timed_with_driver  # noqa: E402
from deps_throughput import sample_lines  # noqa: E402
from trex_throughput import build_input  # noqa: E402

from kadapter.deps import DepsConfig, build_deps  # noqa: E402
from kadapter.io import atomic_write_json, versions  # noqa: E402
from kadapter.trex import TrexConfig, build_trex_rc  # noqa: E402

TARGET_RATIO = 0.8
ENGINES = ("local", "ray")


def share(driver: list[float], small: list[float], full: list[float]) -> float | None:
    """The driver's part of the marginal CPU-seconds (medians of the rounds)."""
    extra = statistics.median(full) - statistics.median(small)
    return round((driver[1] - driver[0]) / extra, 2) if extra > 0 else None


def digest(directory: Path, names: tuple[str, ...]) -> str:
    sha = hashlib.sha256()
    for name in names:
        sha.update((directory / name).read_bytes())
    return sha.hexdigest()


def trex_job(input_dir: Path, out: Path, engine: str, workers: int):
    config = TrexConfig(input=str(input_dir), min_entity_count=3, min_relation_pairs=3,
                        engine=engine, workers=workers)
    return lambda: build_trex_rc(config, seed=42, output_dir=out)


def deps_job(input_dir: Path, out: Path, engine: str, workers: int):
    config = DepsConfig(input=str(input_dir), output_dir=str(out), min_words=1, max_words=1000,
                        engine=engine, workers=workers, batch_size=256)
    return lambda: build_deps(config, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Smaller inputs add too little marginal work (~2 CPU-seconds of T-REx at 192 MB) to
    # stand out from the spread of the fixed costs (a second or more with Ray).
    parser.add_argument("--trex-mb", type=float, default=192.0)
    parser.add_argument("--deps-lines", type=int, default=7200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", nargs="+", choices=("trex", "deps"), default=["trex", "deps"])
    parser.add_argument("--source", default=str(REPO / "data/sample/trex/*.json"),
                        help="T-REx JSON to replicate (e.g. ../shared/real/trex-sample-output.json)")
    parser.add_argument("--out", default=str(REPO / "runs/bench/engines.json"))
    args = parser.parse_args()

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="engines_bench_"))
    try:
        # inputs: (small, full) per stage, in units of MB (T-REx) and sentences (deps)
        inputs = {}
        for name, mb in (("small", args.trex_mb / 6), ("full", args.trex_mb)) * ("trex" in args.stages):
            (scratch / f"trex-{name}").mkdir()
            inputs[("trex", name)] = (scratch / f"trex-{name}",
                                      build_input(scratch / f"trex-{name}", mb, 8, args.source)["input_mb"])
        for name, count in (("small", args.deps_lines // 6), ("full", args.deps_lines)) * ("deps" in args.stages):
            (scratch / f"deps-{name}").mkdir()
            (scratch / f"deps-{name}/in.txt").write_text(
                "\n".join(sample_lines(count)) + "\n", encoding="utf-8")
            inputs[("deps", name)] = (scratch / f"deps-{name}", None)  # sentences: from the manifest
        stages = {stage: job for stage, job in (
            ("trex", (trex_job, ("train.parquet", "dev.parquet", "relations.json"), "MB")),
            ("deps", (deps_job, ("train.parquet", "dev.parquet"), "sentences"))) if stage in args.stages}
        report: dict = {"stages": {}, "ray_startup_seconds": {}, "repeats": args.repeats,
                        "load_average_before": os.getloadavg()}
        digests: dict = {stage: set() for stage in stages}
        for workers in args.workers:
            # runs[stage][engine][size]: (wall, CPU, driver CPU) per round
            runs = {stage: {engine: {"small": [], "full": []} for engine in ENGINES} for stage in stages}
            amounts: dict = {}
            startups = []
            for round_ in range(args.repeats):
                for engine in ENGINES[round_ % 2:] + ENGINES[:round_ % 2]:
                    if engine == "ray":
                        seconds, _, _ = timed(ray.init, num_cpus=workers, include_dashboard=False,
                                              log_to_driver=False, object_store_memory=500 * 2**20,
                                              configure_logging=False)
                        startups.append(round(seconds, 2))
                    try:
                        for stage, (job, names, _) in stages.items():
                            # warm-up (imports, Arrow kernels, Ray's first workers): untimed
                            job(inputs[(stage, "small")][0], scratch / f"warm-up-{stage}", engine, workers)()
                            shutil.rmtree(scratch / f"warm-up-{stage}")
                            for size in ("small", "full"):
                                input_dir, amount = inputs[(stage, size)]
                                out = scratch / f"out-{stage}-{engine}-{workers}-{size}-{round_}"
                                wall, cpu, driver, manifest = timed_with_driver(
                                    job(input_dir, out, engine, workers))
                                runs[stage][engine][size].append((wall, cpu, driver))
                                amounts[(stage, size)] = (manifest["counts"]["sentences"]["kept"]
                                                          if amount is None else amount)
                                if size == "full":
                                    digests[stage].add(digest(out, names))
                                shutil.rmtree(out)
                    finally:
                        if engine == "ray":
                            ray.shutdown()
            report["ray_startup_seconds"][str(workers)] = startups
            for stage, (_, _, unit) in stages.items():
                by_engine = report["stages"].setdefault(stage, {})
                small, full = amounts[(stage, "small")], amounts[(stage, "full")]
                for engine in ENGINES:
                    sized = runs[stage][engine]
                    row = marginal([r[:2] for r in sized["small"]], [r[:2] for r in sized["full"]],
                                   small, full)
                    driver = [statistics.median(r[2] for r in sized[size]) for size in ("small", "full")]
                    row.update(unit=unit, small_amount=small, full_amount=full,
                               per_wall_s_per_worker=row["per_wall_s"] and round(row["per_wall_s"] / workers, 1),
                               driver_share_of_marginal_cpu=share(driver, [r[1] for r in sized["small"]],
                                                                  [r[1] for r in sized["full"]]),
                               per_cpu_s_by_round=[
                                   marginal([s[:2]], [f[:2]], small, full)["per_cpu_s"]
                                   for s, f in zip(sized["small"], sized["full"])])
                    by_engine.setdefault(engine, {})[str(workers)] = row
                    print(f"{stage} {engine} workers={workers}: full {row['full_wall_s']} s "
                          f"({row['full_cpu_s']} CPU-s), small {row['small_wall_s']} s -> "
                          f"{row['per_cpu_s']} {unit} per CPU-second (rounds: {row['per_cpu_s_by_round']}; "
                          f"driver {row['driver_share_of_marginal_cpu']} of it), "
                          f"{row['per_wall_s_per_worker']} per wall second per worker", flush=True)
                by_round = zip(by_engine["ray"][str(workers)]["per_cpu_s_by_round"],
                               by_engine["local"][str(workers)]["per_cpu_s_by_round"])
                ratios = [round(ray_rate / local_rate, 2) if ray_rate and local_rate else None
                          for ray_rate, local_rate in by_round]
                by_engine.setdefault("ray_vs_local_per_cpu_s_by_round", {})[str(workers)] = ratios
                measured = [ratio for ratio in ratios if ratio is not None]
                by_engine.setdefault("ray_vs_local_per_cpu_s_median_of_rounds", {})[str(workers)] = (
                    round(statistics.median(measured), 2) if measured else None)
        for stage in stages:
            by_engine = report["stages"][stage]
            for key in ("per_cpu_s", "per_wall_s_per_worker"):
                by_engine[f"ray_vs_local_{key}"] = {
                    str(w): (round(by_engine["ray"][str(w)][key] / by_engine["local"][str(w)][key], 2)
                             if by_engine["ray"][str(w)][key] and by_engine["local"][str(w)][key]
                             else None)
                    for w in args.workers}
            by_engine["outputs_identical"] = len(digests[stage]) == 1
            print(f"{stage}: Ray / local per CPU-second {by_engine['ray_vs_local_per_cpu_s']} "
                  f"(round by round {by_engine['ray_vs_local_per_cpu_s_by_round']}, median "
                  f"{by_engine['ray_vs_local_per_cpu_s_median_of_rounds']}), "
                  f"per wall second per worker {by_engine['ray_vs_local_per_wall_s_per_worker']}; "
                  f"outputs identical across engines and worker counts: {len(digests[stage]) == 1}")
        report.update({"target_ratio": TARGET_RATIO, "load_average_after": os.getloadavg(),
                       "cpu_count": os.cpu_count(), "source": args.source, "versions": versions()})
        atomic_write_json(args.out, report)
        print(f"Ray start-up (ray.init) {report['ray_startup_seconds']} s; wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
