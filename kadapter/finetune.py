"""Fine-tuning on the downstream tasks: encoder alone, +F, +L, +F+L, +F+L fusion, RoBERTa +
multitask, Serial-F, Serial-L.

RoBERTa + multitask (variant ``multitask``): the encoder of kadapter.multitask, no adapters.
Serial-F / Serial-L (variants ``serial-fac``, ``serial-lin``): the pretrained serial
adapters (``kadapter.serial``) are inserted into the encoder and frozen; no adapter
output is combined, the head reads the adapted encoder's last state.

One run = one task x one variant. The encoder and the task head train; the loaded
knowledge adapters stay frozen (no gradient, eval mode) but gradients flow through
them into the encoder. Shapes at the paper's size: RoBERTa-large (H = 1024) plus
~47M parameters per adapter; the combiner adds 2H x H per adapter and nA*H x H.

    train  --(model selection on dev only, every evaluation)-->  best weights
    best   --> dev predictions + test predictions, each scored from its file, once

A run writes ``<output_dir>/<task>/<variant>/``: ``predictions.jsonl`` (test),
``dev_predictions.jsonl``, ``metrics.json``, ``manifest.json``, plus the training
loop's ``metrics.jsonl``, ``curves.png``, ``tensorboard/`` and ``best/model.safetensors``.
It trains in a hidden sibling ``.<variant>.partial`` (resumable with ``--resume true``)
that is renamed into place only when everything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from kadapter.config import Config, ConfigError, build, to_plain
from kadapter.io import (
    OUTPUT_MARKER,
    InputError,
    atomic_write_json,
    file_fingerprint,
    fingerprint_of,
    read_json,
    replace_dir,
    versions,
)
from kadapter.metrics import main_metric, score, score_file, write_predictions
from kadapter.precision import check_bf16
from kadapter.tasks import TASKS, BadRecord, Encoded, SkippedRecords, Task, collate
from kadapter.training import (
    CURVES_FILE,
    TrainingConfig,
    batch_plan,
    make_accelerator,
    plot_curves,
    precision_of,
    predict_in_order,
    read_metrics,
    train,
)

ADAPTER_NAMES = ("fac", "lin")
SERIAL_VARIANTS = ("serial-fac", "serial-lin")  # kadapter.serial: adapters inside the encoder
MODEL_DIR = "model"  # the run's loadable model directory (kadapter.inference.load_finetuned)
# --adapters value -> (run directory name, row label of the results table)
VARIANTS = {"none": ("encoder", "encoder"), "fac": ("fac", "+F"), "lin": ("lin", "+L"),
            "fac,lin": ("fac+lin", "+F+L"), "fusion": ("fac+lin-fusion", "+F+L fusion"),
            "multitask": ("multitask", "RoBERTa+multitask"),
            "serial-fac": ("serial-fac", "Serial-F"), "serial-lin": ("serial-lin", "Serial-L")}
# named variants -> (adapters, combine mode whatever finetune.combine says)
NAMED_VARIANTS = {"fusion": ("fac,lin", "fusion")}


@dataclass
class TaskConfig(TrainingConfig):
    """One downstream task: its data, input length, head and optimisation (the
    optimisation fields are kadapter.training.TrainingConfig's)."""

    data_dir: str = ""
    """Directory holding the task's files, named as upstream (see train_file...)."""
    train_file: str | None = None
    """Training file inside data_dir; None = the upstream name (train.json,
    train_rand_split.jsonl, ...)."""
    dev_file: str | None = None
    """Dev file inside data_dir; None = the upstream name (dev.json, valid.jsonl, ...).
    CosmosQA: the release's valid.csv when present, else the leaderboard's valid.jsonl
    (labels in valid-labels.lst beside it, or in each record)."""
    test_file: str | None = None
    """Test file inside data_dir; None = the upstream name (test.json,
    test_rand_split_no_answers.jsonl, ...). Unlabelled test files are predicted, not scored."""
    max_length: int = 256
    """Maximum tokens per sequence (special tokens included); longer entity/relation
    inputs are cut to a window around the markers, multiple-choice inputs truncated."""
    dropout: float = 0.1
    """Dropout before the task head's output layer."""
    classifier: Literal["linear", "original"] = "linear"
    """Entity typing and TACRED heads: ``linear`` (ours) = dropout -> one linear layer on
    the pooled mention(s); ``original`` = the original's dense (-> hidden size) -> dropout
    -> out_proj, two linear layers with no nonlinearity between them. Multiple-choice
    heads are dropout -> linear in both."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad record (span out of range or empty, overlapping subject and object, unknown
    label, missing field, invalid JSON line): ``raise`` stops with an error naming file
    and record; ``skip`` leaves it out and counts it by reason in manifest.json
    (``skipped_records``, with the first 20 locations)."""
    pooling: Literal["entity", "marker"] = "entity"
    """Mention pooling: mean over the mention's sub-words (entity, as in pretraining) or
    the opening marker's state (marker, the original code)."""
    labels: list[str] | None = None
    """Label set (types / relations); None = labels_file, else the task's standard set
    (OpenEntity's 9 types, TACRED's 42 relations). FIGER has no standard set here: give
    labels or labels_file. A label outside the set is an input error."""
    labels_file: str | None = None
    """A file holding the label set, one label per line (blank lines ignored), used when
    labels is None: e.g. FIGER's 113 types."""
    max_train_negatives: int | None = None
    """TACRED only: keep the first N no_relation training examples (the original's
    --negative_sample); None = keep all."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-variant settings that differ from the above, keyed by variant (none, fac,
    lin, fac,lin, fusion), e.g. {fac: {learning_rate: 5.0e-6, warmup_steps: 500}}."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        unknown = sorted(set(self.overrides) - set(VARIANTS))
        if unknown:
            raise ValueError(f"overrides has unknown variant(s) {unknown}; known {sorted(VARIANTS)}")


def _task(data_dir: str, **kwargs: Any):
    return field(default_factory=lambda: TaskConfig(data_dir=data_dir, **kwargs))


@dataclass
class FinetuneConfig:
    """Fine-tuning on the downstream tasks (pipelines.finetune, pipelines.finetune_all)."""

    task: Literal["typing", "figer", "csqa", "cosmosqa", "tacred"] = "typing"
    """Task of a single run (pipelines.finetune)."""
    adapters: str = "none"
    """Adapters of a single run: none, fac, lin, fac,lin, or a named variant (fusion: fac and
    lin joined by AdapterFusion; multitask: the multitask encoder, no adapters; serial-fac,
    serial-lin: serial adapters inside the encoder)."""
    tasks: list[str] = field(default_factory=lambda: ["typing", "figer", "csqa", "cosmosqa", "tacred"])
    """Tasks run by pipelines.finetune_all."""
    variants: list[str] = field(default_factory=lambda: ["none", "fac", "lin", "fac,lin"])
    """Variants run by pipelines.finetune_all (rows of the results table)."""
    fac_adapter: str = "runs/{preset}/fac-adapter"
    """The factual adapter: a directory (written by pretraining or pipelines.convert_original)
    or a Hub id (``owner/name``, ``owner/name@revision``)."""
    lin_adapter: str = "runs/{preset}/lin-adapter"
    """The linguistic adapter: a directory or a Hub id."""
    multitask_encoder: str = "runs/{preset}/multitask"
    """Variant ``multitask``: the encoder trained on fac and lin jointly
    (kadapter.multitask, ``make pretrain-multitask``), fine-tuned instead of
    model.name_or_path's, with no adapters."""
    serial_fac_adapter: str = "runs/{preset}/serial-fac-adapter"
    """Variant serial-fac: serial (Houlsby) adapters pretrained on the factual task
    (``make pretrain-serial-fac``), inserted into the encoder and frozen; a directory or
    a Hub id."""
    serial_lin_adapter: str = "runs/{preset}/serial-lin-adapter"
    """Variant serial-lin: serial adapters pretrained on the linguistic task."""
    combine: Literal["concat", "add", "fusion"] = "concat"
    """How adapter outputs join the encoder's last state (kadapter.modeling.Combiner); the
    ``fusion`` variant uses ``fusion`` whatever this says."""
    fusion_train_encoder: bool = False
    """The ``fusion`` variant: false (Pfeiffer et al., 2021) trains only the fusion layer and
    the task head, encoder and adapters frozen; true fine-tunes the encoder too, as every
    other variant does."""
    adapter_dropout: bool = False
    """Dropout inside the frozen adapters while fine-tuning: false (ours) runs them in eval
    mode, as fixed feature extractors; true keeps their dropout on in training, as the
    original does (it never switches them to eval)."""
    output_dir: str = "runs/{preset}/finetune"
    """Root of the runs: <output_dir>/<task>/<variant>/."""
    results: str = "runs/{preset}/results.md"
    """The paper-shaped results table written by pipelines.finetune_all (a PNG chart of
    the main metric per task and variant is written beside it)."""
    launcher: str | None = None
    """pipelines.finetune_all: command that starts each run (e.g. ``.venv/bin/accelerate
    launch``); null or empty = run every task and variant in this process."""
    resume: bool = False
    """Continue an interrupted run from its latest checkpoint."""
    bf16: Literal["auto", True, False] = "auto"
    """Mixed precision of every task whose own ``bf16`` is ``auto``: true = bf16 autocast
    on any device, false = none, auto = Accelerate's setting or the device's
    (kadapter/precision.py). The encoder trains with fp32 master weights either way."""
    seeds: list[int] | None = None
    """pipelines.finetune_all: run every task and variant once per seed, each seed in its
    own tree <output_dir>/seed-<n>/<task>/<variant>/; results.md and results.png then
    show mean ± std over the seeds. None = one run with the preset's seed, in
    <output_dir>/<task>/<variant>/."""
    cache_dir: str = "data/processed/{preset}/features"
    """Where the feature stage caches each task's tokenized features (one directory per
    key: task, tokenizer, input files, max_length, labels), shared by every variant."""
    feature_workers: int = 0
    """Processes that build a missing feature cache (0 = every core)."""
    typing: TaskConfig = _task("data/sample/openentity")
    """OpenEntity entity typing: a TaskConfig (its keys: kadapter/finetune.py and training.py);
    override one key as --finetune.typing.<key> value."""
    figer: TaskConfig = _task("data/sample/figer")
    """FIGER entity typing: a TaskConfig (its keys: kadapter/finetune.py and training.py);
    override one key as --finetune.figer.<key> value."""
    csqa: TaskConfig = _task("data/sample/csqa")
    """CommonsenseQA multiple choice: a TaskConfig (its keys: kadapter/finetune.py and training.py);
    override one key as --finetune.csqa.<key> value."""
    cosmosqa: TaskConfig = _task("data/sample/cosmosqa")
    """CosmosQA multiple choice: a TaskConfig (its keys: kadapter/finetune.py and training.py);
    override one key as --finetune.cosmosqa.<key> value."""
    tacred: TaskConfig = _task("data/sample/tacred")
    """TACRED relation classification: a TaskConfig (its keys: kadapter/finetune.py and training.py);
    override one key as --finetune.tacred.<key> value."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"tasks has unknown task(s) {unknown}; known {sorted(TASKS)}")
        for variant in self.variants:
            canonical_variant(variant)
        canonical_variant(self.adapters)
        check_bf16(self.bf16)
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}")


def canonical_variant(adapters: str) -> str:
    """``fac,lin`` / ``lin, fac`` -> ``fac,lin``; ``none`` and a named variant (a VARIANTS
    key without a comma, e.g. ``fusion``, ``serial-fac``) stay; anything else is an error."""
    if adapters.strip() in VARIANTS and "," not in adapters:
        return adapters.strip()
    names = sorted({name.strip() for name in adapters.split(",") if name.strip()})
    if names == ["none"]:
        return "none"
    if not names or any(name not in ADAPTER_NAMES for name in names):
        named = ", ".join(v for v in VARIANTS if v not in ("none", *ADAPTER_NAMES, "fac,lin"))
        raise ValueError(f"adapters {adapters!r} must be none, fac, lin or fac,lin, or a named "
                         f"variant: {named}")
    return ",".join(names)


def variant_settings(config: Config, task_name: str, variant: str) -> TaskConfig:
    """The task's settings with the variant's overrides applied (and validated); a task
    ``bf16`` left at ``auto`` takes the finetune section's."""
    base = getattr(config.finetune, task_name)
    if base.bf16 == "auto" and config.finetune.bf16 != "auto":
        base = dataclasses.replace(base, bf16=config.finetune.bf16)
    override = base.overrides.get(variant, {})
    if not override:
        return base
    merged = {**to_plain(base), **override, "overrides": {}}
    return build(TaskConfig, merged, f"{config.source}:finetune.{task_name}.overrides.{variant}")


def variant_combine(config: Config, variant: str) -> str:
    """The Combiner mode of a variant's runs."""
    return NAMED_VARIANTS[variant][1] if variant in NAMED_VARIANTS else config.finetune.combine


def seed_configs(config: Config) -> list[Config]:
    """One config per seed of ``finetune.seeds`` (its own output trees: fine-tuning runs and
    AdapterDrop scores), or the config itself."""
    if config.finetune.seeds is None:
        return [config]
    configs = []
    for seed in config.finetune.seeds:
        seeded = copy.deepcopy(config)
        seeded.seed = seed
        seeded.finetune.output_dir = str(Path(config.finetune.output_dir) / f"seed-{seed}")
        seeded.finetune.seeds = None
        if "adapterdrop" in seeded.sections:  # its scores per seed too
            seeded.adapterdrop.output_dir = str(Path(config.adapterdrop.output_dir) / f"seed-{seed}")
        configs.append(seeded)
    return configs


def variant_trains_encoder(config: Config, variant: str) -> bool:
    """Whether a variant's runs fine-tune the encoder (all but fusion's own choice)."""
    return variant != "fusion" or config.finetune.fusion_train_encoder


def run_dir(config: Config, task_name: str, variant: str) -> Path:
    return Path(config.finetune.output_dir) / task_name / VARIANTS[variant][0]


def adapter_sources(config: Config, variant: str) -> dict[str, str]:
    """Adapter name -> its configured directory or Hub id."""
    if variant in ("none", "multitask"):
        return {}
    if variant in SERIAL_VARIANTS:  # one serial adapter, named by its variant
        return {variant: getattr(config.finetune, f"{variant.replace('-', '_')}_adapter")}
    paths = {"fac": config.finetune.fac_adapter, "lin": config.finetune.lin_adapter}
    names = NAMED_VARIANTS[variant][0] if variant in NAMED_VARIANTS else variant
    return {name: paths[name] for name in names.split(",")}


def adapter_dirs(config: Config, variant: str) -> dict[str, Path]:
    """Adapter name -> local directory (a Hub id is fetched into the Hub cache)."""
    from kadapter.hub import resolve_adapter

    return {name: resolve_adapter(source) for name, source in adapter_sources(config, variant).items()}


def data_files(task: Task, settings: TaskConfig, task_name: str) -> dict[str, Path]:
    if not settings.data_dir:
        raise ConfigError(f"finetune.{task_name}.data_dir is not set")
    names = (settings.train_file, settings.dev_file, settings.test_file)
    return {split: Path(settings.data_dir) / (name or default)
            for split, name, default in zip(("train", "dev", "test"), names,
                                            task.default_files(settings.data_dir))}


def run_fingerprint(config: Config, task_name: str, variant: str) -> str:
    """Everything a run's result depends on: settings, seed, model, data and adapter bytes."""
    settings = variant_settings(config, task_name, variant)
    files = data_files(TASKS[task_name], settings, task_name)
    return fingerprint_of({
        "task": task_name, "variant": variant, "settings": to_plain(settings), "seed": config.seed,
        "model": to_plain(config.model), "combine": variant_combine(config, variant),
        **({"train_encoder": config.finetune.fusion_train_encoder} if variant == "fusion" else {}),
        "adapter_dropout": config.finetune.adapter_dropout,
        "data": {split: file_fingerprint(path) for split, path in files.items() if path.is_file()},
        "adapters": adapter_fingerprints(config, variant),
        **({"multitask_encoder": multitask_fingerprints(config)} if variant == "multitask" else {}),
    })


def adapter_fingerprints(config: Config, variant: str) -> dict[str, list[dict[str, Any]]]:
    """Every file of each adapter directory the variant loads, hashed (not the output
    marker, which only says which stage wrote the directory)."""
    return {name: [file_fingerprint(p) for p in sorted(path.glob("*"))
                   if p.is_file() and p.name != OUTPUT_MARKER]
            for name, path in adapter_dirs(config, variant).items()}


def multitask_dir(config: Config) -> Path:
    """The multitask encoder's directory; missing or incomplete is a ConfigError."""
    from kadapter.multitask import is_multitask_dir

    path = Path(config.finetune.multitask_encoder)
    if not is_multitask_dir(path):
        raise ConfigError(f"variant multitask: no multitask encoder in {path} (run `make "
                          "pretrain-multitask` first, or set --finetune.multitask_encoder)")
    return path


def multitask_fingerprints(config: Config) -> list[dict[str, Any]]:
    """Every file of the multitask encoder's directory, hashed (not the output marker)."""
    return [file_fingerprint(p) for p in sorted(multitask_dir(config).glob("*"))
            if p.is_file() and p.name != OUTPUT_MARKER]


def encoder_path(config: Config, variant: str) -> str:
    """Where the variant's encoder loads from: the multitask run's directory, else the
    configured model (its base model must be the configured one: same tokenizer)."""
    from kadapter.modeling import resolve_model_path

    if variant != "multitask":
        return resolve_model_path(config.model)
    path = multitask_dir(config)
    base = read_json(path / "manifest.json").get("base_model")
    if base != config.model.name_or_path:
        raise ConfigError(f"variant multitask: {path} was trained from {base!r}, not model "
                          f"{config.model.name_or_path!r}")
    return str(path)


# ------------------------------------------------------------------------------ model


class FinetuneModel(nn.Module):
    """Encoder (trainable unless ``train_encoder`` is false) + frozen adapters -> Combiner ->
    task head -> logits.

    ``adapter_dropout``: the frozen adapters follow the model's train/eval mode (their
    dropout is on in training, as in the original) instead of staying in eval mode."""

    def __init__(self, encoder: nn.Module, adapters: dict[str, nn.Module], head: nn.Module,
                 combine: Literal["concat", "add", "fusion"], adapter_dropout: bool = False,
                 train_encoder: bool = True):
        from kadapter.modeling import Combiner, KAdapterModel

        super().__init__()
        self.kadapter = KAdapterModel(encoder, adapters, freeze_encoder=not train_encoder,
                                      frozen_adapters=list(adapters))
        self.combiner = Combiner(list(adapters), encoder.config.hidden_size, mode=combine,
                                 fusion_dropout=getattr(encoder.config, "attention_probs_dropout_prob", 0.1))
        self.head = head
        self.adapter_dropout = adapter_dropout

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        if self.adapter_dropout:
            self.kadapter.adapters.train(mode)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.kadapter(batch["input_ids"], batch["attention_mask"])
        return self.head(self.combiner(out.last_hidden_state, out.adapter_outputs), batch)


def load_adapters(config: Config, variant: str, encoder: nn.Module) -> dict[str, nn.Module]:
    """The variant's K-Adapters (frozen by FinetuneModel); a serial variant's adapters are
    inserted into ``encoder`` instead, frozen, and none is returned."""
    from kadapter.modeling import AdapterLoadError, load_adapter
    from kadapter.serial import load_serial_adapter

    adapters = {}
    for name, path in adapter_dirs(config, variant).items():
        try:
            if name in SERIAL_VARIANTS:
                load_serial_adapter(path, encoder).adapters.requires_grad_(False)
            else:
                adapters[name] = load_adapter(path, encoder.config).adapter
        except AdapterLoadError as err:
            raise ConfigError(f"{err} (run `make pretrain-{name}` first, or set "
                              f"--finetune.{name.replace('-', '_')}_adapter to an adapter "
                              "directory)") from err
    return adapters


# ------------------------------------------------------------------------------- data


@dataclass
class Splits:
    labels: list[str]
    encoded: dict[str, Encoded]
    """train: its mapped features only (no examples held); dev, test: features, the
    examples behind them and the file's examples."""
    counts: dict[str, dict[str, int]]
    skipped: dict[str, Any]
    """Bad records left out under on_error: skip (SkippedRecords.summary())."""
    labels_found: int
    """Distinct labels in the three files (FIGER's release has 113 types); 0 for
    multiple choice."""
    cache: str
    """The feature cache directory."""


def read_splits(task: Task, settings: TaskConfig, files: dict[str, Path],
                skipped: SkippedRecords | None = None) -> dict[str, list[Any]]:
    """Every split's examples. A bad record raises with a hint at on_error: skip, or, when
    the task's on_error is skip, is counted in ``skipped`` and left out. The train and dev
    splits must be labelled."""
    configured = configured_labels(task, settings)
    log = None
    if settings.on_error == "skip":
        log = skipped if skipped is not None else SkippedRecords()
    examples = {}
    for split, path in files.items():
        try:
            examples[split] = task.reader(path, configured, log)
        except BadRecord as err:
            raise InputError(err.path, err.record, f"{err.problem} (to leave such records out and count "
                             f"them, set --finetune.{task.name}.on_error skip)") from None
    for split, purpose in (("train", "train on"), ("dev", "select the model with")):
        if split in examples:
            task.check_labelled(examples[split], files[split], purpose)
    return examples


def configured_labels(task: Task, settings: TaskConfig) -> list[str] | None:
    """The label vocabulary every example is checked against: ``labels``, else the lines of
    ``labels_file``, else the task's standard set. FIGER has none built in (types are
    not whatever the files happen to contain): a ConfigError without either setting."""
    if settings.labels is not None:
        return settings.labels
    if settings.labels_file is not None:
        path = Path(settings.labels_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"finetune.{task.name}.labels_file {path}: cannot read: {err}") from None
        labels = [line.strip() for line in text.splitlines() if line.strip()]
        if not labels or len(set(labels)) != len(labels):
            raise ConfigError(f"finetune.{task.name}.labels_file {path}: expected distinct labels, "
                              "one per line")
        return labels
    if task.default_labels is None and task.name == "figer":
        raise ConfigError("finetune.figer needs its type vocabulary: set labels or labels_file "
                          "(the release's 113 types), so that an unknown type is caught")
    return task.default_labels


def prepare_data(task: Task, settings: TaskConfig, files: dict[str, Path], tokenizer,
                 cache_dir: str | Path, workers: int = 0, accelerator=None) -> Splits:
    """The task's features, mapped from the feature cache (built first when missing:
    read the three files, fix the label set, encode, count what is dropped, cut or
    skipped), and the dev and test examples again (small: their predictions are written
    per example)."""
    from kadapter.features import finetune_features

    if settings.max_train_negatives is not None and task.kind != "relation":
        raise ConfigError(f"finetune.{task.name}.max_train_negatives is for TACRED only")
    features = finetune_features(task, settings, files, tokenizer, Path(cache_dir), workers,
                                 accelerator)
    encoded = {"train": Encoded(features.splits["train"], [], [], [])}
    # the same reading as the cache's (same skips), so record indices match
    evaluated = read_splits(task, settings, {split: files[split] for split in ("dev", "test")})
    for split, source in evaluated.items():
        kept = features.kept[split].tolist()
        dropped = set(range(len(source))) - set(kept)
        encoded[split] = Encoded(features.splits[split], [source[i] for i in kept],
                                 [source[i] for i in sorted(dropped)], source)
    counts = features.counts
    for split, purpose in (("train", "train on"), ("dev", "select the model with")):
        if not counts[split]["encoded"]:
            raise ConfigError(f"{files[split]}: no example to {purpose} ({counts[split]['examples']} "
                              f"read, {counts[split]['too_long']} longer than max_length "
                              f"{settings.max_length})")
    return Splits(features.labels, encoded, counts, features.skipped, features.labels_found,
                  features.cache)


def prediction_rows(task: Task, labels: list[str], encoded: Encoded, logits: np.ndarray) -> list[dict]:
    """One row per example of the split, in file order; an example too long to encode gets
    the task's fallback prediction (scored like any other) and ``too_long: true``."""
    predicted = {id(e): task.decode(torch.from_numpy(row), labels, e)
                 for e, row in zip(encoded.examples, logits)}
    rows = []
    for example in encoded.source:
        row = {"id": example.id, "gold": task.gold(example)}
        if id(example) in predicted:
            row["predicted"] = predicted[id(example)]
        else:
            row.update(predicted=task.fallback(labels, example), too_long=True)
        rows.append(row)
    return rows


def majority_baseline(task: Task, settings: TaskConfig, files: dict[str, Path], split: str) -> dict:
    """Scores of predicting, for every example of ``split``, the most frequent training
    label (type set, relation, or answer position; ties to the smallest): the bar a model
    must clear."""
    from collections import Counter

    examples = read_splits(task, settings, {"train": files["train"], split: files[split]})
    train, target = examples["train"], examples[split]
    if task.kind == "choice":
        counts = Counter(e.choice_labels.index(e.answer) for e in train if e.answer is not None)
        position = min(counts, key=lambda p: (-counts[p], p))
        predicted = [e.choice_labels[position] for e in target]
    else:
        counts = Counter(json.dumps(task.gold(e)) for e in train)
        majority = json.loads(min(counts, key=lambda g: (-counts[g], g)))
        predicted = [majority for _ in target]
    return score(task.metric, [{"id": e.id, "gold": task.gold(e), "predicted": p}
                               for e, p in zip(target, predicted)])


def predict_logits(model: nn.Module, features: Sequence[dict], pad_id: int, batch_size: int,
                   accelerator, num_labels: int | None = None) -> np.ndarray:
    """Logits of every feature, in order; batches sharded over processes and gathered."""
    if not len(features):
        return np.zeros((0, 0), dtype=np.float32)
    model.eval()
    return predict_in_order(accelerator, features, batch_size,
                            lambda rows: collate(rows, pad_id, num_labels),
                            lambda batch: {"logits": model(batch)})["logits"]


# -------------------------------------------------------------------------------- run


def training_config(settings: TaskConfig, select_metric: str) -> TrainingConfig:
    """The loop's own fields of the task settings; selection on the task's main dev metric
    unless select_metric is set."""
    plain = {f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainingConfig)}
    plain["select_metric"] = settings.select_metric or select_metric
    return TrainingConfig(**plain)


