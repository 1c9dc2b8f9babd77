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


def test_trainable_parameters_and_adapterdrop_rows_in_the_table(tmp_path):
    from kadapter.finetune import VARIANTS

    runs = {("tacred", "fac,lin"): [{**_metrics(0.5, 1), "trainable_parameters": 1_234_567,
                                     "knowledge_parameters": 94_600_000}],
            ("csqa", "fac,lin"): [{**_metrics(0.5, 1), "trainable_parameters": 1_250_000,
                                   "knowledge_parameters": 94_600_000}],
            ("tacred", "none"): [{**_metrics(0.4, 1), "trainable_parameters": 900,
                                  "knowledge_parameters": 0}]}
    drops = {("tacred", "fac,lin", "0,11"): [_metrics(0.3, 1)],
             ("tacred", "fac,lin", "0"): [_metrics(0.45, 1)]}
    variants = list(VARIANTS)
    table = results_markdown(runs, ["tacred", "csqa"], variants, "x", drops=drops)
    lines = table.splitlines()
    row = {line.split(" | ")[0][2:]: line for line in lines[:lines.index("## Dev")]
           if line.startswith("| ")}
    assert row["+F+L"].endswith("| 94.60M | 1.23M–1.25M |")  # the task heads differ
    assert row["encoder"].endswith("| 0 | 900 |")
    assert row["+F+L drop 0"].startswith("| +F+L drop 0 | 45.00 | 45.00 | 45.00 | – |")
    assert row["+F+L drop 0"].endswith("| 94.60M | 1.23M–1.25M |")  # the model's own counts
    assert row["+F+L drop 0,11"].startswith("| +F+L drop 0,11 | 30.00 |")
    order = [label for label in row if label.startswith("+F+L")]
    assert order == ["+F+L", "+F+L drop 0", "+F+L drop 0,11", "+F+L fusion"]
    for label in ("+F", "+L", "+F+L fusion"):  # no run yet: every cell –
        assert set(row[label].split(" | ")[1:-1]) == {"–"}
    assert "| TACRED | +F+L drop" not in table  # the runs table lists fine-tuning runs only
    plot_results(runs, ["tacred", "csqa"], variants, tmp_path / "r.png", "x", drops=drops)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_knowledge_stage_parameters_from_manifest_or_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipelines.finetune_all import knowledge_parameters

    fac, lin, encoder = tmp_path / "fac", tmp_path / "lin", tmp_path / "multitask"
    for directory in (fac, lin, encoder):
        directory.mkdir()
    save_file({"adapter.w": torch.zeros(3, 4), "head.b": torch.zeros(5)}, str(fac / "adapter.safetensors"))
    (fac / "manifest.json").write_text(json.dumps({"stage": "pretrain"}))  # no count: the weights are counted
    save_file({"adapter.w": torch.zeros(2, 2)}, str(lin / "adapter.safetensors"))
    (lin / "manifest.json").write_text(json.dumps({"parameters": {"trainable": 1000, "total": 5000}}))
    (encoder / "manifest.json").write_text(json.dumps({"parameters": {"trainable": 70, "total": 70}}))

    def manifest(adapters, encoder=None):
        return {"inputs": {"model": "tiny", **({"encoder": encoder} if encoder else {}), "adapters": {
            name: [{"path": str(path / "adapter.safetensors")}] for name, path in adapters.items()}}}

    assert knowledge_parameters(manifest({"fac": fac})) == 17
    assert knowledge_parameters(manifest({"fac": fac, "lin": lin})) == 1017
    assert knowledge_parameters(manifest({})) == 0
    assert knowledge_parameters(manifest({}, str(encoder))) == 70
    assert knowledge_parameters(manifest({"fac": tmp_path / "gone"})) is None
