"""AdapterDrop at inference: re-predict the fine-tuned runs with the lowest adapter layers
dropped, score them, and add the rows to the results table.

    python -m pipelines.adapterdrop --config configs/sample.yaml
    python -m pipelines.adapterdrop --config configs/sample.yaml --drops "[[0], [0, 11], [0, 11, 23]]"

For each task and each variant in adapterdrop.variants (default +F+L), the run's model
(runs/<preset>/finetune/<task>/<variant>/model) predicts dev and test in full and with
each drop setting; writes runs/<preset>/adapterdrop/<task>/<variant>.json, then
finetune.results (results.md / results.png, now with the drop rows), then
runs/<preset>/adapterdrop/results.json last. kadapter/adapterdrop.py has the details;
the throughput of each setting is benchmarks/adapterdrop.py's.
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from kadapter.adapterdrop import run_adapterdrop, write_results

    from .finetune_all import write_tables

    summary = run_adapterdrop(config)
    write_tables(config)
    print(f"wrote {write_results(config, summary)}")


if __name__ == "__main__":
    run_stage("pipelines.adapterdrop", "adapterdrop", main)
