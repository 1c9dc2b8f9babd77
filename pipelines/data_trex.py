"""T-REx dump -> relation-classification set for the factual adapter.

    python -m pipelines.data_trex --config configs/sample.yaml [--workers 4] [--input PATH]
                                  [--engine ray [--ray_address auto]]

Reads every document of the T-REx JSON files in ``data_trex.input`` (the full dump:
~465 files, tens of GB; memory stays at one parsed file plus the entity counter),
keeps each triple whose subject and object mentions lie in one sentence, filters
rare entities and relations, and writes to ``data_trex.output_dir``:

    train.parquet, dev.parquet  one row per example: docid, sentence, subj_start,
                                subj_end, obj_start, obj_end (character offsets into
                                sentence, end exclusive), subj_uri, obj_uri, relation, label
    relations.json              sorted kept P-ids; label = index in this list
    manifest.json               inputs, parameters, the count at every step, versions

See kadapter/trex.py for the exact rules.
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from kadapter.trex import build_trex_rc

    output_dir = config.data_trex.output_dir
    manifest = build_trex_rc(config.data_trex, seed=config.seed, output_dir=output_dir,
                             progress=True)
    counts = manifest["counts"]
    print(
        f"{counts['triples_read']} triples -> {counts['candidates']} candidates -> "
        f"{counts['after_entity_filter']} after entity filter -> "
        f"{counts['after_relation_filter']} examples over {counts['relations_kept']} relations "
        f"(train {counts['examples']['train']}, dev {counts['examples']['dev']}) in {output_dir}"
    )


if __name__ == "__main__":
    run_stage("pipelines.data_trex", "data_trex", main)
