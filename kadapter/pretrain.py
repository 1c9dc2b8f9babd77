"""Adapter pretraining: the factual (relation classification) and linguistic (dependency
head prediction) tasks of K-Adapter, on a frozen encoder.

    accelerate launch -m pipelines.pretrain --config configs/sample.yaml --task fac|lin

Both tasks share one path (``run_pretraining``):

1. features: the task's Parquet rows are turned into token ids (and spans or per-token
   labels) once, by the feature stage (``kadapter.features``, ``make features``), into a
   memory-mapped columnar cache under ``cache_dir/<task>-<key>/`` where the key hashes
   the tokenizer, the input files, ``max_length`` and the feature code version; a
   training run only maps it (a missing cache is built by the main process first, with
   ``feature_workers`` processes, while the others wait up to ``process_group_timeout_s``);
2. model: the frozen encoder (bf16 on CUDA, eval mode, ``no_grad``, outside DDP) gives
   its hidden states; the trainable part is the knowledge adapter plus a task head;
   the head first combines ``concat(encoder_last, adapter_out) -> dense`` with
   ``kadapter.modeling.Combiner`` (mode ``concat``), so every head reads the
   *combined* features (B, T, H); with ``--kind serial`` (``run_pretraining``'s ``kind``)
   serial bottleneck adapters sit inside the frozen encoder instead (``kadapter.serial``),
   the encoder runs with autograd inside the trained model, and the same heads read the
   adapted encoder's last state with no combiner;
3. training with ``kadapter.training.train`` (AdamW, linear warm-up/decay, resumable);
4. outputs in ``output_dir``: ``adapter_config.json`` + ``adapter.safetensors`` (the
   adapter and the head, loadable with ``kadapter.modeling.load_adapter``; the head is
   rebuilt with ``build_head``), ``metrics.jsonl``, ``tensorboard/``, ``curves.png``,
   ``checkpoints/`` and ``manifest.json``. The run trains in the hidden sibling
   ``.<output_dir name>.partial`` (where ``--resume`` continues) and replaces
   ``output_dir`` whole only when complete: a killed run never loses the previous adapter.

Factual task (``fac``), T-REx-rc rows ``sentence, subj_start, subj_end, obj_start,
obj_end, relation, label``: ``@`` is inserted around the subject and ``#`` around the
object at their character offsets (``kadapter.spans.mark_spans``), the text tokenized
with offsets and cut to ``max_length`` (64: T-REx sentences average ~23 tokens); the
mention token spans come from the offsets (``token_span``). A pair whose mention or
opening marker was cut away is skipped and counted. Head: subject and object vectors
pooled from the combined features, either ``entity`` pooling (mean over the mention's
sub-word positions, the default) or ``marker`` pooling (the opening ``@`` / ``#``
position, as the original code did), then concat(subject, object) -> dropout -> dense
-> relation logits; cross-entropy. Dev metrics: accuracy, micro-F1 (every relation is
a positive class, so it equals accuracy) and macro-F1 (mean over the relations that
occur in dev gold labels or predictions).

Linguistic task (``lin``), dependency rows ``text, word_starts, word_ends, heads``:
``kadapter.deps.head_labels_batch`` labels the first sub-token of each word with the
position of its head word's first sub-token (root -> 0, ``<s>``), others -100;
sentences left with no labelled word are skipped and counted. Head: dense -> GELU ->
single-head self-attention (real-token keys only) -> query/key dense layers whose scaled
dot products give one logit per position of the sequence (a pointer; see
``HeadPositionHead`` for why not the original's absolute-position classifier); logits at
padded positions are masked; cross-entropy over labelled positions. Dev metric:
unlabelled attachment score (UAS) over labelled words.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kadapter.config import Config, ConfigError, to_plain
from kadapter.features import parquet_chunks, pretrain_features
from kadapter.hub import MODEL_CARD_FILE
from kadapter.io import (
    InputError,
    atomic_write_json,
    check_output_dir,
    file_fingerprint,
    remove_stale_temporaries,
    replace_dir,
    versions,
)
from kadapter.modeling import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    Combiner,
    KnowledgeAdapter,
    count_parameters,
    encoder_dtype,
    load_encoder,
    load_tokenizer,
    max_sequence_length,
    resolve_model_path,
    save_adapter,
)
from kadapter.progress import progress_chunks
from kadapter.serial import save_serial_adapter
from kadapter.spans import gather_positions, mark_spans, span_mean, token_span
from kadapter.training import (
    CURVES_FILE,
    FeatureTable,
    PadCollator,
    TrainingConfig,
    batch_plan,
    make_accelerator,
    plot_curves,
    read_metrics,
    train,
    training_summary,
)

TASKS = ("fac", "lin")
IGNORE_INDEX = -100
SUBJECT_MARKER, OBJECT_MARKER = "@", "#"
FAC_COLUMNS = ("sentence", "subj_start", "subj_end", "obj_start", "obj_end", "relation", "label")
LIN_COLUMNS = ("text", "word_starts", "word_ends", "heads")


@dataclass
class PretrainConfig(TrainingConfig):
    """Sections ``pretrain_fac`` and ``pretrain_lin``: one adapter pretraining run.

    The optimisation fields (learning_rate ... bf16) are those of
    ``kadapter.training.TrainingConfig``; both presets set the task-specific values
    (max_length, paths, hyperparameters) explicitly in each section.
    """

    data_dir: str | None = None
    """Input directory: the T-REx-rc stage's output (train/dev.parquet, relations.json)
    for fac, the deps stage's output (train/dev.parquet) for lin. None =
    data/processed/<preset>/trex_rc or data/processed/<preset>/deps."""
    output_dir: str | None = None
    """Run directory (adapter, metrics, checkpoints, manifest). None =
    runs/<preset>/fac-adapter or runs/<preset>/lin-adapter."""
    cache_dir: str = "data/processed/{preset}/features"
    """Where tokenized features are cached, one directory per key (a hash of the task,
    tokenizer, input files and max_length)."""
    max_length: int = 64
    """Maximum sequence length in sub-word tokens, special tokens included (paper: 64 for
    fac, 128 for lin; lin predicts one of max_length head positions)."""
    pooling: Literal["entity", "marker"] = "entity"
    """fac only: ``entity`` = mean of the combined features over the mention's sub-words;
    ``marker`` = the combined features at the opening @ / # marker (the original)."""
    head_dropout: float = 0.1
    """Dropout in the task head."""
    feature_workers: int = 0
    """Processes that build a missing feature cache (0 = every core); the cache and its
    key do not depend on it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")


def resolve_paths(section: PretrainConfig, task: str, preset: str) -> tuple[Path, Path, Path]:
    """(data_dir, output_dir, cache_dir), the first two defaulting per task (the config
    has already put the preset's name in place of ``{preset}``)."""
    data = section.data_dir or f"data/processed/{preset}/{'trex_rc' if task == 'fac' else 'deps'}"
    out = section.output_dir or f"runs/{preset}/{task}-adapter"
    return Path(data), Path(out), Path(section.cache_dir)


# --------------------------------------------------------------------------- features
# The one-example-at-a-time reference of the features that kadapter.features builds in
# parallel: tests check the cache equals it, benchmarks/paper_scale.py times it.


def read_rows(path: Path, columns: tuple[str, ...]):
    """Yield (first row index, list of row dicts) chunks of a Parquet file (the feature
    stage's checked ``parquet_chunks``, as Python rows)."""
    for first, batch in parquet_chunks(path, columns):
        yield first, batch.to_pylist()


def fac_features(path: Path, tokenizer, max_length: int, relations: list[str]
                 ) -> tuple[FeatureTable, dict[str, int]]:
    """T-REx-rc rows -> marked, tokenized examples with mention and marker positions."""
    out, counts = [], Counter()
    for first, rows in progress_chunks(read_rows(path, FAC_COLUMNS), desc=f"tokenize {path.name}"):
        marked = []
        for offset, row in enumerate(rows):
            index = first + offset
            label = row["label"]
            if not (isinstance(label, int) and 0 <= label < len(relations)
                    and relations[label] == row["relation"]):
                raise InputError(path, index, f"label {label!r} does not match relation "
                                 f"{row['relation']!r} in relations.json")
            try:
                marked.append(mark_spans(row["sentence"], [
                    (row["subj_start"], row["subj_end"], SUBJECT_MARKER),
                    (row["obj_start"], row["obj_end"], OBJECT_MARKER)]))
            except (TypeError, ValueError) as err:
                raise InputError(path, index, f"bad subject/object offsets: {err}") from None
        encoded = tokenizer([m.text for m in marked], truncation=True, max_length=max_length,
                            return_offsets_mapping=True, return_attention_mask=False)
        for m, row, ids, offsets in zip(marked, rows, encoded["input_ids"],
                                        encoded["offset_mapping"]):
            counts["rows"] += 1
            spans = [token_span(offsets, *m.mentions[0]), token_span(offsets, *m.mentions[1]),
                     token_span(offsets, *m.markers[0]), token_span(offsets, *m.markers[1])]
            # the mention must survive truncation whole: its last sub-word reaches its end
            if any(s is None for s in spans) or any(
                    offsets[spans[k][1] - 1][1] < m.mentions[k][1] for k in (0, 1)):
                counts["skipped_truncated"] += 1
                continue
            subject, obj, subject_marker, object_marker = spans
            out.append({"input_ids": ids, "label": row["label"],
                        "subj_start": subject[0], "subj_end": subject[1],
                        "obj_start": obj[0], "obj_end": obj[1],
                        "subj_marker": subject_marker[0], "obj_marker": object_marker[0]})
    if not out:
        raise InputError(path, None, f"no usable examples ({dict(counts)})")
    counts["examples"] = len(out)
    return FeatureTable.from_rows(out, ragged=["input_ids"]), dict(counts)


def lin_features(path: Path, tokenizer, max_length: int) -> tuple[FeatureTable, dict[str, int]]:
    """Dependency rows -> token ids with head-position labels at words' first sub-tokens."""
    from kadapter.deps import check_records, head_labels_batch

    out, counts = [], Counter()
    for first, rows in progress_chunks(read_rows(path, LIN_COLUMNS), desc=f"tokenize {path.name}"):
        check_records(path, first, rows)
        for labelled in head_labels_batch(rows, tokenizer, max_length):
            counts["rows"] += 1
            counts.update(labelled.stats)
            if labelled.stats["labelled"] == 0:
                counts["skipped_no_labelled_word"] += 1
                continue
            out.append({"input_ids": labelled.input_ids, "labels": labelled.labels})
    if not out:
        raise InputError(path, None, f"no usable examples ({dict(counts)})")
    counts["examples"] = len(out)
    return FeatureTable.from_rows(out, ragged=["input_ids", "labels"]), dict(counts)


# --------------------------------------------------------------------------- heads


def _combined(adapter_name: str | None) -> list[str]:
    """The combiner's adapters: a K-Adapter's output beside the encoder's last state, or
    none (serial adapters sit inside the encoder: the head reads its last state as is)."""
    return [] if adapter_name is None else [adapter_name]


def _outputs(adapter_name: str | None, adapter_out) -> dict:
    return {} if adapter_name is None else {adapter_name: adapter_out}


class RelationHead(nn.Module):
    """fac: combined features -> pooled subject, object -> concat -> dense -> logits."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "entity",
                 dropout: float = 0.1, adapter_name: str | None = "fac"):
        super().__init__()
        if pooling not in ("entity", "marker"):
            raise ValueError(f"pooling must be 'entity' or 'marker', got {pooling!r}")
        self.pooling = pooling
        self.adapter_name = adapter_name
        self.combiner = Combiner(_combined(adapter_name), hidden_size, mode="concat")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden_size, num_labels)

    def pool(self, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pooling == "entity":
            subject = span_mean(features, batch["subj_start"], batch["subj_end"])
            obj = span_mean(features, batch["obj_start"], batch["obj_end"])
        else:
            subject = gather_positions(features, batch["subj_marker"])
            obj = gather_positions(features, batch["obj_marker"])
        return torch.cat([subject, obj], dim=-1)

    def forward(self, encoder_last, adapter_out, batch):
        combined = self.combiner(encoder_last, _outputs(self.adapter_name, adapter_out))
        return self.classifier(self.dropout(self.pool(combined, batch)))


class HeadPositionHead(nn.Module):
    """lin: combined features -> dense -> single-head attention -> dense -> position logits.

    ``logits[b, i, j]`` scores position j as the head of token i: a query and a key
    projection of the attended features, compared by a scaled dot product (a pointer over
    the sequence). The original instead mapped each token to ``max_length`` absolute
    position classes with a dense layer; on the sample preset that layer stayed at UAS
    0.15 where the pointer reached 0.26 with the same budget, and the pointer works at
    any padded width. Logits at padded positions are masked.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.1, adapter_name: str | None = "lin"):
        super().__init__()
        self.adapter_name = adapter_name
        self.combiner = Combiner(_combined(adapter_name), hidden_size, mode="concat")
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads=1, dropout=dropout,
                                               batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)

    def forward(self, encoder_last, adapter_out, batch):
        combined = self.combiner(encoder_last, _outputs(self.adapter_name, adapter_out))
        padding = ~batch["attention_mask"].bool()
        hidden = F.gelu(self.dense(combined))
        attended, _ = self.attention(hidden, hidden, hidden, key_padding_mask=padding,
                                     need_weights=False)
        attended = hidden + self.dropout(attended)
        scores = self.query(attended) @ self.key(attended).transpose(1, 2)  # (B, T, T)
        logits = scores / math.sqrt(attended.shape[-1])
        return logits.masked_fill(padding[:, None, :], torch.finfo(logits.dtype).min)