def run_finetune(config: Config, task_name: str, adapters: str) -> dict[str, Any]:
    """Train one task x variant, select on dev, evaluate dev and test once; write the run."""
    from kadapter.modeling import load_encoder, load_tokenizer

    variant = canonical_variant(adapters)
    task = TASKS[task_name]
    settings = variant_settings(config, task_name, variant)
    files = data_files(task, settings, task_name)
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{task_name} {path.name}: {path} not found (set "
                                    f"--finetune.{task_name}.data_dir)")
    final = run_dir(config, task_name, variant)
    staging = final.with_name(f".{final.name}.partial")
    accelerator = make_accelerator(settings)
    main = accelerator.is_main_process
    batch_key = f"finetune.{task_name}.batch_size"
    batch_plan(settings, accelerator.num_processes, batch_key)  # a batch that cannot split fails now
    if main and not config.finetune.resume:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    started = time.time()

    # ---- model and data
    model_path = encoder_path(config, variant)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(task, settings, files, tokenizer, config.finetune.cache_dir,
                        config.finetune.feature_workers, accelerator)
    torch.manual_seed(config.seed)  # head and combiner initialisation
    encoder = load_encoder(model_path, dtype=torch.float32)  # trainable: fp32 master weights
    loaded = load_adapters(config, variant, encoder)
    head = task.head(encoder.config.hidden_size, len(data.labels), settings.dropout, settings.pooling,
                     settings.classifier)
    combine = variant_combine(config, variant)
    model = FinetuneModel(encoder, loaded, head, combine, config.finetune.adapter_dropout,
                          train_encoder=variant_trains_encoder(config, variant))
    metric = main_metric(task.metric)
    pad_id = tokenizer.pad_token_id
    dev = data.encoded["dev"]

    def dev_metrics(arrays: dict[str, np.ndarray]) -> dict[str, float]:
        rows = prediction_rows(task, data.labels, dev, arrays["logits"])
        return {k: v for k, v in score(task.metric, rows).items() if k not in ("examples", "labelled")}

    loop_config = training_config(settings, metric)
    result = train(
        loop_config,
        model=model,
        train_data=data.encoded["train"].features,
        dev_data=dev.features,
        collate=lambda items: collate(items, pad_id, len(data.labels)),
        loss_fn=lambda m, batch, _: task.loss(m(batch), batch["labels"]),
        predict_fn=lambda m, batch, _: {"logits": m(batch)},
        metrics_fn=dev_metrics,
        output_dir=staging,
        seed=config.seed,
        resume=config.finetune.resume,
        accelerator=accelerator,
        description=f"{task_name} {VARIANTS[variant][1]}",
        batch_key=batch_key,
        stage="finetune",
        run_config={"model": config.model.name_or_path, "combine": combine,
                    "adapters": adapter_fingerprints(config, variant),
                    **({"multitask_encoder": multitask_fingerprints(config)}
                       if variant == "multitask" else {})},
    )

    # ---- the selected weights predict dev and test once; metrics come from the files
    eval_batch = result.batch.eval_batch
    logits = {split: predict_logits(result.model, data.encoded[split].features, pad_id, eval_batch,
                                    accelerator, len(data.labels)) for split in ("dev", "test")}
    summary: dict[str, Any] = {}
    if main:
        for split, name in (("dev", "dev_predictions.jsonl"), ("test", "predictions.jsonl")):
            rows = prediction_rows(task, data.labels, data.encoded[split], logits[split])
            write_predictions(staging / name, rows)
            summary[split] = score_file(task.metric, staging / name)
        summary.update(task=task_name, variant=variant, main_metric=metric,
                       selected_step=result.best_step, steps=result.global_step)
        atomic_write_json(staging / "metrics.json", summary)
        atomic_write_json(staging / "manifest.json", {
            "stage": "finetune",
            "task": task_name,
            "variant": variant,
            "fingerprint": run_fingerprint(config, task_name, variant),
            "inputs": {
                "data": {split: file_fingerprint(path) for split, path in files.items()},
                "model": config.model.name_or_path,
                **({"encoder": str(multitask_dir(config))} if variant == "multitask" else {}),
                "adapters": adapter_fingerprints(config, variant),
            },
            "parameters": {"settings": to_plain(settings), "training": to_plain(loop_config),
                           "combine": combine,
                           "train_encoder": variant_trains_encoder(config, variant),
                           "adapter_dropout": config.finetune.adapter_dropout, "seed": config.seed,
                           "processes": accelerator.num_processes,
                           "precision": precision_of(settings).to_dict()},
            "labels": data.labels,
            "labels_found": data.labels_found,
            "counts": data.counts,
            "skipped_records": data.skipped,
            "features": data.cache,
            "training": {"steps": result.global_step, "selected_step": result.best_step,
                         "tokens": result.tokens, "train_seconds": round(result.train_seconds, 3),
                         "tokens_per_s": round(result.tokens_per_s, 1),
                         "wall_seconds": round(time.time() - started, 3),
                         "resumed_from": result.resumed_from,
                         "batch": {**result.batch.to_dict(),
                                   "examples_left_per_epoch": result.examples_left_per_epoch},
                         "resumed_config_changes": result.config_changes},
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "versions": versions(),
            "outputs": ["predictions.jsonl", "dev_predictions.jsonl", "metrics.json",
                        "metrics.jsonl", "curves.png", "best/model.safetensors", f"{MODEL_DIR}/"],
        })
        majority = majority_baseline(task, settings, files, "dev")  # the curves with the bar to beat
        plot_curves(read_metrics(staging), staging / CURVES_FILE, f"{task_name} {VARIANTS[variant][1]}",
                    baselines={k: v for k, v in majority.items() if k not in ("examples", "labelled")})
        save_model_dir(staging / MODEL_DIR, config, task_name, variant, result.model, tokenizer,
                       data.labels, settings, summary, files)
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # resumable state, no longer needed
        replace_dir(staging, final, stage="finetune")
        print(f"{task_name} {VARIANTS[variant][1]}: dev {metric} {summary['dev'].get(metric)}, "
              f"test {metric} {summary['test'].get(metric)} -> {final}")
    accelerator.wait_for_everyone()
    return summary


def save_model_dir(directory: Path, config: Config, task_name: str, variant: str, model: nn.Module,
                   tokenizer, labels: list[str], settings: TaskConfig, summary: dict[str, Any],
                   files: dict[str, Path]) -> Path:
    """The run's selected weights as a loadable model directory with a model card
    (``kadapter.inference.load_finetuned``)."""
    from kadapter.hub import model_revision
    from kadapter.inference import finetuned_config, save_finetuned
    from kadapter.modeling import count_parameters

    base = config.finetune.multitask_encoder if variant == "multitask" else config.model.name_or_path
    info = finetuned_config(
        task=task_name, variant=variant, labels=labels, settings=settings,
        combine=variant_combine(config, variant), adapters=adapter_sources(config, variant),
        base_model=base, base_model_revision=model_revision(model.kadapter.encoder.config._name_or_path),
        tokenizer_name=base, metrics={split: summary[split] for split in ("dev", "test")},
        data={split: file_fingerprint(path) for split, path in files.items()},
        parameters={"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "total": count_parameters(model)})
    return save_finetuned(directory, model, tokenizer, info)
