"""Paper-scale data path on synthetic inputs: time, CPU and memory per stage at three
sizes (each 4x the last), the growth per 4x, and an extrapolation to the paper's sizes.

    python benchmarks/paper_scale.py [--top 1.0] [--workers 2] [--out runs/bench/paper_scale.json]

Sizes at ``--top 1`` (``--top`` scales all three levels, keeping the 4x ladder):
T-REx dump ~100 / 400 / 1,600 MB (Zipf-distributed entities), T-REx-rc rows 100k / 400k
/ 1.6M, FIGER-format examples 50k / 200k / 800k. At each size, each stage runs in a
fresh child process (so its peak RSS and CPU seconds, children included, are its own):

- ``trex``: the T-REx stage (kadapter.trex.build_trex_rc) on the dump, ``--workers``;
- ``features_fac`` / ``features_figer``: the feature stage (kadapter.features) on the
  T-REx-rc rows / the FIGER files, ``--workers`` processes;
- ``finetune_load``: what one FIGER fine-tuning process does with its data: map the
  cache, read dev/test, compute the epoch's batch order and collate 100 batches; the
  growth of its private (anonymous), resident and proportional (PSS) memory per
  training example, with 1 and with 2 such processes at once (the mapped cache is
  shared page cache: private memory is flat in the number of processes, PSS halves).

Then, on the first ``--baseline_rows`` rows / examples of the largest size's inputs,
``baseline``: today's serial path (the reference ``kadapter.pretrain.fac_features`` +
Parquet cache, ``Task.encode`` of FIGER with its per-example multi-hot lists) against
the feature stage with 1 worker and with ``--workers``: CPU microseconds per row (the
per-core speed: the least of ``--repeats`` alternating runs, the machine's load average
printed beside it) and wall time. The feature stage encodes each distinct word once per
worker, so its speed depends on how often words repeat: the generated sentences follow
the rate at which new words come in real Wikipedia sentences (see ``Sentences``).

Writes runs/bench/paper_scale.json and prints a table. The extrapolation assumes the
measured per-unit CPU cost and the speed-up in workers carry to a 16-core machine
(paper: 3.09M T-REx documents, 5.5M T-REx-rc rows, 2M FIGER examples). The tokenizer is
the tiny model's byte-level BPE (6k merges) rather than roberta-large's (50k): the
tokenizer's own share of the cost is somewhat lower here than with RoBERTa's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOP = {"trex_mb": 1600, "rc_rows": 1_600_000, "figer_examples": 800_000}
PAPER = {"trex": (3_090_000, "documents"), "features_fac": (5_500_000, "rows"),
         "features_figer": (2_000_000, "examples"), "finetune_load": (2_000_000, "examples")}
PAPER_CORES = 16
TARGET_SPEEDUP_PER_CORE = 3.0
TARGET_BYTES_PER_EXAMPLE = 1024
RELATIONS = [f"P{p}" for p in range(17, 17 + 40)]
FIGER_TYPES = sorted({f"/type{i // 10}/sub{i}" if i % 10 else f"/type{i // 10}" for i in range(113)})
WORDS = ("the of in and was is a to on for with by at from as that an its which were "
         "river city town born album film team member party capital region near").split()
ENTITY = "http://www.wikidata.org/entity/Q"


# --------------------------------------------------------------------------- inputs


def zipf_entities(rng: np.random.Generator, count: int, vocabulary: int) -> np.ndarray:
    """Entity ids with Zipf (s ~ 1.1) frequencies, like Wikipedia mentions."""
    return (rng.zipf(1.1, size=count) - 1) % vocabulary


def entity_name(i: int) -> str:
    syllables = ("ka", "lo", "mir", "ta", "ven", "dor", "sa", "li", "qu", "ber", "ton", "ré")
    parts, n = [], i + 1
    while n:
        parts.append(syllables[n % len(syllables)])
        n //= len(syllables)
    name = "".join(parts).capitalize()
    return name if i % 3 else f"{name} {syllables[i % 7].capitalize()}burg"


def filler_vocabulary(size: int) -> list[str]:
    """WORDS, then made-up lowercase words: the words between the entities."""
    syllables = ("ar", "ben", "co", "dal", "er", "fi", "gon", "hu", "is", "jor", "ke", "lam",
                 "mo", "nes", "or", "pla", "qui", "ros", "su", "tan", "ul", "vi", "wen", "xo")
    words = list(WORDS)
    for i in range(size - len(words)):
        parts, n = [], i + len(syllables)
        while n:
            parts.append(syllables[n % len(syllables)])
            n //= len(syllables)
        words.append("".join(parts))
    return words


class Sentences:
    """~30-word sentences mentioning a subject then an object, filler words drawn with
    Zipf (s = 1.3) frequencies from a 300k-word vocabulary (in blocks: generating must
    not dominate the benchmark).

    Why those numbers: the feature stage encodes each distinct word once, so how fast it
    is depends on how fast new words come. Real Wikipedia sentences (the 4,761 distinct
    evidence sentences of the two LAMA files in ../shared/real/lama, shuffled) have 30
    words (pre-tokens) each and 3,958 / 6,308 / 9,575 / 15,785 distinct ones in the first
    500 / 1,000 / 2,000 / 4,761; these sentences have 29 and 2,684 / 4,683 / 8,340 /
    16,803 (52,536 in 20,000, where a power law fitted to the real counts gives ~40,000):
    new words come about as fast as in the real text, faster from 4,000 sentences on. Each row is its own sentence, although real T-REx-rc repeats sentences
    (one per entity pair: 70 rows from 7 sentences on the T-REx sample in ../shared/real).
    """

    vocabulary: list[str] = []

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        if not Sentences.vocabulary:
            Sentences.vocabulary = filler_vocabulary(300_000)
        self.words: list[str] = []
        self.lengths: list[int] = []

    def phrase(self) -> str:
        if not self.lengths:
            self.lengths = self.rng.integers(4, 14, 3 * 16384).tolist()
            draws = (self.rng.zipf(1.3, size=int(sum(self.lengths))) - 1) % len(self.vocabulary)
            self.words = [self.vocabulary[i] for i in draws.tolist()][::-1]
        n = self.lengths.pop()
        words = self.words[-n:]
        del self.words[-n:]
        return " ".join(words)

    def __call__(self, subject: str, obj: str) -> tuple[str, int, int]:
        """The sentence and the start offsets of subject and object in it."""
        before, middle, after = self.phrase(), self.phrase(), self.phrase()
        head = f"{before.capitalize()} {subject} "
        text = f"{head}{middle} {obj} {after}."
        return text, len(before) + 1, len(head) + len(middle) + 1


def write_trex_dump(directory: Path, megabytes: float, seed: int) -> dict:
    """T-REx-format documents (~50 MB per file) until ``megabytes`` are written."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sentence_with = Sentences(rng)
    vocabulary = 200_000
    total, docs, triples, index = 0, 0, 0, 0
    while total < megabytes * 1e6:
        batch, size = [], 0
        while size < 50e6 and total + size < megabytes * 1e6:
            sentences, entities, doc_triples, text = [], [], [], ""
            ids = zipf_entities(rng, 16, vocabulary)
            for k in range(8):
                subj, obj = int(ids[2 * k]), int(ids[2 * k + 1])
                s_name, o_name = entity_name(subj), entity_name(obj)
                sentence, s_at, o_at = sentence_with(s_name, o_name)
                start = len(text)
                text += sentence + " "
                sentences.append([start, start + len(sentence)])
                spans = [(start + s_at, s_name, subj), (start + o_at, o_name, obj)]
                for at, name, q in spans:
                    entities.append({"boundaries": [at, at + len(name)], "surfaceform": name,
                                     # Q-ids start at 1: the stage refuses Q0 (not a Wikidata item)
                                     "uri": f"{ENTITY}{q + 1}", "annotator": "Wikidata_Spotlight_Entity_Linker"})
                if subj != obj:
                    doc_triples.append({
                        "sentence_id": k, "annotator": "SPOAligner",
                        "predicate": {"boundaries": None, "surfaceform": None, "annotator": "SPOAligner",
                                      "uri": f"http://www.wikidata.org/prop/direct/{RELATIONS[(subj + obj) % 40]}"},
                        "subject": entities[-2] | {}, "object": entities[-1] | {},
                        "dependency_path": None, "confidence": None})
            doc = {"docid": f"{ENTITY}D{index}-{docs}", "uri": f"{ENTITY}D{docs}", "title": "T",
                   "text": text.rstrip(), "sentences_boundaries": sentences,
                   "words_boundaries": [], "entities": entities, "triples": doc_triples}
            batch.append(doc)
            size += len(orjson.dumps(doc)) + 1
            docs += 1
            triples += len(doc_triples)
        data = orjson.dumps(batch)
        (directory / f"trex-{index:04d}.json").write_bytes(data)
        total += len(data)
        index += 1
    return {"mb": round(total / 1e6, 1), "documents": docs, "triples": triples, "files": index}


