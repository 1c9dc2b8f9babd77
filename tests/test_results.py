"""Results of fine-tuning: several seeds (own run directories, mean ± std), the majority
row's TACRED footnote, the chart."""

from __future__ import annotations

import json

from test_finetune import config_for, workspace  # noqa: F401  (the module's fixture)

from pipelines.finetune_all import main, mean_std, plot_results, results_markdown


def _metrics(f1: float, seed: int) -> dict:
    split = {"examples": 5, "labelled": 5, "precision": f1, "recall": f1, "f1": f1}
    return {"dev": split, "test": split, "main_metric": "f1", "selected_step": 2, "steps": 4,
            "seed": seed}


def test_mean_and_std_over_seeds_and_the_majority_footnote(tmp_path):
    runs = {("tacred", "none"): [_metrics(0.5, 1), _metrics(0.6, 2), _metrics(0.7, 3)]}
    baselines = {"tacred": {"test": {"precision": 1.0, "recall": 0.0, "f1": 0.0},
                            "dev": {"precision": 1.0, "recall": 0.0, "f1": 0.0}}}
    table = results_markdown(runs, ["tacred"], ["none"], "x", baselines)
    assert "| encoder | 60.00 ± 10.00 | 60.00 ± 10.00 | 60.00 ± 10.00 |" in table
    assert "mean ± standard deviation over seeds 1, 2, 3" in table
    assert "| majority (train) | 100.00 † | 0.00 | 0.00 |" in table
    assert "† The majority label of TACRED is no_relation" in table
    assert table.count("| TACRED | encoder |") == 3  # one line per seed in the runs table
    assert mean_std([1.0]) == (1.0, None)
    plot_results(runs, ["tacred"], ["none"], tmp_path / "r.png", "x", baselines)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_several_seeds_each_in_its_own_run_directory(workspace, capsys):  # noqa: F811
    out = workspace / "seeds"
    config = config_for(workspace, "--tasks", "[typing]", "--variants", "[none]",
                        "--seeds", "[1, 2]", "--output_dir", str(out),
                        "--results", str(workspace / "seeds.md"))
    main(config)
    metrics = [json.loads((out / f"seed-{seed}/typing/encoder/metrics.json").read_text())
               for seed in (1, 2)]
    manifests = [json.loads((out / f"seed-{seed}/typing/encoder/manifest.json").read_text())
                 for seed in (1, 2)]
    assert [m["parameters"]["seed"] for m in manifests] == [1, 2]  # not overwritten
    capsys.readouterr()
    main(config)
    assert capsys.readouterr().out.count("up to date") == 2
    table = (workspace / "seeds.md").read_text()
    f1 = [100 * m["test"]["f1"] for m in metrics]
    mean, std = mean_std(f1)
    assert f"{mean:.2f} ± {std:.2f}" in table
    assert "over seeds 1, 2" in table
    assert (workspace / "seeds.png").read_bytes()[:4] == b"\x89PNG"
