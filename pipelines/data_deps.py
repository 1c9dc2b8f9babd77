"""Dependency data for the linguistic adapter (section ``data_deps``, kadapter/deps.py).

    python -m pipelines.data_deps --config configs/sample.yaml [--workers 2 ...]
                                  [--engine ray [--ray_address auto]]

BookCorpus-style text (one or more sentences per line) -> dependency parse ->
``train.parquet`` / ``dev.parquet`` with one row per sentence (text, words, word
character offsets, 1-based head indices with 0 = root, relation labels) and a
``manifest.json`` with inputs, parser and model versions, parameters and counts
(lines, sentences, every dropped line or sentence by reason, per split).

Sizes: the sample preset parses the 329 lines of data/sample/books (439 sentences)
in a few seconds; the paper preset stops at 1M kept sentences (~15 words each,
~100 MB of Parquet). spaCy's small model does 1,000-2,000 sentences a second per CPU
core (--workers N for N cores); stanza, the paper-faithful Stanford parser, wants
GPUs (--workers = number of GPUs, one process each).
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from kadapter.deps import build_deps

    manifest = build_deps(config.data_deps, seed=config.seed)
    counts = manifest["counts"]
    splits = ", ".join(f"{name} {s['sentences']}" for name, s in counts["splits"].items())
    skipped = {k: v for k, v in counts["lines"].items() if k not in ("read", "parsed")}
    print(f"{config.data_deps.output_dir}: {counts['sentences']['kept']} sentences ({splits}) "
          f"from {counts['lines'].get('parsed', 0)} lines; dropped sentences: "
          f"{counts['sentences']['dropped'] or 'none'}; skipped lines: {skipped or 'none'}")


if __name__ == "__main__":
    run_stage("pipelines.data_deps", "data_deps", main)