def write_trex_rc(directory: Path, rows: int, seed: int) -> None:
    """T-REx-rc rows (the T-REx stage's output format) with Zipf entities."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sentence_with = Sentences(rng)
    for split, count in (("train", rows), ("dev", max(rows // 50, 100))):
        ids = zipf_entities(rng, 2 * count, 200_000).reshape(-1, 2)
        columns = {k: [] for k in ("sentence", "subj_start", "subj_end", "obj_start", "obj_end",
                                   "relation", "label")}
        for subj, obj in ids.tolist():
            s_name, o_name = entity_name(subj), entity_name(obj)
            text, s_at, o_at = sentence_with(s_name, o_name)
            label = (subj + obj) % len(RELATIONS)
            for key, value in (("sentence", text), ("subj_start", s_at), ("subj_end", s_at + len(s_name)),
                               ("obj_start", o_at), ("obj_end", o_at + len(o_name)),
                               ("relation", RELATIONS[label]), ("label", label)):
                columns[key].append(value)
        pq.write_table(pa.table(columns), directory / f"{split}.parquet")
    (directory / "relations.json").write_text(json.dumps(RELATIONS))


def write_figer(directory: Path, examples: int, seed: int) -> None:
    """FIGER-format files: train with ``examples`` records, dev 10k, test 563."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sentence_with = Sentences(rng)
    for name, count in (("train.json", examples), ("dev.json", 10_000), ("test.json", 563)):
        records = []
        ids = zipf_entities(rng, 2 * count, 200_000).reshape(-1, 2).tolist()
        for (a, b), n_types in zip(ids, rng.integers(1, 5, size=count).tolist()):
            mention = entity_name(a)
            text, at, _ = sentence_with(mention, entity_name(b))
            types = sorted({FIGER_TYPES[(a * (k + 1) + k) % len(FIGER_TYPES)] for k in range(n_types)})
            records.append({"sent": text, "start": at, "end": at + len(mention), "labels": types})
        (directory / name).write_bytes(orjson.dumps(records))