class PretrainModel(nn.Module):
    """The trainable part: the knowledge adapter and its task head."""

    def __init__(self, adapter: KnowledgeAdapter, head: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.head = head

    def forward(self, hidden_states: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]):
        adapter_out = self.adapter(hidden_states, batch["attention_mask"])
        return self.head(hidden_states[-1], adapter_out, batch)


class SerialPretrainModel(nn.Module):
    """The encoder with serial adapters inside (``kadapter.serial``) and the task head.

    The encoder's own weights are frozen (no gradient, eval mode whatever ``train()`` is
    called with) but it runs with autograd, so that gradients reach the adapters inside
    its layers; no weight gradient of the encoder is kept. Only adapters and head train."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        from kadapter.serial import attached

        super().__init__()
        if attached(encoder) is None:
            raise ValueError("the encoder holds no serial adapters (kadapter.serial)")
        self.encoder = encoder
        self.head = head
        encoder.requires_grad_(False)
        self.adapter.requires_grad_(True)
        self.train(False)

    @property
    def adapter(self):
        from kadapter.serial import attached

        return attached(self.encoder)

    def train(self, mode: bool = True) -> SerialPretrainModel:
        super().train(mode)
        self.encoder.eval()
        self.adapter.train(mode)
        return self

    def forward(self, frozen_out: None, batch: dict[str, torch.Tensor]):
        last = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            return_dict=True).last_hidden_state
        # in the head's dtype (fp32 master weights; autocast, when on, lowers it), as the
        # K-Adapter's Combiner does for a bf16 encoder
        return self.head(last.to(next(self.head.parameters()).dtype), None, batch)


KINDS = ("kadapter", "serial")
"""Adapter kinds pretrained by ``run_pretraining``: K-Adapter's knowledge adapter beside
the encoder, or serial (Houlsby) adapters inside it."""


def head_settings(task: str, section: PretrainConfig, hidden_size: int,
                  labels: list[str] | None, kind: str = "kadapter") -> dict[str, Any]:
    """What ``build_head`` needs; stored in adapter_config.json under ``task.head``. A
    serial adapter's head has no combiner (adapter_name None)."""
    adapter_name = task if kind == "kadapter" else None
    if task == "fac":
        return {"class": "RelationHead", "hidden_size": hidden_size, "num_labels": len(labels),
                "pooling": section.pooling, "dropout": section.head_dropout,
                "adapter_name": adapter_name}
    return {"class": "HeadPositionHead", "hidden_size": hidden_size,
            "dropout": section.head_dropout, "adapter_name": adapter_name}


