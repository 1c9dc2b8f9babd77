"""Fine-tuning runs end to end on the tiny model: outputs, frozen adapters, dev-only
selection, determinism, bad input, and the results table of pipelines.finetune_all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from workspace import copy_sample_splits, save_random_adapters

from kadapter.config import ConfigError, load_config
from kadapter.finetune import run_finetune, run_fingerprint
from kadapter.metrics import read_predictions, score_file
from kadapter.tasks import TASKS

SAMPLE_DIRS = {"typing": "openentity", "figer": "figer", "csqa": "csqa", "cosmosqa": "cosmosqa",
               "tacred": "tacred"}
SIZES = (24, 10, 10)  # train, dev, test examples copied from the sample files


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, repo_root, tiny_model_dir):
    """Small copies of the sample files, two random adapters and a preset file."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("finetune")
    copy_sample_splits(root, repo_root, SAMPLE_DIRS, SIZES)
    save_random_adapters(root, AutoConfig.from_pretrained(str(tiny_model_dir)))
    task_settings = {"max_length": 48, "batch_size": 8, "learning_rate": 1e-3, "max_steps": 4,
                     "eval_every": 2, "log_every": 1, "save_every": 0}
    preset = {
        "preset": "test", "seed": 7,
        "model": {"name_or_path": "tiny", "tiny_dir": str(tiny_model_dir),
                  "tiny_corpus": str(repo_root / "data/sample")},
        "finetune": {
            "fac_adapter": str(root / "fac-adapter"), "lin_adapter": str(root / "lin-adapter"),
            "output_dir": str(root / "runs"), "results": str(root / "results.md"),
            "cache_dir": str(root / "features"),
            **{task: {"data_dir": str(root / "data" / directory), **task_settings}
               for task, directory in SAMPLE_DIRS.items()},
            "figer": {"data_dir": str(root / "data/figer"), **task_settings,
                      "labels": load_config(repo_root / "configs/sample.yaml").finetune.figer.labels},
        },
    }
    (root / "test.yaml").write_text(yaml.safe_dump(preset))
    return root


def config_for(workspace: Path, *overrides: str):
    return load_config(workspace / "test.yaml", list(overrides), default_section="finetune")


def expected_ids(workspace: Path, task: str, split: int) -> list[str]:
    spec = TASKS[task]
    path = workspace / "data" / SAMPLE_DIRS[task] / spec.files[split]
    return [e.id for e in spec.reader(path, spec.default_labels)]