# --------------------------------------------------------------------------- stages (children)


_TOKENIZER: list = []


def tokenizer():
    """The tiny model's tokenizer, loaded once per process (before the timers start)."""
    if not _TOKENIZER:
        from kadapter.modeling import load_tokenizer
        from kadapter.tiny import ensure_tiny_model

        model = ensure_tiny_model(REPO / "data/models/tiny-roberta", REPO / "data/sample")
        _TOKENIZER.append(load_tokenizer(str(model)))
    return _TOKENIZER[0]


def figer_files(directory: Path) -> dict[str, Path]:
    return {split: directory / f"{split}.json" for split in ("train", "dev", "test")}


def memory() -> dict[str, int]:
    """This process's Rss, Pss and private (USS) bytes, from /proc/self/smaps_rollup."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def run_stage(stage: str, args: dict) -> dict:
    """One stage in this (child) process; returns its own figures."""
    scratch = Path(args["scratch"])
    result: dict = {}
    if stage == "trex":
        from kadapter.trex import TrexConfig, build_trex_rc

        config = TrexConfig(input=str(scratch / "trex"), min_entity_count=50, min_relation_pairs=50,
                            workers=args["workers"])
        manifest = build_trex_rc(config, seed=42, output_dir=scratch / "trex_out")
        result["examples"] = manifest["counts"]["after_relation_filter"]
    elif stage == "features_fac":
        from kadapter.features import pretrain_features

        shutil.rmtree(scratch / "cache_fac", ignore_errors=True)
        built = pretrain_features("fac", scratch / "rc", scratch / "cache_fac", tokenizer(), 64,
                                  workers=args["workers"])
        result["examples"] = built["counts"]["train"]["examples"]
    elif stage == "features_figer":
        from kadapter.features import finetune_features
        from kadapter.finetune import TaskConfig
        from kadapter.tasks import TASKS

        shutil.rmtree(scratch / "cache_figer", ignore_errors=True)
        settings = TaskConfig(data_dir=str(scratch / "figer"), max_length=64, labels=FIGER_TYPES)
        built = finetune_features(TASKS["figer"], settings, figer_files(scratch / "figer"),
                                  tokenizer(), scratch / "cache_figer", workers=args["workers"])
        result["examples"] = built.counts["train"]["encoded"]
    elif stage == "finetune_load":
        from kadapter.finetune import TaskConfig, prepare_data
        from kadapter.tasks import TASKS, collate
        from kadapter.training import batch_order, example_lengths

        tok = tokenizer()
        before = memory()
        task = TASKS["figer"]
        data = prepare_data(task, TaskConfig(data_dir=str(scratch / "figer"), max_length=64,
                                             labels=FIGER_TYPES),
                            figer_files(scratch / "figer"), tok, scratch / "cache_figer", workers=1)
        train = data.encoded["train"].features
        batches = batch_order(example_lengths(train), 32, seed=0, epoch=0)
        for index in batches[:100]:
            collate([train[int(i)] for i in index], tok.pad_token_id, len(data.labels))
        after = memory()
        result.update(examples=len(train), **{f"{k}_bytes_per_example": round((after[k] - before[k]) / len(train), 1)
                                              for k in after})
    elif stage in ("baseline_fac", "baseline_figer"):
        result.update(baseline(stage, scratch, args))
    return result


def baseline(stage: str, scratch: Path, args: dict) -> dict:
    """Today's serial path on ``rows`` rows: the reference features plus today's cache."""
    tok = tokenizer()
    rows = args["rows"]
    if stage == "baseline_fac":
        from kadapter.pretrain import fac_features
        from kadapter.training import FeatureTable

        path = scratch / "rc" / "train.parquet"
        table, _ = fac_features(path, tok, 64, RELATIONS)
        table.write_parquet(scratch / "baseline_cache.parquet")
        FeatureTable.read_parquet(scratch / "baseline_cache.parquet")
    else:
        from kadapter.tasks import TASKS

        task = TASKS["figer"]
        path = scratch / "figer" / "train.json"
        examples = task.reader(path, None)
        labels = task.label_space(examples, None)
        task.encode(examples, tok, labels, 64)
    return {"examples": rows}


def child_main(stage: str, args_json: str) -> None:
    """Run one stage and print its figures; imports and the tokenizer load come first,
    outside the timers (a training process has them anyway)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # CPU per core: no tokenizer threads
    import kadapter.features  # noqa: F401
    import kadapter.finetune  # noqa: F401
    import kadapter.pretrain  # noqa: F401
    import kadapter.trex  # noqa: F401

    tokenizer()
    started, cpu = time.perf_counter(), time.process_time()
    result = run_stage(stage, json.loads(args_json))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent
    own_peak_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))
    result.update(wall_s=round(time.perf_counter() - started, 3),
                  cpu_s=round(time.process_time() - cpu + children.ru_utime + children.ru_stime, 3),
                  peak_rss_mb=round(max(own_peak_kb, children.ru_maxrss) / 1024, 1))
    print("RESULT " + json.dumps(result))