def build_head(settings: dict[str, Any]) -> nn.Module:
    """Rebuild a pretraining head from ``adapter_config.json``'s ``task.head``."""
    kwargs = {k: v for k, v in settings.items() if k != "class"}
    classes = {"RelationHead": RelationHead, "HeadPositionHead": HeadPositionHead}
    if settings.get("class") not in classes:
        raise ValueError(f"unknown pretraining head {settings.get('class')!r}")
    return classes[settings["class"]](**kwargs)


# --------------------------------------------------------------------------- metrics


def classification_metrics(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy, micro-F1 and macro-F1 (over classes in gold or predictions)."""
    accuracy = float((pred == gold).mean())
    f1s = []
    for label in np.union1d(pred, gold):
        tp = float(((pred == label) & (gold == label)).sum())
        predicted, actual = float((pred == label).sum()), float((gold == label).sum())
        f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return {"accuracy": accuracy, "micro_f1": accuracy, "macro_f1": float(np.mean(f1s))}


def majority_baseline(train_labels: np.ndarray, dev_labels: np.ndarray) -> dict[str, Any]:
    """Dev accuracy of always predicting the most frequent training relation."""
    values, counts = np.unique(train_labels, return_counts=True)
    majority = int(values[np.argmax(counts)])  # ties -> the smallest label id
    return {"label": majority, "accuracy": float((dev_labels == majority).mean())}


def task_functions(task: str):
    """(pad values, loss_fn, predict_fn, metrics_fn) of a task for ``train``."""
    if task == "fac":
        def loss_fn(model, batch, hidden_states):
            return F.cross_entropy(model(hidden_states, batch).float(), batch["label"])

        def predict_fn(model, batch, hidden_states):
            return {"pred": model(hidden_states, batch).argmax(-1), "gold": batch["label"]}

        def metrics_fn(outputs):
            return classification_metrics(outputs["pred"], outputs["gold"])

        return {"input_ids": None}, loss_fn, predict_fn, metrics_fn

    def loss_fn(model, batch, hidden_states):
        logits = model(hidden_states, batch).float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE_INDEX)

    def predict_fn(model, batch, hidden_states):
        labels = batch["labels"]
        labelled = labels != IGNORE_INDEX
        correct = (model(hidden_states, batch).argmax(-1) == labels) & labelled
        return {"correct": correct.sum(1), "labelled": labelled.sum(1)}

    def metrics_fn(outputs):
        return {"uas": float(outputs["correct"].sum() / max(outputs["labelled"].sum(), 1))}

    return {"input_ids": None, "labels": IGNORE_INDEX}, loss_fn, predict_fn, metrics_fn


def encode_hidden_states(encoder: nn.Module, batch: dict[str, torch.Tensor]):
    """The frozen encoder's hidden-states tuple (embeddings first), run without autograd."""
    return encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True, return_dict=True).hidden_states


