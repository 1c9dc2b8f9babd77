"""RoBERTa + multitask: the K-Adapter paper's comparison row. The encoder itself (not
frozen) trains jointly on the two knowledge tasks of adapter pretraining, factual
(relation classification on T-REx-rc) and linguistic (dependency head prediction), with
one head per task, and is then fine-tuned downstream like the encoder-alone row
(fine-tuning variant ``multitask``).

    accelerate launch -m pipelines.pretrain_multitask --config configs/sample.yaml

The tasks are exactly those of adapter pretraining (``kadapter.pretrain``): their data,
``max_length``, pooling and head dropout come from the ``pretrain_fac`` and
``pretrain_lin`` sections, their features from the same caches
(``kadapter.features.pretrain_features``, ``make features``), their heads from
``pretrain.build_head`` with the adapter left out (each head reads the encoder's last
state directly), their scoring from ``pretrain.classification_metrics`` / UAS. Only the
optimisation and the mix are this stage's own (section ``pretrain_multitask``).

The mix: every optimizer step of ``batch_size`` examples holds ``round(batch_size x
fac_share / (fac_share + lin_share))`` factual examples and the rest linguistic ones,
each task's drawn from its own seeded, length-grouped order of the epoch
(``mixed_steps``), so the proportion holds at every step and the schedule is the same
bytes for a seed. An epoch ends when the first task runs out of examples; the other
task's remaining ones sit that epoch out (a different few each epoch). The loss of a
step is the mean over its examples of each example's own loss (a relation's
cross-entropy; a sentence's mean cross-entropy over its labelled words), so each task
weighs in the objective by its share of the step.

Outputs in ``output_dir`` (default ``runs/<preset>/multitask/``), trained in the hidden
sibling ``.multitask.partial`` (where ``--resume true`` continues) and moved into place
whole when complete: the trained encoder with its tokenizer (``config.json``,
``model.safetensors``, tokenizer files: ``kadapter.modeling.load_encoder`` and
``load_tokenizer`` read the directory), ``heads.safetensors`` + ``heads.json`` (the two
heads, rebuilt with ``load_heads``), ``metrics.jsonl``, ``curves.png``, ``tensorboard/``
and ``manifest.json`` (parameters, tokens/s, examples and tokens seen per task, dev
metrics per task, and the same cost figures of the K-Adapter fac and lin adapters when
their runs exist).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal  # noqa: F401 (config.build resolves inherited bf16's Literal here)

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kadapter.config import Config, ConfigError
from kadapter.features import pretrain_features
from kadapter.io import (
    OUTPUT_MARKER,
    atomic_save_safetensors,
    atomic_write_json,
    check_output_dir,
    ordinary_permissions,
    read_json,
    remove_stale_temporaries,
    replace_dir,
    versions,
)
from kadapter.modeling import (
    ADAPTER_WEIGHTS_FILE,
    Combiner,
    count_parameters,
    load_encoder,
    load_tokenizer,
    max_sequence_length,
    resolve_model_path,
)
from kadapter.pretrain import (
    IGNORE_INDEX,
    TASKS,
    build_head,
    classification_metrics,
    head_settings,
    resolve_paths,
)
from kadapter.training import (
    CHECKPOINTS,
    FeatureTable,
    PadCollator,
    TrainingConfig,
    batch_order,
    batch_plan,
    make_accelerator,
    train,
    training_summary,
)

STAGE = "pretrain-multitask"
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG_FILE = "heads.json"
ENCODER_FILES = ("config.json", "model.safetensors")
TASK_IDS = {task: index for index, task in enumerate(TASKS)}  # the ``task`` column


@dataclass
class MultitaskConfig(TrainingConfig):
    """Section ``pretrain_multitask``: the encoder trained jointly on fac and lin.

    The optimisation fields (learning_rate ... bf16) are those of
    ``kadapter.training.TrainingConfig``; ``batch_size`` is the global batch of both
    tasks together. The tasks' data, max_length, pooling and head dropout are those of
    the ``pretrain_fac`` / ``pretrain_lin`` sections (same features, same heads).
    """

    fac_share: float = 1.0
    """Relative share of factual examples in every optimizer step: a step holds
    round(batch_size x fac_share / (fac_share + lin_share)) of them (0 = lin only)."""
    lin_share: float = 1.0
    """Relative share of linguistic examples in every step (the rest of the batch; 0 =
    fac only). Both must be >= 0 and not both 0."""
    output_dir: str = "runs/{preset}/multitask"
    """Run directory: the trained encoder (+ tokenizer), heads, metrics, manifest."""
    feature_workers: int = 0
    """Processes that build a missing feature cache (0 = every core); the caches are
    those of adapter pretraining and do not depend on it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        shares = {"fac_share": self.fac_share, "lin_share": self.lin_share}
        negative = [f"{name} {value}" for name, value in shares.items() if not value >= 0]
        if negative:
            raise ValueError(f"{', '.join(negative)}: a task's share must be >= 0")
        if self.fac_share + self.lin_share <= 0:
            raise ValueError("fac_share and lin_share are both 0: at least one task must train")
        for task, count in step_counts(self).items():
            if count == 0 and shares[f"{task}_share"] > 0:
                raise ValueError(f"{task}_share {shares[f'{task}_share']} of batch_size "
                                 f"{self.batch_size} rounds to 0 {task} examples a step; raise "
                                 "the share or the batch")