@pytest.mark.parametrize("task, adapters, variant_dir", [
    ("typing", "fac,lin", "fac+lin"),
    ("figer", "none", "encoder"),
    ("tacred", "fac", "fac"),
    ("csqa", "lin", "lin"),
    ("cosmosqa", "none", "encoder"),
])
def test_run_writes_predictions_and_metrics_scored_from_them(workspace, task, adapters, variant_dir):
    config = config_for(workspace)
    summary = run_finetune(config, task, adapters)
    out = workspace / "runs" / task / variant_dir
    for name in ("predictions.jsonl", "dev_predictions.jsonl", "metrics.json", "manifest.json",
                 "metrics.jsonl", "curves.png", "best/model.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert not list(out.parent.glob(".*partial"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    metric = TASKS[task].metric
    assert metrics["test"] == pytest.approx(score_file(metric, out / "predictions.jsonl"))
    assert metrics["dev"] == pytest.approx(score_file(metric, out / "dev_predictions.jsonl"))
    test_rows = read_predictions(out / "predictions.jsonl")
    assert [r["id"] for r in test_rows] == expected_ids(workspace, task, 2)
    assert [r["id"] for r in read_predictions(out / "dev_predictions.jsonl")] == expected_ids(workspace, task, 1)
    if TASKS[task].kind == "choice":  # upstream test files are unlabelled: predicted, not scored
        assert metrics["test"] == {"examples": 10, "labelled": 0}
        assert all(r["gold"] is None and r["predicted"] for r in test_rows)
    else:
        assert metrics["test"]["labelled"] == 10 and metrics["main_metric"] in metrics["test"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == run_fingerprint(config, task, manifest["variant"])
    assert manifest["counts"]["train"]["examples"] == 24
    assert set(manifest["inputs"]["adapters"]) == set(adapters.split(",")) - {"none"}


def test_adapters_stay_frozen_while_encoder_and_head_train(workspace, tiny_model_dir):
    run_finetune(config_for(workspace), "typing", "fac")
    trained = load_file(str(workspace / "runs/typing/fac/best/model.safetensors"))
    adapter = load_file(str(workspace / "fac-adapter/adapter.safetensors"))
    for key, value in adapter.items():
        torch.testing.assert_close(trained[f"kadapter.adapters.fac.{key[len('adapter.'):]}"], value,
                                   rtol=0, atol=0)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "roberta.encoder.layer.23.output.dense.weight"
    assert not torch.equal(trained["kadapter.encoder.encoder.layer.23.output.dense.weight"], original[name])


def test_selection_is_on_dev_and_test_is_predicted_once(workspace):
    run_finetune(config_for(workspace, "--finetune.tacred.max_steps", "6"), "tacred", "none")
    out = workspace / "runs/tacred/encoder"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in records if r["kind"] == "dev"]
    assert {r["kind"] for r in records} == {"train", "dev"}  # no test evaluation while training
    assert [r["step"] for r in dev] == [2, 3, 4, 6]  # every 2 steps and at each epoch's end
    best = max(dev, key=lambda r: (r["f1"], -r["step"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_step"] == best["step"]
    assert metrics["dev"]["f1"] == pytest.approx(best["f1"])


def test_same_seed_same_bytes(workspace):
    outputs = []
    for run in ("a", "b"):
        config = config_for(workspace, "--output_dir", str(workspace / f"repeat-{run}"))
        run_finetune(config, "typing", "lin")
        out = workspace / f"repeat-{run}/typing/lin"
        outputs.append([(out / n).read_bytes() for n in ("predictions.jsonl", "dev_predictions.jsonl")])
    assert outputs[0] == outputs[1]


def test_too_long_examples_are_counted_and_scored_with_the_fallback(workspace):
    # 16 tokens: special tokens, four markers and both mentions fit only where the two
    # mentions are close together
    config = config_for(workspace, "--finetune.tacred.max_length", "16",
                        "--output_dir", str(workspace / "short"))
    run_finetune(config, "tacred", "none")
    out = workspace / "short/tacred/encoder"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert 0 < counts["test"]["too_long"] < counts["test"]["examples"]
    assert counts["train"]["encoded"] + counts["train"]["too_long"] == counts["train"]["examples"]
    rows = read_predictions(out / "predictions.jsonl")
    cut = [r for r in rows if r.get("too_long")]
    assert len(cut) == counts["test"]["too_long"] and len(rows) == counts["test"]["examples"]
    assert all(r["predicted"] == "no_relation" for r in cut)


@pytest.mark.parametrize("overrides, message", [
    (["--finetune.fac_adapter", "/nonexistent/fac"], "make pretrain-fac"),
    (["--adapters", "fac,foo"], "must be none, fac, lin or fac,lin"),
    (["--finetune.typing.overrides", "{fac+lin: {learning_rate: 1e-5}}"], "unknown variant"),
    (["--finetune.typing.overrides", "{fac: {learning_rat: 1e-5}}"], "unknown key(s) ['learning_rat']"),
    (["--finetune.typing.data_dir", "/nonexistent"], "train.json"),
    (["--finetune.typing.max_train_negatives", "3"], "max_train_negatives is for TACRED only"),
])
def test_bad_configuration_is_a_clear_error(workspace, overrides, message):
    with pytest.raises((ConfigError, FileNotFoundError), match=None) as info:
        config = config_for(workspace, *overrides)
        run_finetune(config, "typing", config.finetune.adapters if "--adapters" in overrides else "fac")
    assert message in str(info.value)


def test_variant_overrides_apply_to_that_variant_only(workspace):
    from kadapter.finetune import variant_settings

    config = config_for(workspace, "--finetune.typing.overrides",
                        "{fac: {learning_rate: 5.0e-6, warmup_steps: 500}}")
    assert variant_settings(config, "typing", "fac").learning_rate == 5e-6
    assert variant_settings(config, "typing", "fac").warmup_steps == 500
    assert variant_settings(config, "typing", "lin").learning_rate == 1e-3


def test_finetune_all_skips_current_runs_and_writes_the_table(workspace, capsys):
    from pipelines.finetune_all import main

    config = config_for(workspace, "--tasks", "[typing]", "--variants", "[none, fac]",
                        "--output_dir", str(workspace / "all"))
    main(config)
    first = (workspace / "all/typing/fac/predictions.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    main(config)
    assert capsys.readouterr().out.count("up to date") == 2
    assert (workspace / "all/typing/fac/predictions.jsonl").stat().st_mtime_ns == first
    table = (workspace / "results.md").read_text()
    assert "| model | OpenEntity P | OpenEntity R | OpenEntity F1 |" in table
    rows = [line for line in table.splitlines() if line.startswith(("| encoder", "| +F "))]
    assert len(rows) == 4  # reported split and dev, one row per variant each
    assert (workspace / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_table_reports_dev_where_test_is_unlabelled():
    from pipelines.finetune_all import results_markdown

    runs = {
        ("tacred", "none"): {"dev": {"examples": 5, "labelled": 5, "precision": 0.5, "recall": 0.25, "f1": 1 / 3},
                             "test": {"examples": 5, "labelled": 5, "precision": 1.0, "recall": 0.5, "f1": 2 / 3},
                             "main_metric": "f1", "selected_step": 3, "steps": 4},
        ("csqa", "none"): {"dev": {"examples": 4, "labelled": 4, "accuracy": 0.75},
                           "test": {"examples": 4, "labelled": 0},
                           "main_metric": "accuracy", "selected_step": 2, "steps": 4},
    }
    baselines = {"tacred": {"test": {"precision": 1.0, "recall": 0.0, "f1": 0.0}, "dev": {}},
                 "csqa": {"test": {"examples": 4, "labelled": 0}, "dev": {"accuracy": 0.25}}}
    table = results_markdown(runs, ["tacred", "csqa"], ["none", "fac"], "x", baselines)
    assert "| majority (train) | 100.00 † | 0.00 | 0.00 | 25.00 |" in table
    assert "| majority (train) | – | – | – | 25.00 |" in table
    assert "TACRED test, CommonsenseQA dev" in table
    assert "| encoder | 100.00 | 50.00 | 66.67 | 75.00 |" in table
    assert "| encoder | 50.00 | 25.00 | 33.33 | 75.00 |" in table  # the dev table
    assert "| +F | – | – | – | – |" in table
    assert "| K-Adapter (F+L) | – | – | 72.04 | – |" in table


@pytest.mark.parametrize("task, train, dev, expected", [
    # majority type set ["person"]: 1 correct of 2 predicted, of 2 gold
    ("typing", [["person"], ["person"], ["time"]], [["person"], ["time"]],
     {"precision": 0.5, "recall": 0.5, "f1": 0.5}),
    # majority relation no_relation: nothing guessed
    ("tacred", ["no_relation", "no_relation", "per:spouse"], ["per:spouse", "no_relation"],
     {"precision": 1.0, "recall": 0.0, "f1": 0.0}),
    # majority answer position 1 (B)
    ("csqa", ["A", "B", "B"], ["B", "A"], {"accuracy": 0.5}),
])
def test_majority_baseline(tmp_path, task, train, dev, expected):
    from kadapter.finetune import TaskConfig, data_files, majority_baseline

    def write(name, golds):
        path = tmp_path / name
        if task == "typing":
            path.write_text(json.dumps([{"sent": "Ada ran .", "start": 0, "end": 3, "labels": g} for g in golds]))
        elif task == "tacred":
            path.write_text(json.dumps([{"id": f"{name}{i}", "relation": g, "token": ["Ada", "met", "Bob"],
                                         "subj_start": 0, "subj_end": 0, "obj_start": 2, "obj_end": 2}
                                        for i, g in enumerate(golds)]))
        else:
            choices = [{"label": label, "text": label.lower()} for label in "AB"]
            path.write_text("".join(json.dumps({"answerKey": g, "id": f"{name}{i}", "question": {
                "stem": "Which?", "choices": choices}}) + "\n" for i, g in enumerate(golds)))

    spec = TASKS[task]
    write(spec.files[0], train)
    write(spec.files[1], dev)
    files = data_files(spec, TaskConfig(data_dir=str(tmp_path)), task)
    assert majority_baseline(spec, TaskConfig(data_dir=str(tmp_path)), files, "dev") == pytest.approx(
        {"examples": 2, "labelled": 2, **expected})


def test_interrupted_finetuning_resumes_to_identical_weights(workspace, monkeypatch):
    short = ("--finetune.typing.max_steps", "6", "--finetune.typing.save_every", "2")
    run_finetune(config_for(workspace, *short, "--output_dir", str(workspace / "straight")),
                 "typing", "fac")

    task = TASKS["typing"]
    calls = {"n": 0}

    def crashing_loss(logits, targets, original=task.loss):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5 of 6, after the step-4 checkpoint
            raise KeyboardInterrupt("simulated interruption")
        return original(logits, targets)

    resumed = config_for(workspace, *short, "--output_dir", str(workspace / "resumed"))
    monkeypatch.setattr(task, "loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(resumed, "typing", "fac")
    monkeypatch.undo()
    assert not (workspace / "resumed/typing/fac").exists()  # only the hidden .partial is left
    run_finetune(config_for(workspace, *short, "--output_dir", str(workspace / "resumed"),
                            "--resume", "true"), "typing", "fac")

    straight, again = workspace / "straight/typing/fac", workspace / "resumed/typing/fac"
    assert json.loads((again / "manifest.json").read_text())["training"]["resumed_from"] == 4
    for name in ("best/model.safetensors", "predictions.jsonl", "dev_predictions.jsonl", "metrics.json"):
        assert (again / name).read_bytes() == (straight / name).read_bytes(), name


def test_two_process_cpu_run_reloads_the_best_weights(workspace, repo_root):
    """torchrun starts 2 CPU processes (gloo); both reload the selected weights (a path that
    once failed on the 'cpu:0' device a multi-process CPU run reports)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "pipelines.finetune", "--config",
         str(workspace / "test.yaml"), "--task", "tacred", "--adapters", "fac",
         "--output_dir", str(workspace / "ddp"), "--finetune.tacred.max_steps", "4"],
        capture_output=True, text=True, cwd=repo_root, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = workspace / "ddp/tacred/fac"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["processes"] == 2 and manifest["training"]["steps"] == 4
    batch = manifest["training"]["batch"]  # batch_size 8 is examples per step: 4 a process
    assert (batch["global_batch"], batch["micro_batch"], batch["processes"]) == (8, 4, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    dev = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "dev"}
    assert metrics["selected_step"] in dev
    # dev predicted again after training, with the reloaded weights, scores as at selection
    assert metrics["dev"]["f1"] == pytest.approx(dev[metrics["selected_step"]]["f1"])
    assert [r["id"] for r in read_predictions(out / "dev_predictions.jsonl")] == \
        expected_ids(workspace, "tacred", 1)
    assert done.stdout.count("tacred +F: dev f1") == 1  # only the main process prints


@pytest.mark.parametrize("task, empty", [("typing", "[]"), ("csqa", "")])
def test_a_dev_file_without_examples_is_a_clear_error(workspace, tmp_path, task, empty):
    spec, data = TASKS[task], tmp_path / SAMPLE_DIRS[task]
    data.mkdir()
    for name in spec.files:
        (data / name).write_text((workspace / "data" / SAMPLE_DIRS[task] / name).read_text())
    (data / spec.files[1]).write_text(empty)
    config = config_for(workspace, f"--finetune.{task}.data_dir", str(data),
                        "--output_dir", str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=f"{spec.files[1]}: no example to select the model with"):
        run_finetune(config, task, "none")