# --------------------------------------------------------------------------- the run


def run_pretraining(config: Config, task: str, resume: bool = False,
                    kind: str = "kadapter") -> dict[str, Any]:
    """Pretrain the ``task`` adapter of ``kind`` as configured; returns the manifest written.

    ``kind`` ``kadapter``: a knowledge adapter beside the frozen encoder, which runs once
    per batch under ``no_grad`` (``train``'s ``frozen``); its head combines the encoder's
    last state with the adapter's output. ``serial``: Houlsby adapters inside the frozen
    encoder (section ``serial_adapter``), which then runs inside the trained model with
    autograd, so gradients pass through its layers to the adapters; the head reads the
    adapted encoder's last state. Same data, features, heads and schedule (the section
    ``pretrain_<task>``; ``serial_adapter.learning_rate`` / ``epochs`` may replace its
    own); the serial run writes to ``serial_adapter.<task>_output_dir``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    started = time.time()
    section: PretrainConfig = getattr(config, f"pretrain_{task}")
    data_dir, output_dir, cache_dir = resolve_paths(section, task, config.preset)
    serial = config.serial_adapter if kind == "serial" else None
    if serial is not None:
        output_dir = serial.output_dir(task)
        section = dataclasses.replace(section, **serial.schedule())
    accelerator = make_accelerator(section)
    main = accelerator.is_main_process
    batch_key = f"pretrain_{task}.batch_size"
    batch_plan(section, accelerator.num_processes, batch_key)  # a batch that cannot split fails now

    # ---- model files, tokenizer, features (built once, then read from the cache)
    with accelerator.main_process_first():
        model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    features = pretrain_features(task, data_dir, cache_dir, tokenizer, section.max_length,
                                 section.feature_workers, accelerator)
    train_data, dev_data, labels = features["train"], features["dev"], features["labels"]
    if main:
        print(f"{task}: {len(train_data)} train / {len(dev_data)} dev examples "
              f"(features {features['cache']})")

    # ---- the frozen encoder and the trainable adapter + head (same init on every process)
    dtype = encoder_dtype(config.model, accelerator.device, accelerator.mixed_precision)
    encoder = load_encoder(model_path, dtype=dtype)
    if section.max_length > max_sequence_length(encoder):
        raise ConfigError(f"pretrain_{task}.max_length {section.max_length} exceeds the encoder's "
                         f"{max_sequence_length(encoder)} positions")
    hidden, layers = encoder.config.hidden_size, encoder.config.num_hidden_layers
    torch.manual_seed(config.seed)
    settings = head_settings(task, section, hidden, labels, kind)
    if serial is None:
        model = PretrainModel(KnowledgeAdapter(config.adapter, hidden, layers), build_head(settings))
        parameters = {"trainable": count_parameters(model),
                      "total": count_parameters(model) + count_parameters(encoder)}
        frozen = {"frozen": encoder, "frozen_dtype": dtype, "frozen_forward": encode_hidden_states}
        run_config = {"model": config.model.name_or_path, "adapter": to_plain(config.adapter)}
    else:  # the encoder inside the model: trained through, weights frozen, in its own dtype
        from kadapter.serial import insert_serial_adapters

        insert_serial_adapters(encoder, serial)
        model = SerialPretrainModel(encoder, build_head(settings))
        parameters = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "total": count_parameters(model)}
        frozen = {}
        run_config = {"model": config.model.name_or_path, "kind": kind,
                      "serial": to_plain(serial)}

    # ---- train in a hidden sibling: the previous complete adapter stays in output_dir
    # until the new one is complete (then the sibling replaces it whole)
    staging = output_dir.with_name(f".{output_dir.name}.partial")
    if main:
        check_output_dir(output_dir, "pretrain")
        remove_stale_temporaries(output_dir.parent, output_dir.name)
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    run_name = task if serial is None else f"serial {task}"
    pad_values, loss_fn, predict_fn, metrics_fn = task_functions(task)
    pad_values["input_ids"] = tokenizer.pad_token_id
    multiple = 8 if accelerator.device.type == "cuda" else None
    result = train(
        section, model=model, train_data=train_data, dev_data=dev_data,
        collate=PadCollator(pad_values, pad_to_multiple_of=multiple),
        loss_fn=loss_fn, predict_fn=predict_fn, metrics_fn=metrics_fn,
        **frozen, output_dir=staging, seed=config.seed,
        resume=resume, accelerator=accelerator, description=f"pretrain {run_name}",
        batch_key=batch_key, stage="pretrain", run_config=run_config)

    # ---- outputs: the adapter (+ head) and the manifest, written by the main process
    baseline = None
    if task == "fac":
        baseline = majority_baseline(train_data.scalar["label"], dev_data.scalar["label"])
    manifest = {
        "stage": "pretrain", "task": task, "kind": kind, "config": config.to_dict(),
        "inputs": {"data_dir": str(data_dir), "files": features["inputs"],
                   "data_manifest": _manifest_fingerprint(data_dir)},
        "features": {"cache": features["cache"], "counts": features["counts"]},
        "training": {**training_summary(result, section, accelerator, started),
                     "encoder_dtype": str(dtype)},
        "parameters": parameters,
        "dev_metrics": result.dev_metrics,
        "majority_baseline": baseline,
        "versions": versions(),
    }
    if main:
        task_info = {"name": task, "labels": labels, "max_length": section.max_length,
                     "head": settings, "combiner": "concat" if serial is None else None,
                     "dev_metrics": result.dev_metrics,
                     "data": {"manifest_sha256": manifest["inputs"]["data_manifest"],
                              "files": features["inputs"]}}
        adapter_tmp = staging / ".adapter"
        save = save_adapter if serial is None else save_serial_adapter
        save(adapter_tmp, result.model.adapter, base_model=config.model.name_or_path,
             encoder_config=encoder.config, task=task_info,
             head_state=result.model.head.state_dict())
        for name in (ADAPTER_WEIGHTS_FILE, MODEL_CARD_FILE, ADAPTER_CONFIG_FILE):
            os.replace(adapter_tmp / name, staging / name)
        shutil.rmtree(adapter_tmp)
        atomic_write_json(staging / "manifest.json", manifest)
        if baseline is not None:  # the curves again, with the majority class marked
            plot_curves(read_metrics(staging), staging / CURVES_FILE, f"pretrain {run_name}",
                        baselines={"accuracy": baseline["accuracy"]})
        replace_dir(staging, output_dir, stage="pretrain")
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (result.dev_metrics or {}).items())
        line = f"{run_name} adapter -> {output_dir}: dev {metrics}"
        if baseline is not None:
            line += f" (majority-class baseline accuracy {baseline['accuracy']:.4f})"
        print(line)
        print(f"{result.tokens:,} training tokens at {result.tokens_per_s:,.0f} tokens/s")
    accelerator.wait_for_everyone()
    return manifest


def _manifest_fingerprint(data_dir: Path) -> str | None:
    path = data_dir / "manifest.json"
    return file_fingerprint(path)["sha256"] if path.is_file() else None


__all__ = [
    "HeadPositionHead",
    "PretrainConfig",
    "PretrainModel",
    "RelationHead",
    "SerialPretrainModel",
    "build_head",
    "classification_metrics",
    "fac_features",
    "lin_features",
    "majority_baseline",
    "run_pretraining",
]