def step_counts(section: MultitaskConfig) -> dict[str, int]:
    """Examples of each task in every optimizer step (they sum to batch_size)."""
    fac = round(section.batch_size * section.fac_share / (section.fac_share + section.lin_share))
    return {"fac": fac, "lin": section.batch_size - fac}


# --------------------------------------------------------------------------- data


class MixedTable(Sequence):
    """The fac examples (indices 0 .. n_fac - 1) then the lin ones, every item with the
    columns of both tasks (the other task's filled with values no loss reads: label
    and span columns 0, per-token ``labels`` -100) and ``task`` (``TASK_IDS``), so one
    ``PadCollator`` batches any mix."""

    def __init__(self, tables: dict[str, FeatureTable]):
        self.tables = tables
        self.offsets = {"fac": 0, "lin": len(tables["fac"])}
        self.lengths = np.concatenate([tables["fac"].lengths, tables["lin"].lengths])
        self.fac_scalars = sorted(tables["fac"].scalar)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < self.offsets["lin"]:
            item = self.tables["fac"][index]
            item["labels"] = np.full(len(item["input_ids"]), IGNORE_INDEX, dtype=np.int64)
            item["task"] = TASK_IDS["fac"]
        else:
            item = self.tables["lin"][index - self.offsets["lin"]]
            item.update({name: 0 for name in self.fac_scalars})
            item["task"] = TASK_IDS["lin"]
        return item


def mixed_steps(lengths: dict[str, np.ndarray], counts: dict[str, int], *, seed: int,
                epoch: int, group_by_length: bool = True) -> list[np.ndarray]:
    """The examples (``MixedTable`` indices) of each optimizer step of one epoch:
    ``counts[task]`` of each task per step, fac first. Each task's examples come from
    ``batch_order`` with batches of its count, seeded by (seed, task) and the epoch; the
    epoch has as many steps as the scarcer task fills."""
    orders, offset = {}, 0
    for index, task in enumerate(TASKS):
        if counts[task]:
            batches = batch_order(lengths[task], counts[task], seed=seed * len(TASKS) + index,
                                  epoch=epoch, group_by_length=group_by_length)
            orders[task] = [b + offset for b in batches if len(b) == counts[task]]
        offset += len(lengths[task])
    steps = min(len(batches) for batches in orders.values())
    return [np.concatenate([orders[task][step] for task in orders]) for step in range(steps)]


# --------------------------------------------------------------------------- model


def build_multitask_head(settings: dict[str, Any]) -> nn.Module:
    """``pretrain.build_head``'s head, reading the encoder's last state directly: its
    combiner takes no adapter (``Combiner`` then passes the encoder's state through)."""
    head = build_head(settings)
    head.combiner = Combiner([], settings["hidden_size"])
    return head


class MultitaskModel(nn.Module):
    """The trainable encoder and one head per task; a batch may mix the tasks (its
    ``task`` column says which rows are whose)."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``{task: logits of its rows, or None}`` plus ``rows`` (each task's row
        indices) and ``absent``: 0 x the parameters of every trainable head without rows
        here, which the loss adds so that DDP sees every parameter take part."""
        last = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            return_dict=True).last_hidden_state
        out: dict[str, Any] = {"rows": {}, "absent": last.new_zeros((), dtype=torch.float32)}
        for task, head in self.heads.items():
            rows = (batch["task"] == TASK_IDS[task]).nonzero().squeeze(1)
            out["rows"][task] = rows
            if rows.numel() == 0:
                out[task] = None
                out["absent"] = out["absent"] + sum(
                    p.sum() for p in head.parameters() if p.requires_grad) * 0.0
                continue
            part = {key: value[rows] for key, value in batch.items()}
            out[task] = head(last[rows], None, part)
        return out