def measure(stage: str, **args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, __file__, "--child", stage, json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"stage {stage} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def measure_together(stage: str, copies: int, **args) -> list[dict]:
    """``copies`` children of one stage at the same time (shared cache: flat memory)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--child", stage, json.dumps(args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=REPO) for _ in range(copies)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"stage {stage} failed:\n{err[-4000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


# --------------------------------------------------------------------------- the run


def growth(values: list[float]) -> list[float]:
    return [round(b / a, 2) if a else math.nan for a, b in zip(values, values[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=float, default=1.0,
                        help="scale of the largest size (1 = 1.6 GB / 1.6M rows / 800k examples)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the T-REx and feature stages")
    parser.add_argument("--baseline_rows", type=int, default=100_000,
                        help="rows (at most) of the old-vs-new comparison, from the largest size")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating runs of the old and the new path; the least CPU counts")
    parser.add_argument("--out", default=str(REPO / "runs/bench/paper_scale.json"))
    args = parser.parse_args()
    from kadapter.io import atomic_write_json, versions

    runs_dir = REPO / "runs"
    runs_dir.mkdir(exist_ok=True)
    scratch_root = Path(tempfile.mkdtemp(prefix="paper_scale_", dir=runs_dir))
    levels = [args.top / 16, args.top / 4, args.top]
    report: dict = {"top": args.top, "workers": args.workers, "cpu_count": os.cpu_count(),
                    "sizes": [], "stages": {}, "versions": versions()}
    started = time.perf_counter()
    try:
        for level, scale in enumerate(levels):
            scratch = scratch_root / f"size{level}"
            sizes = {"trex_mb": TOP["trex_mb"] * scale, "rc_rows": int(TOP["rc_rows"] * scale),
                     "figer_examples": int(TOP["figer_examples"] * scale)}
            t0 = time.perf_counter()
            dump = write_trex_dump(scratch / "trex", sizes["trex_mb"], seed=level)
            write_trex_rc(scratch / "rc", sizes["rc_rows"], seed=level)
            write_figer(scratch / "figer", sizes["figer_examples"], seed=level)
            sizes.update(trex_documents=dump["documents"], trex_mb=dump["mb"],
                         generate_s=round(time.perf_counter() - t0, 1))
            report["sizes"].append(sizes)
            print(f"size {level}: {dump['mb']} MB T-REx ({dump['documents']:,} documents), "
                  f"{sizes['rc_rows']:,} rows, {sizes['figer_examples']:,} FIGER examples "
                  f"(generated in {sizes['generate_s']}s)", flush=True)
            units = {"trex": dump["documents"], "features_fac": sizes["rc_rows"],
                     "features_figer": sizes["figer_examples"], "finetune_load": sizes["figer_examples"]}
            for stage in ("trex", "features_fac", "features_figer", "finetune_load"):
                row = measure(stage, scratch=str(scratch), workers=args.workers)
                row["units"] = units[stage]
                report["stages"].setdefault(stage, []).append(row)
                print(f"  {stage:15s} {row['wall_s']:8.1f} s wall {row['cpu_s']:8.1f} s CPU "
                      f"{row['peak_rss_mb']:8.1f} MB peak RSS", flush=True)
            if level == len(levels) - 1:
                report["baseline"] = compare(scratch, args)
            if level == len(levels) - 1:
                together = measure_together("finetune_load", 2, scratch=str(scratch), workers=1)
                report["finetune_load_two_processes"] = together
            if level < len(levels) - 1:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    summarize(report)
    report["total_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(args.out, report)
    print_table(report)
    print(f"wrote {args.out} ({report['total_s']} s)")


def compare(scratch: Path, args) -> dict:
    """Today's serial path vs the feature stage on the same rows: CPU microseconds per row
    (the per-core speed; the best of ``--repeats`` alternating runs, as the machine may be
    shared) and wall time with 1 and ``--workers`` workers."""
    import pyarrow.parquet as pq

    small = scratch / "baseline_input"
    (small / "rc").mkdir(parents=True)
    train = pq.read_table(scratch / "rc" / "train.parquet")
    fac_rows = min(args.baseline_rows, train.num_rows)
    pq.write_table(train.slice(0, fac_rows), small / "rc" / "train.parquet")
    shutil.copy(scratch / "rc" / "dev.parquet", small / "rc" / "dev.parquet")
    shutil.copy(scratch / "rc" / "relations.json", small / "rc" / "relations.json")
    (small / "figer").mkdir()
    records = orjson.loads((scratch / "figer" / "train.json").read_bytes())[:args.baseline_rows]
    (small / "figer" / "train.json").write_bytes(orjson.dumps(records))
    for name in ("dev.json", "test.json"):  # tiny dev/test: the comparison is about train
        dev = orjson.loads((scratch / "figer" / name).read_bytes())[:50]
        (small / "figer" / name).write_bytes(orjson.dumps(dev))
    out: dict = {"load_average_before": [round(x, 2) for x in os.getloadavg()], "repeats": args.repeats}
    for task, rows in (("fac", fac_rows), ("figer", len(records))):
        runs: dict[str, list[dict]] = {"old": [], "new_1": [], "new_n": []}
        for _ in range(args.repeats):  # alternating: a burst of load hits both
            runs["old"].append(measure(f"baseline_{task}", scratch=str(small), rows=rows))
            runs["new_1"].append(measure(f"features_{task}", scratch=str(small), workers=1))
        runs["new_n"].append(measure(f"features_{task}", scratch=str(small), workers=args.workers))
        best = {k: min(v, key=lambda r: r["cpu_s"]) for k, v in runs.items()}
        per_row = {k: best[k]["cpu_s"] / rows * 1e6 for k in ("old", "new_1")}
        speedup = per_row["old"] / per_row["new_1"]
        out[task] = {
            "rows": rows, "old": best["old"], "new_1_worker": best["new_1"],
            f"new_{args.workers}_workers": best["new_n"],
            "old_cpu_s_all_runs": [r["cpu_s"] for r in runs["old"]],
            "new_cpu_s_all_runs": [r["cpu_s"] for r in runs["new_1"]],
            "old_cpu_us_per_row": round(per_row["old"], 1), "new_cpu_us_per_row": round(per_row["new_1"], 1),
            "old_rows_per_cpu_s": round(1e6 / per_row["old"]), "new_rows_per_cpu_s": round(1e6 / per_row["new_1"]),
            "speedup_per_core": round(speedup, 2),
            "new_wall_speedup_workers": round(best["new_1"]["wall_s"] / best["new_n"]["wall_s"], 2),
            "speedup_wall_vs_old": round(best["old"]["wall_s"] / best["new_n"]["wall_s"], 2),
        }
        print(f"  {task} on {rows:,} rows, per core: today {per_row['old']:.1f} us CPU/row, feature stage "
              f"{per_row['new_1']:.1f}: {speedup:.2f}x (target >= {TARGET_SPEEDUP_PER_CORE}x: "
              f"{'met' if speedup >= TARGET_SPEEDUP_PER_CORE else 'NOT met'})"
              + (f"; {args.workers} workers {out[task]['new_wall_speedup_workers']}x the wall speed of 1"
                 if args.workers > 1 else ""), flush=True)
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"  load average (1, 5, 15 min) before {out['load_average_before']}, after "
          f"{out['load_average_after']} on {os.cpu_count()} CPUs", flush=True)
    return out


def summarize(report: dict) -> None:
    """Growth per 4x and the extrapolation to the paper's sizes on 16 cores."""
    summary = {}
    for stage, rows in report["stages"].items():
        paper_units, unit = PAPER[stage]
        top = rows[-1]
        entry = {"unit": unit, "wall_growth_per_4x": growth([r["wall_s"] for r in rows]),
                 "cpu_growth_per_4x": growth([r["cpu_s"] for r in rows]),
                 "rss_growth_per_4x": growth([r["peak_rss_mb"] for r in rows])}
        cpu_per_unit = top["cpu_s"] / top["units"]
        entry["cpu_us_per_unit_at_top"] = round(cpu_per_unit * 1e6, 2)
        if stage == "finetune_load":
            entry["paper_private_mb_per_process"] = round(top["anon_bytes_per_example"] * paper_units / 1e6, 1)
        else:
            scale_rss = entry["rss_growth_per_4x"][-1]
            exponent = math.log(max(scale_rss, 1.0), 4)
            entry["paper_wall_s_on_16_cores"] = round(cpu_per_unit * paper_units / PAPER_CORES, 1)
            entry["paper_peak_rss_mb"] = round(top["peak_rss_mb"] * (paper_units / top["units"]) ** exponent, 1)
        entry["paper_units"] = paper_units
        summary[stage] = entry
    report["summary"] = summary
    load = report["stages"]["finetune_load"][-1]
    report["targets"] = {
        "speedup_per_core_fac": report["baseline"]["fac"]["speedup_per_core"],
        "speedup_per_core_figer": report["baseline"]["figer"]["speedup_per_core"],
        "target_speedup_per_core": TARGET_SPEEDUP_PER_CORE,
        "finetune_anon_bytes_per_example": load["anon_bytes_per_example"],
        "finetune_rss_bytes_per_example": load["rss_bytes_per_example"],
        "finetune_pss_bytes_per_example": load["pss_bytes_per_example"],
        "two_processes_anon_bytes_per_example": [r["anon_bytes_per_example"]
                                                 for r in report["finetune_load_two_processes"]],
        "two_processes_pss_bytes_per_example": [r["pss_bytes_per_example"]
                                                for r in report["finetune_load_two_processes"]],
        "target_bytes_per_example": TARGET_BYTES_PER_EXAMPLE,
    }


def print_table(report: dict) -> None:
    print(f"\n{'stage':15s} {'size':>12s} {'wall s':>8s} {'CPU s':>8s} {'peak MB':>8s}   growth per 4x (wall / CPU / RSS)")
    for stage, rows in report["stages"].items():
        s = report["summary"][stage]
        for i, row in enumerate(rows):
            tail = ""
            if i:
                tail = (f"   {s['wall_growth_per_4x'][i - 1]} / {s['cpu_growth_per_4x'][i - 1]} / "
                        f"{s['rss_growth_per_4x'][i - 1]}")
            print(f"{stage:15s} {row['units']:>12,} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} "
                  f"{row['peak_rss_mb']:8.1f}{tail}")
    print("\nextrapolated to the paper's sizes on 16 cores:")
    for stage, s in report["summary"].items():
        if "paper_wall_s_on_16_cores" in s:
            print(f"  {stage:15s} {s['paper_units']:,} {s['unit']}: ~{s['paper_wall_s_on_16_cores'] / 60:.1f} min, "
                  f"peak RSS ~{s['paper_peak_rss_mb'] / 1024:.1f} GB")
        else:
            print(f"  {stage:15s} {s['paper_units']:,} {s['unit']}: ~{s['paper_private_mb_per_process']} MB "
                  f"private (anonymous) memory per training process, plus the shared mapped cache")
    t = report["targets"]
    b = report["baseline"]
    print(f"\nfeature stage per core vs today's path (CPU us per row, least of {b['repeats']} runs; "
          f"load average {b['load_average_before']} -> {b['load_average_after']}):")
    for task in ("fac", "figer"):
        print(f"  {task:6s} {b[task]['rows']:>9,} rows: today {b[task]['old_cpu_us_per_row']:7.1f}, "
              f"feature stage {b[task]['new_cpu_us_per_row']:6.1f} -> {b[task]['speedup_per_core']}x "
              f"(target >= {t['target_speedup_per_core']}x)")
    print(f"FIGER fine-tuning process, bytes per training example: {t['finetune_anon_bytes_per_example']} "
          f"private (anonymous), {t['finetune_rss_bytes_per_example']} resident incl. the mapped cache, "
          f"{t['finetune_pss_bytes_per_example']} proportional; two processes at once: "
          f"private {t['two_processes_anon_bytes_per_example']}, proportional "
          f"{t['two_processes_pss_bytes_per_example']} (target < {t['target_bytes_per_example']})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
