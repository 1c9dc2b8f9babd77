"""The feature stage: tokenize a task's inputs once, in parallel, into the memory-mapped
cache that its training runs (every process, every variant) only map.

    python -m pipelines.features --config configs/sample.yaml --task fac
    python -m pipelines.features --config configs/paper.yaml --task figer --finetune.feature_workers 16

--task fac|lin reads the pretrain_<task> section (data_dir, cache_dir, max_length,
feature_workers); --task typing|figer|csqa|cosmosqa|tacred reads finetune.<task> and
finetune.cache_dir / finetune.feature_workers, one cache per distinct variant setting.
Run it (``make features``) before a multi-GPU launch; a training run that finds no cache
builds it on its main process while the others wait. Cache layout and key:
kadapter/features.py.
"""

from __future__ import annotations

import argparse
import sys

from .common import run_stage

TASKS = ("fac", "lin", "typing", "figer", "csqa", "cosmosqa", "tacred")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kadapter features", add_help=False, allow_abbrev=False)
    parser.add_argument("--task", choices=TASKS)
    known, rest = parser.parse_known_args(argv)
    if known.task is None:
        if any(a in ("-h", "--help") for a in rest):
            print(__doc__ + "\nKeys of a section: --task fac --help")
            raise SystemExit(0)
        print(f"error: --task {'|'.join(TASKS)} is required", file=sys.stderr)
        raise SystemExit(2)
    section = f"pretrain_{known.task}" if known.task in ("fac", "lin") else "finetune"

    def stage(config) -> None:
        from kadapter.features import build_features

        for entry in build_features(config, known.task):
            counts = ", ".join(f"{split} {c.get('examples')}" for split, c in entry["counts"].items())
            print(f"{known.task} features: {counts} examples -> {entry['cache']}")

    run_stage("pipelines.features", section, stage, rest)


if __name__ == "__main__":
    main()