def mixed_loss(model: nn.Module, batch: dict[str, torch.Tensor], _frozen: Any) -> torch.Tensor:
    """Mean over the batch's examples of each example's loss: cross-entropy of its
    relation (fac), mean cross-entropy over its labelled words (lin)."""
    out = model(batch)
    total = out["absent"]
    if out["fac"] is not None:
        labels = batch["label"][out["rows"]["fac"]]
        total = total + F.cross_entropy(out["fac"].float(), labels, reduction="sum")
    if out["lin"] is not None:
        labels = batch["labels"][out["rows"]["lin"]]
        logits = out["lin"].float()
        tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(labels.shape)
        labelled = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
        total = total + (tokens.sum(1) / labelled).sum()
    return total / batch["input_ids"].shape[0]


def mixed_predict(model: nn.Module, batch: dict[str, torch.Tensor], _frozen: Any
                  ) -> dict[str, torch.Tensor]:
    """Per row: its task, fac predicted / gold relation (-1 on lin rows), lin correct /
    labelled word counts (0 on fac rows)."""
    out = model(batch)
    size = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    fac_pred = torch.full((size,), -1, dtype=torch.long, device=device)
    fac_gold = fac_pred.clone()
    correct = torch.zeros(size, dtype=torch.long, device=device)
    labelled = correct.clone()
    if out["fac"] is not None:
        rows = out["rows"]["fac"]
        fac_pred[rows] = out["fac"].argmax(-1)
        fac_gold[rows] = batch["label"][rows]
    if out["lin"] is not None:
        rows = out["rows"]["lin"]
        labels = batch["labels"][rows]
        is_labelled = labels != IGNORE_INDEX
        correct[rows] = ((out["lin"].argmax(-1) == labels) & is_labelled).sum(1)
        labelled[rows] = is_labelled.sum(1)
    return {"task": batch["task"], "fac_pred": fac_pred, "fac_gold": fac_gold,
            "lin_correct": correct, "lin_labelled": labelled}


