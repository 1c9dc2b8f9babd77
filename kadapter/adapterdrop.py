"""AdapterDrop (Rücklé et al., 2021) for K-Adapter at inference: the fine-tuned models
re-predict dev and test with the adapter layers at the lowest positions skipped.

For each task and each fine-tuned variant in ``adapterdrop.variants`` (by default +F+L),
the run's model directory (``<run>/model``, kadapter.inference.load_finetuned) predicts
dev and test once with every adapter layer and once per setting in ``adapterdrop.drops``
(e.g. ``[0]``, then ``[0, 11]``), on the same features and with the same prediction and
metric code as the fine-tuning run; the full model's scores must equal the run's own.
A dropped layer is skipped: the next adapter layer gets its encoder state plus the last
computed adapter output (zeros if none; kadapter.modeling.KnowledgeAdapter.drop_positions).
Every adapter of the model drops the same positions.

K-Adapter's adapters sit beside the encoder (parallel), not inside it, so a drop saves
only that adapter layer's own compute: the encoder still runs all its layers. Throughput
(examples/s, full vs each drop) is measured by benchmarks/adapterdrop.py, not here.

Writes ``<output_dir>/<task>/<variant dir>.json`` per task and variant (scores per drop
setting, the run's fingerprint) and ``<output_dir>/results.json`` (all of them), the
latter last: it is the stage's stamp. A file whose run and settings are unchanged is
kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kadapter.config import Config, ConfigError
from kadapter.io import atomic_write_json, fingerprint_of, read_json

RESULTS_FILE = "results.json"


@dataclass
class AdapterDropConfig:
    """AdapterDrop evaluation of the fine-tuned runs (pipelines.adapterdrop)."""

    variants: list[str] = field(default_factory=lambda: ["fac,lin"])
    """Fine-tuned variants (finetune.variants names) whose models are re-predicted with
    dropped adapter layers; each needs its run under finetune.output_dir."""
    drops: list[list[int]] = field(default_factory=lambda: [[0], [0, 11]])
    """Drop settings: each a list of adapter positions (adapter.positions values) whose
    layers are skipped in every adapter of the model; the full model is always scored too."""
    tasks: list[str] | None = None
    """Tasks evaluated; None = finetune.tasks."""
    batch_size: int | None = None
    """Examples per prediction batch; None = the task's evaluation batch in fine-tuning."""
    output_dir: str = "runs/{preset}/adapterdrop"
    """Where the scores are written: <output_dir>/<task>/<variant dir>.json, results.json."""

    def __post_init__(self) -> None:
        from kadapter.finetune import canonical_variant

        self.variants = [canonical_variant(v) for v in self.variants]
        if "none" in self.variants:
            raise ValueError("variants: the encoder-alone model (none) has no adapter to drop")
        if not self.drops or any(not drop for drop in self.drops):
            raise ValueError(f"drops must be a non-empty list of non-empty position lists, got {self.drops}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null, got {self.batch_size}")


def drop_label(drop: list[int]) -> str:
    """``[0, 11]`` -> ``0,11``; ``[]`` -> ``none`` (the full model)."""
    return ",".join(map(str, drop)) if drop else "none"


def set_dropped(model: Any, drop: list[int]) -> None:
    """Drop ``drop`` positions in every adapter of a FinetuneModel ([] = the full model)."""
    for name, adapter in model.kadapter.adapters.items():
        try:
            adapter.drop_positions(drop)
        except ValueError as err:
            raise ConfigError(f"adapterdrop.drops {drop}: {name} adapter: {err}") from None


def evaluate_run(config: Config, task_name: str, variant: str) -> dict[str, Any]:
    """Scores of one fine-tuned run's model on dev and test, full and per drop setting."""
    import torch

    from kadapter.finetune import (
        MODEL_DIR,
        data_files,
        predict_logits,
        prediction_rows,
        prepare_data,
        run_dir,
        variant_settings,
    )
    from kadapter.inference import load_finetuned
    from kadapter.metrics import score
    from kadapter.tasks import TASKS
    from kadapter.training import batch_plan, make_accelerator

    task = TASKS[task_name]
    run = run_dir(config, task_name, variant)
    settings = variant_settings(config, task_name, variant)
    files = data_files(task, settings, task_name)
    accelerator = make_accelerator(settings)
    loaded = load_finetuned(run / MODEL_DIR, device=accelerator.device)
    data = prepare_data(task, settings, files, loaded.tokenizer, config.finetune.cache_dir,
                        config.finetune.feature_workers, accelerator)
    if data.labels != loaded.labels:
        raise ConfigError(f"{run / MODEL_DIR}: its labels differ from the task's current label set "
                          f"({len(loaded.labels)} vs {len(data.labels)}); fine-tune it again")
    settings_batch = config.adapterdrop.batch_size or batch_plan(
        settings, accelerator.num_processes, f"finetune.{task_name}.batch_size").eval_batch
    pad_id = loaded.tokenizer.pad_token_id
    scores: dict[str, dict[str, Any]] = {}
    torch.manual_seed(config.seed)
    for drop in [[], *config.adapterdrop.drops]:
        set_dropped(loaded.model, drop)
        scores[drop_label(drop)] = {
            split: score(task.metric, prediction_rows(task, data.labels, data.encoded[split], predict_logits(
                loaded.model, data.encoded[split].features, pad_id, settings_batch, accelerator,
                len(data.labels))))
            for split in ("dev", "test")}
    set_dropped(loaded.model, [])
    recorded = read_json(run / "metrics.json")
    return {
        "task": task_name, "variant": variant, "run": str(run), "main_metric": recorded["main_metric"],
        "positions": loaded.model.kadapter.adapters[sorted(loaded.model.kadapter.adapters)[0]].config.positions,
        # the reloaded full model must score as the run did (same weights, features, code)
        "full_matches_run": all(scores["none"][split] == recorded[split] for split in ("dev", "test")),
        "scores": scores,
    }


