"""Fine-tune every task x variant of the preset, then write the paper-shaped results.

    python -m pipelines.finetune_all --config configs/sample.yaml --launcher ".venv/bin/accelerate launch"
    python -m pipelines.finetune_all --config configs/sample.yaml --tasks [typing,tacred]

For each task in finetune.tasks and each variant in finetune.variants (none, fac, lin,
fac,lin) it runs pipelines.finetune, unless that run's manifest already records the
same fingerprint (settings, seed, model, data bytes, adapter bytes): a second call
redoes nothing current. With a launcher each run is its own process (``<launcher> -m
pipelines.finetune --config <resolved config> --task T --adapters A``), so multi-GPU
launchers work and every run starts with fresh memory; without one they run here.

Then it reads the metrics.json of every run found under finetune.output_dir and writes
finetune.results (results.md): rows encoder, +F, +L, +F+L; columns each task's metrics on test (on dev where the test file
is unlabelled, as CommonsenseQA's and CosmosQA's are), the same on dev, and the paper's
figures for reference; plus results.png, the main metric per task and variant.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from kadapter.config import Config
from kadapter.io import atomic_write_bytes, read_json

from .common import run_stage

TASK_TITLES = {"typing": "OpenEntity", "figer": "FIGER", "tacred": "TACRED",
               "csqa": "CommonsenseQA", "cosmosqa": "CosmosQA"}
# task -> [(metric key, column title)], in the paper's order
COLUMNS = {
    "typing": [("precision", "P"), ("recall", "R"), ("f1", "F1")],
    "figer": [("strict_accuracy", "strict acc"), ("loose_macro_f1", "loose macro F1"),
              ("loose_micro_f1", "loose micro F1")],
    "tacred": [("precision", "P"), ("recall", "R"), ("f1", "F1")],
    "csqa": [("accuracy", "acc")],
    "cosmosqa": [("accuracy", "acc")],
}
# Wang et al. 2021 (RoBERTa-large / K-Adapter F+L), as in KADAPTER.md section 4.
PAPER = {
    "typing": {"f1": (76.23, 77.61)},
    "figer": {"strict_accuracy": (56.31, 61.81), "loose_macro_f1": (82.43, 84.87),
              "loose_micro_f1": (77.83, 80.54)},
    "tacred": {"f1": (71.25, 72.04)},
    "cosmosqa": {"accuracy": (80.59, 81.83)},
}


def main(config: Config) -> None:
    from kadapter.finetune import (
        VARIANTS,
        canonical_variant,
        data_files,
        majority_baseline,
        run_dir,
        run_finetune,
        run_fingerprint,
    )
    from kadapter.tasks import TASKS

    settings = config.finetune
    variants = [canonical_variant(v) for v in settings.variants]
    resolved = Path(settings.output_dir) / "config.yaml"
    if settings.launcher:  # the children read exactly this run's resolved configuration
        atomic_write_bytes(resolved, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    for task in settings.tasks:
        for variant in variants:
            manifest = run_dir(config, task, variant) / "manifest.json"
            if manifest.is_file() and read_json(manifest).get("fingerprint") == run_fingerprint(
                    config, task, variant):
                print(f"{task} {VARIANTS[variant][1]}: up to date ({manifest.parent})")
                continue
            if settings.launcher:
                command = [*shlex.split(settings.launcher), "-m", f"{__package__}.finetune", "--config",
                           str(resolved), "--task", task, "--adapters", variant]
                print("$ " + shlex.join(command), flush=True)
                if subprocess.run(command).returncode != 0:
                    sys.exit(f"error: fine-tuning {task} with adapters {variant} failed")
            else:
                run_finetune(config, task, variant)
    # The table covers every task and variant, run now or before (missing ones show as –),
    # so running one task (make finetune-tacred) never drops the others from it.
    all_tasks, all_variants = list(TASKS), list(VARIANTS)
    runs = {(task, variant): read_json(run_dir(config, task, variant) / "metrics.json")
            for task in all_tasks for variant in all_variants
            if (run_dir(config, task, variant) / "metrics.json").is_file()}
    baselines = {}
    for task in {task for task, _ in runs}:
        task_settings = getattr(settings, task)
        files = data_files(TASKS[task], task_settings, task)
        baselines[task] = {split: majority_baseline(TASKS[task], task_settings, files, split)
                           for split in ("dev", "test")}
    results = Path(settings.results)
    atomic_write_bytes(results, results_markdown(runs, all_tasks, all_variants, config.preset,
                                                 baselines).encode())
    plot_results(runs, all_tasks, all_variants, results.with_suffix(".png"))
    print(f"wrote {results} and {results.with_suffix('.png')}")


def reported_split(runs: dict[tuple[str, str], dict], task: str) -> str:
    """``test`` when every run of the task has a labelled test file, else ``dev``."""
    task_runs = [m for (t, _), m in runs.items() if t == task]
    return "test" if task_runs and all(m["test"]["labelled"] for m in task_runs) else "dev"


def _cell(metrics: dict[str, Any] | None, key: str) -> str:
    return f"{100 * metrics[key]:.2f}" if metrics and key in metrics else "–"


def _table(rows: list[tuple[str, list[str]]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    return lines


def results_markdown(runs: dict[tuple[str, str], dict], tasks: list[str], variants: list[str],
                     preset: str, baselines: dict[str, dict[str, dict]] | None = None) -> str:
    """The paper-shaped tables (percentages) of every run found, with the majority-label
    baseline of each task (``baselines[task][split]``) as the first row."""
    baselines = baselines or {}
    from kadapter.finetune import VARIANTS

    header = ["model"] + [f"{TASK_TITLES[t]} {title}" for t in tasks for _, title in COLUMNS[t]]
    splits = {task: reported_split(runs, task) for task in tasks}
    lines = [f"# Fine-tuning results, preset `{preset}`", "",
             "Percentages. Model selection on dev only; the selected checkpoint is evaluated once.",
             "majority (train): every example gets the most frequent training label (type set,",
             "relation, answer position), the score a model must beat.",
             "Reported split per task: " + ", ".join(f"{TASK_TITLES[t]} {splits[t]}" for t in tasks)
             + " (dev where the test file is unlabelled).", ""]
    for title, split_of in (("", splits), ("## Dev", dict.fromkeys(tasks, "dev"))):
        if title:
            lines += ["", title, ""]
        rows = [("majority (train)", [_cell(baselines.get(t, {}).get(split_of[t]), key)
                                      for t in tasks for key, _ in COLUMNS[t]])]
        rows += [(VARIANTS[v][1], [_cell(runs.get((t, v), {}).get(split_of[t]), key)
                                   for t in tasks for key, _ in COLUMNS[t]]) for v in variants]
        lines += _table(rows, header)
    lines += ["", "## Paper (RoBERTa-large; Wang et al. 2021, test)", ""]
    paper = [(label, [f"{PAPER[t][key][i]:.2f}" if key in PAPER.get(t, {}) else "–"
                      for t in tasks for key, _ in COLUMNS[t]])
             for i, label in enumerate(["RoBERTa", "K-Adapter (F+L)"])]
    lines += _table(paper, header)
    lines += ["", "## Runs", "", "| task | variant | selected step / steps | dev examples | test examples |",
              "|---|---|---|---|---|"]
    for (task, variant), metrics in ((key, runs[key]) for key in product(tasks, variants) if key in runs):
        lines.append(f"| {TASK_TITLES[task]} | {VARIANTS[variant][1]} | {metrics['selected_step']} / "
                     f"{metrics['steps']} | {metrics['dev']['examples']} | {metrics['test']['examples']} |")
    return "\n".join(lines) + "\n"


def plot_results(runs: dict[tuple[str, str], dict], tasks: list[str], variants: list[str],
                 path: Path) -> None:
    """Grouped bars: the main metric (percent) of each task that has runs, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kadapter.finetune import VARIANTS

    tasks = [task for task in tasks if any((task, variant) in runs for variant in variants)]
    figure, axes = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 4))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        values = []
        for task in tasks:
            metrics = runs.get((task, variant))
            split = reported_split(runs, task)
            values.append(100 * metrics[split].get(metrics["main_metric"], 0.0) if metrics else 0.0)
        positions = [k + (i - (len(variants) - 1) / 2) * width for k in range(len(tasks))]
        axes.bar(positions, values, width, label=VARIANTS[variant][1])
    labels = []
    for task in tasks:
        metric = next((m["main_metric"] for (t, _), m in runs.items() if t == task), "")
        labels.append(f"{TASK_TITLES[task]}\n{metric} ({reported_split(runs, task)})")
    axes.set_xticks(range(len(tasks)), labels)
    axes.set_ylabel("percent")
    axes.set_ylim(0, 100)
    axes.legend(ncols=len(variants), loc="upper center", bbox_to_anchor=(0.5, 1.12), frameon=False)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


if __name__ == "__main__":
    run_stage("pipelines.finetune_all", "finetune", main)