def mixed_metrics(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """fac_accuracy / fac_micro_f1 / fac_macro_f1 over the fac rows, lin_uas over the
    lin rows (a task without rows in the scored set has no metric)."""
    metrics = {}
    fac = outputs["task"] == TASK_IDS["fac"]
    if fac.any():
        scores = classification_metrics(outputs["fac_pred"][fac], outputs["fac_gold"][fac])
        metrics.update({f"fac_{name}": value for name, value in scores.items()})
    lin = outputs["task"] == TASK_IDS["lin"]
    if lin.any():
        metrics["lin_uas"] = float(outputs["lin_correct"][lin].sum()
                                   / max(outputs["lin_labelled"][lin].sum(), 1))
    return metrics


# --------------------------------------------------------------------------- loading


def load_heads(directory: str | Path) -> dict[str, nn.Module]:
    """The two heads of a multitask run directory, with their trained weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    settings = read_json(directory / HEADS_CONFIG_FILE)
    state = load_file(str(directory / HEADS_FILE))
    heads = {}
    for task, info in settings["heads"].items():
        heads[task] = build_multitask_head(info["head"])
        own = {key.removeprefix(f"{task}."): value for key, value in state.items()
               if key.startswith(f"{task}.")}
        heads[task].load_state_dict(own, strict=True)
    return heads


def is_multitask_dir(directory: str | Path) -> bool:
    """A complete multitask run: the encoder files and the manifest are there."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in (*ENCODER_FILES, "manifest.json"))


# --------------------------------------------------------------------------- cost


def adapter_cost(directory: Path, encoder_total: int) -> dict[str, Any] | None:
    """Trainable parameters and tokens/s of a K-Adapter pretraining run (None when the
    run is absent): its manifest's ``parameters`` when it has them, else the tensors of
    its adapter file (adapter + head) counted, beside the frozen encoder's size."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return None
    from safetensors import safe_open

    manifest = read_json(manifest_path)
    parameters = manifest.get("parameters")
    if not (isinstance(parameters, dict) and "trainable" in parameters):
        with safe_open(str(directory / ADAPTER_WEIGHTS_FILE), framework="pt") as weights:
            trainable = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
        parameters = {"trainable": trainable, "total": trainable + encoder_total,
                      "counted_from": ADAPTER_WEIGHTS_FILE}
    return {"run": str(directory), "parameters": parameters,
            "tokens_per_s": (manifest.get("training") or {}).get("tokens_per_s"),
            "dev_metrics": manifest.get("dev_metrics")}


def examples_seen(steps: int, steps_per_epoch: int, counts: dict[str, int],
                  schedule, lengths: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """Per task: examples and real tokens of the ``steps`` optimizer steps taken,
    replayed from the schedule (``schedule(epoch)`` = that epoch's steps)."""
    offsets = {"fac": 0, "lin": len(lengths["fac"])}
    all_lengths = np.concatenate([lengths["fac"], lengths["lin"]])
    tokens = {task: 0 for task in TASKS}
    for epoch in range(-(-steps // steps_per_epoch)):
        taken = schedule(epoch)[: steps - epoch * steps_per_epoch]
        if not taken:
            continue
        chosen = np.concatenate(taken)
        is_fac = chosen < offsets["lin"]
        tokens["fac"] += int(all_lengths[chosen[is_fac]].sum())
        tokens["lin"] += int(all_lengths[chosen[~is_fac]].sum())
    return {task: {"examples": steps * counts[task], "tokens": tokens[task],
                   "epochs": round(steps * counts[task] / len(lengths[task]), 4)}
            for task in TASKS}


# --------------------------------------------------------------------------- the run


def run_multitask(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train the encoder on fac and lin jointly as configured; returns the manifest."""
    started = time.time()
    section: MultitaskConfig = config.pretrain_multitask
    output_dir = Path(section.output_dir)
    accelerator = make_accelerator(section)
    main = accelerator.is_main_process
    batch_key = "pretrain_multitask.batch_size"
    batch_plan(section, accelerator.num_processes, batch_key)  # a batch that cannot split fails now
    counts = step_counts(section)

    # ---- the tasks as adapter pretraining defines them: data, features, heads
    with accelerator.main_process_first():
        model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    task_sections = {task: getattr(config, f"pretrain_{task}") for task in TASKS}
    features, data_dirs = {}, {}
    for task, task_section in task_sections.items():
        data_dirs[task], _, cache_dir = resolve_paths(task_section, task, config.preset)
        features[task] = pretrain_features(task, data_dirs[task], cache_dir, tokenizer,
                                           task_section.max_length, section.feature_workers,
                                           accelerator)
    train_data = MixedTable({task: features[task]["train"] for task in TASKS})
    dev_data = MixedTable({task: features[task]["dev"] for task in TASKS})
    lengths = {task: features[task]["train"].lengths for task in TASKS}
    for task in TASKS:
        if counts[task] > len(lengths[task]):
            raise ConfigError(f"pretrain_multitask: a step takes {counts[task]} {task} examples "
                              f"but {task} has only {len(lengths[task])} training examples")
    if main:
        print("multitask: " + ", ".join(
            f"{task} {len(features[task]['train'])} train / {len(features[task]['dev'])} dev "
            f"({counts[task]} a step)" for task in TASKS))

    # ---- the trainable encoder (fp32 master weights) and the two heads, seeded
    encoder = load_encoder(model_path, dtype=torch.float32)
    for task, task_section in task_sections.items():
        if task_section.max_length > max_sequence_length(encoder):
            raise ConfigError(f"pretrain_{task}.max_length {task_section.max_length} exceeds the "
                              f"encoder's {max_sequence_length(encoder)} positions")
    hidden = encoder.config.hidden_size
    torch.manual_seed(config.seed)
    settings = {task: head_settings(task, task_sections[task], hidden, features[task]["labels"])
                for task in TASKS}
    heads = {task: build_multitask_head(settings[task]) for task in TASKS}
    for task, head in heads.items():
        head.requires_grad_(counts[task] > 0)  # a task with no share trains nothing
    model = MultitaskModel(encoder, heads)

    staging = output_dir.with_name(f".{output_dir.name}.partial")
    if main:
        check_output_dir(output_dir, STAGE)
        remove_stale_temporaries(output_dir.parent, output_dir.name)
        if not resume:
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()

    def schedule(epoch: int) -> list[np.ndarray]:
        return mixed_steps(lengths, counts, seed=config.seed, epoch=epoch,
                           group_by_length=section.length_grouping)

    task_settings = {task: {"data_dir": str(data_dirs[task]), "max_length": s.max_length,
                            "pooling": s.pooling, "head_dropout": s.head_dropout}
                     for task, s in task_sections.items()}
    multiple = 8 if accelerator.device.type == "cuda" else None
    result = train(
        section, model=model, train_data=train_data, dev_data=dev_data,
        collate=PadCollator({"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX},
                            pad_to_multiple_of=multiple),
        loss_fn=mixed_loss, predict_fn=mixed_predict, metrics_fn=mixed_metrics,
        output_dir=staging, seed=config.seed, resume=resume, accelerator=accelerator,
        description="pretrain multitask", batch_key=batch_key, stage=STAGE,
        run_config={"model": config.model.name_or_path, "tasks": task_settings},
        epoch_steps=schedule)

    # ---- outputs, written by the main process
    steps_per_epoch = len(schedule(0))
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    encoder_total = count_parameters(result.model.encoder)
    kadapter_cost = {task: adapter_cost(resolve_paths(task_sections[task], task, config.preset)[1],
                                        encoder_total) for task in TASKS}
    if not any(kadapter_cost.values()):
        kadapter_cost = None
    manifest = {
        "stage": STAGE, "config": config.to_dict(),
        "inputs": {task: {"data_dir": str(data_dirs[task]), "files": features[task]["inputs"]}
                   for task in TASKS},
        "features": {task: {"cache": features[task]["cache"], "counts": features[task]["counts"]}
                     for task in TASKS},
        "base_model": config.model.name_or_path,
        "parameters": {"trainable": trainable, "total": count_parameters(result.model)},
        "encoder_parameters": encoder_total,
        "mix": {"shares": {"fac": section.fac_share, "lin": section.lin_share},
                "examples_per_step": counts, "steps_per_epoch": steps_per_epoch,
                "seen": examples_seen(result.global_step, steps_per_epoch, counts, schedule, lengths)},
        "training": training_summary(
            result, section, accelerator, started,
            examples_left_per_epoch=len(train_data) - steps_per_epoch * section.batch_size),
        "dev_metrics": result.dev_metrics,
        "kadapter_cost": kadapter_cost,
        "outputs": [*ENCODER_FILES, "tokenizer", HEADS_FILE, HEADS_CONFIG_FILE, "metrics.jsonl",
                    "curves.png"],
        "versions": versions(),
    }
    if main:
        result.model.encoder.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        state = {f"{task}.{key}": value.detach().cpu().contiguous()
                 for task, head in result.model.heads.items()
                 for key, value in head.state_dict().items()}
        atomic_save_safetensors(state, staging / HEADS_FILE, metadata={"format": "pt"})
        atomic_write_json(staging / HEADS_CONFIG_FILE, {"heads": {
            task: {"head": settings[task], "labels": features[task]["labels"],
                   "max_length": task_sections[task].max_length} for task in TASKS}})
        for path in staging.iterdir():  # transformers / safetensors may write 0600
            if path.is_file() and path.name != OUTPUT_MARKER:
                ordinary_permissions(path)
        shutil.rmtree(staging / CHECKPOINTS, ignore_errors=True)  # resumable state, done with
        atomic_write_json(staging / "manifest.json", manifest)
        replace_dir(staging, output_dir, stage=STAGE)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (result.dev_metrics or {}).items())
        print(f"multitask encoder -> {output_dir}: dev {metrics}")
        line = f"{trainable:,} trainable parameters, {result.tokens_per_s:,.0f} tokens/s"
        for task, cost in (kadapter_cost or {}).items():
            if cost:
                line += (f"; K-Adapter {task}: {cost['parameters']['trainable']:,}, "
                         f"{cost['tokens_per_s'] or 0:,.0f} tokens/s")
        print(line)
    accelerator.wait_for_everyone()
    return manifest


__all__ = [
    "MixedTable",
    "MultitaskConfig",
    "MultitaskModel",
    "build_multitask_head",
    "is_multitask_dir",
    "load_heads",
    "mixed_steps",
    "run_multitask",
    "step_counts",
]
