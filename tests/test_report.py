"""report.md: read from what the stages wrote, every figure linked to its files, missing
stages listed as not run."""

from __future__ import annotations

import json

from kadapter.config import load_config
from kadapter.report import build_report


def test_report_reads_the_manifests_and_links_the_figures(repo_root, tmp_path):
    trex, fac, finetune = tmp_path / "trex", tmp_path / "runs/fac", tmp_path / "runs/finetune"
    for directory in (trex, fac, finetune):
        directory.mkdir(parents=True)
    (trex / "manifest.json").write_text(json.dumps({"counts": {
        "documents": 96, "triples_read": 2087, "candidates": 855, "after_entity_filter": 651,
        "after_relation_filter": 647, "relations_kept": 11, "examples": {"train": 602, "dev": 45}},
        "versions": {"torch": "2.13.0+cpu"}}))
    (fac / "manifest.json").write_text(json.dumps({
        "training": {"steps": 380, "tokens": 117880, "tokens_per_s": 2943.2, "wall_seconds": 50.5,
                     "device": "cpu", "processes": 1, "mixed_precision": "no"},
        "dev_metrics": {"accuracy": 0.8444}, "majority_baseline": {"accuracy": 0.4},
        "versions": {"torch": "2.13.0+cpu", "python": "3.11.7"}}))
    (fac / "curves.png").write_bytes(b"\x89PNG")
    (tmp_path / "runs/results.md").write_text("# Fine-tuning results\n\n| model | x |\n|---|---|\n| encoder | 50.00 |\n")
    (tmp_path / "runs/results.png").write_bytes(b"\x89PNG")
    config = load_config(repo_root / "configs/sample.yaml", [
        "--data_trex.output_dir", str(trex), "--data_deps.output_dir", str(tmp_path / "none"),
        "--pretrain_fac.output_dir", str(fac), "--pretrain_lin.output_dir", str(tmp_path / "none"),
        "--finetune.output_dir", str(finetune), "--finetune.results", str(tmp_path / "runs/results.md"),
        "--lama.output_dir", str(tmp_path / "none")])
    path = build_report(config, tmp_path / "runs/report.md")
    text = path.read_text()
    assert "| after the entity filter | 651 |" in text and "| train / dev examples | 602 / 45 |" in text
    assert "From [`../trex/manifest.json`](../trex/manifest.json)." in text
    assert "Dev: accuracy 0.8444." in text and "Majority-class baseline: accuracy 0.4000." in text
    assert "![fac adapter: training loss and dev metrics per step](fac/curves.png)" in text
    assert "drawn from [`fac/metrics.jsonl`](fac/metrics.jsonl)" in text
    assert "| encoder | 50.00 |" in text and "![main metric per task and variant](results.png)" in text
    assert "Not run yet (`make data-deps`)" in text and "Not run yet (`make pretrain-lin`)" in text
    assert "Not run yet (`make eval-lama`)" in text
    assert "| torch | 2.13.0+cpu |" in text and "| pretrain fac | 50.5 |" in text
    assert "Devices: cpu x 1 process(es), mixed precision no." in text
