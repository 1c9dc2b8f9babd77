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
finetune.results (results.md): a row per variant (encoder, +F, +L, +F+L, +F+L fusion, ...;
one without runs shows –) and, after its variant, each AdapterDrop setting scored by
pipelines.adapterdrop; columns each task's metrics on test (on dev where the test file
is unlabelled, as CommonsenseQA's and CosmosQA's are) and the trainable parameters of
the knowledge stage and of fine-tuning, the same on dev, and the paper's figures for
reference; plus results.png, the main metric per task and variant.

With ``finetune.seeds: [1, 2, 3]`` every run is repeated per seed, each seed in its own
tree ``<output_dir>/seed-<n>/<task>/<variant>/``, and every cell of results.md and bar of
results.png is the mean ± standard deviation (sample, n - 1) over the seeds found.
"""

from __future__ import annotations

import math
import shlex
import statistics
import subprocess
import sys
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from kadapter.config import Config
from kadapter.finetune import seed_configs
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
# Readable names of the metric keys, for the chart.
METRIC_NAMES = {"f1": "F1", "precision": "precision", "recall": "recall", "accuracy": "accuracy",
                "strict_accuracy": "strict accuracy", "loose_macro_f1": "loose macro F1",
                "loose_micro_f1": "loose micro F1"}
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
        run_dir,
        run_finetune,
        run_fingerprint,
    )

    settings = config.finetune
    variants = [canonical_variant(v) for v in settings.variants]
    for seeded in seed_configs(config):
        resolved = Path(seeded.finetune.output_dir) / "config.yaml"
        if settings.launcher:  # the children read exactly this run's resolved configuration
            atomic_write_bytes(resolved, yaml.safe_dump(seeded.to_dict(), sort_keys=False).encode())
        seed_label = f" seed {seeded.seed}" if settings.seeds else ""
        for task in settings.tasks:
            for variant in variants:
                manifest = run_dir(seeded, task, variant) / "manifest.json"
                if manifest.is_file() and read_json(manifest).get("fingerprint") == run_fingerprint(
                        seeded, task, variant):
                    print(f"{task} {VARIANTS[variant][1]}{seed_label}: up to date ({manifest.parent})")
                    continue
                if settings.launcher:
                    command = [*shlex.split(settings.launcher), "-m", f"{__package__}.finetune",
                               "--config", str(resolved), "--task", task, "--adapters", variant]
                    print("$ " + shlex.join(command), flush=True)
                    if subprocess.run(command).returncode != 0:
                        sys.exit(f"error: fine-tuning {task} with adapters {variant}{seed_label} failed")
                else:
                    run_finetune(seeded, task, variant)
    write_tables(config)


def write_tables(config: Config) -> None:
    """results.md and results.png from every run found under finetune.output_dir (missing
    ones show as –, so running one task never drops the others), with each run's
    trainable parameters and, when the preset has an adapterdrop section, its drop rows."""
    from kadapter.adapterdrop import drop_rows
    from kadapter.finetune import VARIANTS, data_files, majority_baseline, run_dir
    from kadapter.tasks import TASKS

    settings = config.finetune
    all_tasks, all_variants = list(TASKS), list(VARIANTS)
    runs: dict[tuple[str, str], list[dict]] = {}
    for seeded in seed_configs(config):
        for task, variant in product(all_tasks, all_variants):
            path = run_dir(seeded, task, variant) / "metrics.json"
            if path.is_file():
                manifest = read_json(path.with_name("manifest.json"))
                runs.setdefault((task, variant), []).append({
                    **read_json(path), "seed": seeded.seed,
                    "trainable_parameters": manifest.get("trainable_parameters"),
                    "knowledge_parameters": knowledge_parameters(manifest)})
    baselines = {}
    for task in {task for task, _ in runs}:
        task_settings = getattr(settings, task)
        files = data_files(TASKS[task], task_settings, task)
        baselines[task] = {split: majority_baseline(TASKS[task], task_settings, files, split)
                           for split in ("dev", "test")}
    drops = drop_rows(config)
    results = Path(settings.results)
    atomic_write_bytes(results, results_markdown(runs, all_tasks, all_variants, config.preset,
                                                 baselines, drops).encode())
    plot_results(runs, all_tasks, all_variants, results.with_suffix(".png"), config.preset,
                 baselines, drops)
    print(f"wrote {results} and {results.with_suffix('.png')}")


def stage_trainable_parameters(directory: Path) -> int | None:
    """A knowledge stage's trainable parameters: its manifest.json ``parameters.trainable``,
    else the element count of the safetensors it saved (an adapter directory written before
    manifests carried the count: adapter and pretraining head); None if neither is there."""
    from safetensors import safe_open

    manifest = directory / "manifest.json"
    if manifest.is_file():
        parameters = read_json(manifest).get("parameters")
        if isinstance(parameters, dict) and isinstance(parameters.get("trainable"), int):
            return parameters["trainable"]
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return None
    total = 0
    for path in weights:
        with safe_open(str(path), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def knowledge_parameters(manifest: dict) -> int | None:
    """Trainable parameters of the knowledge stages a fine-tuning run builds on (its
    manifest's ``inputs``): each adapter directory's, plus the encoder's when the encoder is
    a directory with a stage manifest (a multitask-trained encoder); 0 for the plain
    encoder; None when a count cannot be found."""
    inputs = manifest.get("inputs", {})
    directories = {Path(files[0]["path"]).parent for files in (inputs.get("adapters") or {}).values()
                   if files}
    encoder = inputs.get("encoder")  # a multitask-trained encoder's directory
    if isinstance(encoder, str) and (Path(encoder) / "manifest.json").is_file():
        directories.add(Path(encoder))
    counts = [stage_trainable_parameters(directory) for directory in sorted(directories)]
    return None if None in counts else sum(counts)


RunsBySeed = dict[tuple[str, str], list[dict]]


def _by_seed(runs: dict[tuple[str, str], Any]) -> RunsBySeed:
    """Accept one metrics dict per run or a list of them (one per seed)."""
    return {key: value if isinstance(value, list) else [value] for key, value in runs.items()}


def reported_split(runs: RunsBySeed, task: str) -> str:
    """``test`` when every run of the task has a labelled test file, else ``dev``."""
    task_runs = [m for (t, _), seeds in _by_seed(runs).items() if t == task for m in seeds]
    return "test" if task_runs and all(m["test"]["labelled"] for m in task_runs) else "dev"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(metrics: list[dict] | dict | None, key: str) -> str:
    """Percent, ``mean ± std`` over the seeds when there are several."""
    seeds = metrics if isinstance(metrics, list) else [metrics] if metrics else []
    values = [100 * m[key] for m in seeds if m and key in m]
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _table(rows: list[tuple[str, list[str]]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    return lines


# The majority baseline's TACRED precision: it predicts no_relation everywhere, so it has no
# positive prediction and precision is 0/0, scored 100 (TACRED's scorer convention).
NOTHING_PREDICTED = "†"


def _baseline_cell(baseline: dict | None, task: str, key: str) -> str:
    cell = _cell(baseline, key)
    if (task == "tacred" and key == "precision" and baseline
            and baseline.get("recall") == 0 and baseline.get("precision") == 1.0):
        return f"{cell} {NOTHING_PREDICTED}"
    return cell


Drops = dict[tuple[str, str, str], list[dict]]


def _series(runs: RunsBySeed, variants: list[str], drops: Drops
            ) -> list[tuple[str, str, str, dict[str, list[dict]]]]:
    """(key, row label, base variant, task -> metrics per seed): each variant, then its
    AdapterDrop settings (fewest dropped positions first)."""
    from kadapter.adapterdrop import row_label
    from kadapter.finetune import VARIANTS

    series = []
    for variant in variants:
        series.append((variant, VARIANTS[variant][1], variant,
                       {t: seeds for (t, v), seeds in runs.items() if v == variant}))
        for drop in sorted({d for _, v, d in drops if v == variant}, key=lambda d: (d.count(","), d)):
            series.append((f"{variant} drop {drop}", row_label(variant, drop), variant,
                           {t: seeds for (t, v, d), seeds in drops.items() if (v, d) == (variant, drop)}))
    return series


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= 10 * scale if suffix == "k" else n >= scale:
            return f"{n / scale:.{1 if suffix == 'k' else 2}f}{suffix}"
    return str(n)


def _parameter_cell(counts: list[int | None]) -> str:
    """A trainable-parameter count over a variant's runs (tasks, seeds): one value, or the
    range where the task heads differ; – when no run records it."""
    found = sorted({n for n in counts if n is not None})
    if not found:
        return "–"
    low, high = _count(found[0]), _count(found[-1])
    return low if low == high else f"{low}–{high}"


def results_markdown(runs: dict[tuple[str, str], Any], tasks: list[str], variants: list[str],
                     preset: str, baselines: dict[str, dict[str, dict]] | None = None,
                     drops: Drops | None = None) -> str:
    """The paper-shaped tables (percentages) of every run found, with the majority-label
    baseline of each task (``baselines[task][split]``) as the first row. ``runs`` maps
    (task, variant) to a metrics dict, or to a list of them, one per seed (with, when
    known, ``trainable_parameters`` and ``knowledge_parameters``); ``drops`` maps (task,
    variant, dropped positions) to AdapterDrop scores per seed (kadapter.adapterdrop)."""
    baselines = baselines or {}
    runs = _by_seed(runs)
    from kadapter.finetune import VARIANTS

    header = ["model"] + [f"{TASK_TITLES[t]} {title}" for t in tasks for _, title in COLUMNS[t]]
    series = _series(runs, variants, drops or {})
    parameters = {key: [_parameter_cell([m.get(field) for t in tasks for m in runs.get((t, base), [])])
                        for field in ("knowledge_parameters", "trainable_parameters")]
                  for key, _, base, _ in series}
    splits = {task: reported_split(runs, task) for task in tasks}
    seeds = sorted({m.get("seed") for seeds in runs.values() for m in seeds} - {None})
    lines = [f"# Fine-tuning results, preset `{preset}`", "",
             "Percentages. Model selection on dev only; the selected checkpoint is evaluated once.",
             "majority (train): every example gets the most frequent training label (type set,",
             "relation, answer position), the score a model must beat.",
             "Reported split per task: " + ", ".join(f"{TASK_TITLES[t]} {splits[t]}" for t in tasks)
             + " (dev where the test file is unlabelled).",
             "Trainable parameters: in the knowledge stage (adapter pretraining, or the encoder's",
             "multitask training) and in fine-tuning (a range where the task heads differ).",
             "\"drop P\" rows: the same fine-tuned model with its adapter layers at positions P",
             "skipped at inference (AdapterDrop; throughput in benchmarks/adapterdrop.py)."]
    if len(seeds) > 1:
        lines.append(f"Each cell: mean ± standard deviation over seeds {', '.join(map(str, seeds))} "
                     "(every seed's run has its own directory, seed-<n>/).")
    lines.append("")
    footnote = False
    for title, split_of in (("", splits), ("## Dev", dict.fromkeys(tasks, "dev"))):
        if title:
            lines += ["", title, ""]
        majority = [_baseline_cell(baselines.get(t, {}).get(split_of[t]), t, key)
                    for t in tasks for key, _ in COLUMNS[t]]
        footnote = footnote or any(NOTHING_PREDICTED in cell for cell in majority)
        counted = not title  # the parameter columns once, in the first table
        rows = [("majority (train)", majority + ["–", "–"] * counted)]
        rows += [(label, [_cell([m.get(split_of[t]) for m in data.get(t, [])], key)
                          for t in tasks for key, _ in COLUMNS[t]] + parameters[key] * counted)
                 for key, label, _, data in series]
        lines += _table(rows, header + ["trainable, knowledge stage", "trainable, fine-tuning"] * counted)
    if footnote:
        lines += ["", f"{NOTHING_PREDICTED} The majority label of TACRED is no_relation: the baseline "
                  "predicts no relation at all, so its precision is 0/0, which TACRED's scorer "
                  "counts as 100; its recall and F1 (0) are the figures to compare."]
    lines += ["", "## Paper (RoBERTa-large; Wang et al. 2021, test)", ""]
    paper = [(label, [f"{PAPER[t][key][i]:.2f}" if key in PAPER.get(t, {}) else "–"
                      for t in tasks for key, _ in COLUMNS[t]])
             for i, label in enumerate(["RoBERTa", "K-Adapter (F+L)"])]
    lines += _table(paper, header)
    lines += ["", "## Runs", "", "| task | variant | seed | selected step / steps | dev examples | test examples |",
              "|---|---|---|---|---|---|"]
    for (task, variant) in (key for key in product(tasks, variants) if key in runs):
        for metrics in runs[(task, variant)]:
            lines.append(f"| {TASK_TITLES[task]} | {VARIANTS[variant][1]} | {metrics.get('seed', '–')} | "
                         f"{metrics['selected_step']} / {metrics['steps']} | "
                         f"{metrics['dev']['examples']} | {metrics['test']['examples']} |")
    return "\n".join(lines) + "\n"


def plot_results(runs: dict[tuple[str, str], Any], tasks: list[str], variants: list[str],
                 path: Path, preset: str = "", baselines: dict[str, dict[str, dict]] | None = None,
                 drops: Drops | None = None) -> None:
    """Grouped bars: the main metric (percent) of each task that has runs, one bar per
    variant (mean, with the standard deviation over seeds as an error bar), the value on
    each bar; the majority baseline as a dashed line over each group and the paper's
    figures (RoBERTa over the encoder bar, K-Adapter F+L over the +F+L bar) as markers.
    AdapterDrop rows (``drops``) are hatched bars after their variant's; a variant or drop
    setting without any run takes no slot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, baselines = _by_seed(runs), baselines or {}
    tasks = [task for task in tasks if any((task, variant) in runs for variant in variants)]
    series = [s for s in _series(runs, variants, drops or {}) if any(t in s[3] for t in tasks)]
    figure, axes = plt.subplots(figsize=(max(8.0, 2.4 + 2.2 * len(tasks) * max(1, len(series) / 8)),
                                         4.8))
    width = 0.8 / max(len(series), 1)
    seed_counts = {len(seeds) for seeds in runs.values()}
    offsets = {key: (i - (len(series) - 1) / 2) * width for i, (key, *_) in enumerate(series)}
    colours = {}
    for key, label, base, data in series:
        means, errors, positions = [], [], []
        for k, task in enumerate(tasks):
            seeds = data.get(task)
            if not seeds:
                continue
            split = reported_split(runs, task)
            mean, std = mean_std([100 * m[split].get(m["main_metric"], 0.0) for m in seeds])
            means.append(mean)
            errors.append(std or 0.0)
            positions.append(k + offsets[key])
        dropped = key != base  # an AdapterDrop row: its variant's colour, hatched
        bars = axes.bar(positions, means, width, label=label, color=colours.get(base) if dropped else None,
                        hatch="//" if dropped else None, edgecolor="white" if dropped else None,
                        yerr=errors if max(seed_counts) > 1 else None, capsize=3)
        colours.setdefault(base, bars.patches[0].get_facecolor() if bars.patches else None)
        axes.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=2)
    labels = []
    majority_label = "majority (train)"
    paper_label = "paper, test (◇ on encoder: RoBERTa-large; on +F+L: K-Adapter)"
    for k, task in enumerate(tasks):
        metric = next(seeds[0]["main_metric"] for (t, _), seeds in runs.items() if t == task)
        split = reported_split(runs, task)
        labels.append(f"{TASK_TITLES[task]}\n{METRIC_NAMES.get(metric, metric)} ({split})")
        baseline = baselines.get(task, {}).get(split) or {}
        if metric in baseline:
            axes.hlines(100 * baseline[metric], k - 0.45, k + 0.45, colors="black",
                        linestyles="dashed", linewidth=1, label=majority_label)
            majority_label = None  # one legend entry
        for variant, index in (("none", 0), ("fac,lin", 1)):
            if metric in PAPER.get(task, {}) and variant in offsets:
                axes.plot(k + offsets[variant], PAPER[task][metric][index], marker="D",
                          markersize=6, markerfacecolor="none", markeredgecolor="black",
                          linestyle="none", label=paper_label)
                paper_label = None
    axes.set_xticks(range(len(tasks)), labels)
    axes.set_ylabel("percent")
    axes.set_ylim(0, 105)
    seeds_note = (f", mean ± std over {max(seed_counts)} seeds" if max(seed_counts, default=1) > 1
                  else "")
    columns = min(len(series) + 2, 7)
    legend_rows = -(-(len(series) + 2) // columns)  # above the bars, under the title
    axes.set_title(f"Fine-tuning, preset {preset}: main metric per task{seeds_note}",
                   pad=10 + 14 * legend_rows)
    axes.legend(ncols=columns, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                frameon=False, fontsize=8)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


if __name__ == "__main__":
    run_stage("pipelines.finetune_all", "finetune", main)
