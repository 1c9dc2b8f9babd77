"""Write runs/<preset>/report.md: data counts, adapters, fine-tuning, LAMA, environment.

    python -m pipelines.report --config configs/sample.yaml     (make report, kadapter report)

Reads what the stages wrote (manifests, metrics, results tables, figures) and links every
figure and table to its file; a stage not run yet is listed as such (kadapter/report.py).
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from kadapter.report import build_report

    print(f"wrote {build_report(config)}")


if __name__ == "__main__":
    run_stage("pipelines.report", None, main)