def result_path(config: Config, task_name: str, variant: str) -> Path:
    from kadapter.finetune import VARIANTS

    return Path(config.adapterdrop.output_dir) / task_name / f"{VARIANTS[variant][0]}.json"


def run_adapterdrop(config: Config) -> dict[str, Any]:
    """Evaluate every task x variant (x seed of finetune.seeds) that has a fine-tuned run (a
    missing run is reported and listed under ``missing``); write the per-run files."""
    from kadapter.finetune import VARIANTS, run_dir, seed_configs

    settings = config.adapterdrop
    tasks = settings.tasks if settings.tasks is not None else config.finetune.tasks
    results, missing = [], []
    for seeded in seed_configs(config):
        seed_label = f" seed {seeded.seed}" if config.finetune.seeds else ""
        for task_name in tasks:
            for variant in settings.variants:
                name = f"adapterdrop {task_name} {VARIANTS[variant][1]}{seed_label}"
                run = run_dir(seeded, task_name, variant)
                manifest = run / "manifest.json"
                if not manifest.is_file():
                    print(f"{name}: no fine-tuned run at {run} (add the variant to "
                          "finetune.variants and run `make finetune`); skipped")
                    missing.append({"task": task_name, "variant": variant, "seed": seeded.seed,
                                    "run": str(run)})
                    continue
                run_fingerprint = read_json(manifest).get("fingerprint")
                key = fingerprint_of({"run": run_fingerprint, "drops": settings.drops,
                                      "batch_size": settings.batch_size})
                path = result_path(seeded, task_name, variant)
                if path.is_file() and read_json(path).get("fingerprint") == key:
                    print(f"{name}: up to date ({path})")
                    results.append(read_json(path))
                    continue
                result = {**evaluate_run(seeded, task_name, variant), "seed": seeded.seed,
                          "run_fingerprint": run_fingerprint, "fingerprint": key}
                atomic_write_json(path, result)
                metric = result["main_metric"]
                summary = ", ".join(f"{label} {_split_score(scores, metric)}"
                                    for label, scores in result["scores"].items())
                print(f"{name} ({metric}; dropped positions -> score): {summary}")
                results.append(result)
    return {"drops": settings.drops, "results": results, "missing": missing}


def write_results(config: Config, summary: dict[str, Any]) -> Path:
    """results.json: every evaluated run's scores (written last: the stage's stamp)."""
    path = Path(config.adapterdrop.output_dir) / RESULTS_FILE
    atomic_write_json(path, summary)
    return path


def _split_score(scores: dict[str, Any], metric: str) -> str:
    split = "test" if scores["test"].get("labelled") else "dev"
    value = scores[split].get(metric)
    return f"{split} {100 * value:.2f}" if value is not None else f"{split} –"


def drop_rows(config: Config) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(task, variant, dropped positions) -> one metrics dict per seed (dev, test,
    main_metric, seed) of every AdapterDrop result found whose fine-tuned run is still the
    one it evaluated (a run redone since is left out until AdapterDrop runs again), for the
    results table; empty when the preset has no adapterdrop section."""
    from kadapter.finetune import VARIANTS, run_dir, seed_configs
    from kadapter.tasks import TASKS

    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    if "adapterdrop" not in config.sections:
        return rows
    for seeded in seed_configs(config):
        for task_name, variant in ((t, v) for t in TASKS for v in VARIANTS):
            path = result_path(seeded, task_name, variant)
            if not path.is_file():
                continue
            result = read_json(path)
            manifest = run_dir(seeded, task_name, variant) / "manifest.json"
            if not manifest.is_file() or read_json(manifest).get("fingerprint") != result.get(
                    "run_fingerprint"):
                continue
            for label, scores in result["scores"].items():
                if label != "none":
                    rows.setdefault((task_name, variant, label), []).append(
                        {**scores, "main_metric": result["main_metric"], "seed": seeded.seed})
    return rows


def row_label(variant: str, drop: str) -> str:
    """The results table's row of a variant with positions ``drop`` dropped: ``+F+L drop 0,11``."""
    from kadapter.finetune import VARIANTS

    return f"{VARIANTS[variant][1]} drop {drop}"
