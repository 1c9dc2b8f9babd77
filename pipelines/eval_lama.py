"""LAMA probe of the encoder and of K-Adapter: P@1 on Google-RE, T-REx and their UHN variants.

    python -m pipelines.eval_lama --config configs/sample.yaml [--key value ...]
    python -m pipelines.eval_lama --config configs/paper.yaml --lama_dir /data/LAMA/data \\
        --bert_model /models/bert-base-cased --lama.mlm_head.batch_size 16

Writes into ``lama.output_dir`` (replaced whole at the end): results.json, results.md,
p_at_1.png, per-subset predictions and dropped facts, mlm_head/ and manifest.json.
What it does, step by step, and the output layout: ``run_lama`` in kadapter/lama.py; the
rules (filters, token forms, scoring): that module's docstring.
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from kadapter.lama import run_lama

    run_lama(config)


if __name__ == "__main__":
    run_stage("pipelines.eval_lama", "lama", main)
