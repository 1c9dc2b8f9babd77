"""The generic Accelerate training loop shared by adapter pretraining and fine-tuning.

API
---
::

    from kadapter.training import FeatureTable, PadCollator, TrainingConfig, make_accelerator, train

    accelerator = make_accelerator(config)          # mixed precision from config.bf16
    result = train(
        config,                     # TrainingConfig, or a config dataclass that subclasses it
        model=trainable,            # nn.Module with every trained weight; goes through
                                    # accelerator.prepare (DDP). Pretraining: adapter + head.
                                    # Fine-tuning: encoder + frozen adapters + head (frozen
                                    # adapters inside it with requires_grad False).
        train_data=train_table,     # FeatureTable (or any Sequence of feature dicts)
        dev_data=dev_table,         # or None: no evaluation
        collate=PadCollator({"input_ids": pad_id, "labels": -100}),
        loss_fn=loss_fn,            # (model, batch, frozen_out) -> scalar loss tensor
        predict_fn=predict_fn,      # (model, batch, frozen_out) -> {name: (B, ...) tensor}
        metrics_fn=metrics_fn,      # ({name: np.ndarray over the whole dev set}) -> {metric: float}
        frozen=encoder,             # optional module kept OUT of prepare: moved to the device
        frozen_dtype=torch.bfloat16,#   (and cast, e.g. bf16 on CUDA), eval mode, no grad
        frozen_forward=encode,      # (frozen, batch) -> anything; run under torch.no_grad()
        output_dir=run_dir,         # checkpoints/, metrics.jsonl, tensorboard/, curves.png, best/
        seed=config_seed,
        resume=False,               # True: continue from output_dir/checkpoints/<latest>
        accelerator=accelerator,
        batch_key="pretrain_fac.batch_size",  # names config.batch_size in errors
    )
    result.model                    # the unwrapped trained module (best-on-dev weights when
                                    # config.select_metric is set), on accelerator.device
    result.batch                    # BatchPlan: global batch, micro-batch, processes, ...

Contract of the callables:

- ``collate(list_of_features) -> dict[str, Tensor]``; the dict must hold ``attention_mask``
  (real tokens are counted from it for tokens/s). It runs in a background thread for
  training batches, so it must not draw from torch's global RNG (a seeded generator of
  its own is fine: its calls keep their order). ``PadCollator`` pads ragged columns to
  the longest example of the batch (dynamic padding) and stacks scalar columns.
- ``frozen_forward``, ``loss_fn`` and ``predict_fn`` run inside the accelerator's autocast
  region (``config.bf16``, kadapter/precision.py), so every module they call, not only
  ``model``, computes in the run's precision.
- ``loss_fn`` and ``predict_fn`` must call ``model(...)`` itself (its ``forward``), never
  only its sub-modules: DDP synchronises gradients through that call. ``predict_fn`` gets
  the *unwrapped* model (no DDP collectives in evaluation) and runs under ``no_grad``.
- ``predict_fn`` returns tensors whose first dimension is the batch and whose other
  dimensions are the same for every batch (e.g. predicted and gold labels (B,), or per
  example counts). The loop concatenates them over the whole dev set, in dev-set order,
  gathered from every process, and hands numpy arrays to ``metrics_fn``. Every process
  gets the same metrics. Higher is better for ``select_metric``. The same sharded,
  gathered, order-preserving prediction is available on its own as ``predict_in_order``
  (fine-tuning uses it for the final dev and test predictions).

What the loop does (one optimizer step = ``config.batch_size`` examples over all processes =
``grad_accumulation`` micro-batches of ``batch_size / (processes x grad_accumulation)`` on
each process; ``batch_plan`` derives them, and refuses a batch that does not divide):

- AdamW (no weight decay on biases and LayerNorm weights), linear warm-up then linear
  decay to 0; ``scheduler.step()`` runs after ``optimizer.step()``; gradient clipping.
- Length-grouped batches: each epoch the examples are shuffled (seeded by seed and
  epoch), cut into mega-batches of ``MEGABATCH`` batches, sorted by length inside each,
  split into steps of ``batch_size`` examples, and the step order shuffled; so a step
  holds similar lengths and padding is small. The epoch's ``len % batch_size`` leftover
  examples (a different few each epoch) sit it out. The examples of a step do not depend
  on the number of processes: each step is cut into processes x grad_accumulation
  micro-batches (``BatchPlan.micro_batches``), so 1 or 8 processes take the same steps
  over the same examples.
- Gradient accumulation with ``accelerator.no_sync`` on all but the last micro-batch of a
  step. Micro-batches are collated ``prefetch_batches`` ahead in a background thread
  (``Prefetcher``; pinned memory on CUDA, copied with ``non_blocking``); the loss and token
  counters stay on the device and are read back only on logging, evaluation and
  checkpoint steps.
- Every ``log_every`` steps: mean loss, learning rate and real (non-pad) tokens/s over
  all processes -> ``metrics.jsonl`` (``{"kind": "train", ...}``), TensorBoard, tqdm bar.
- Evaluation every ``eval_every`` steps, at each epoch's end and at the end ->
  ``metrics.jsonl`` (``{"kind": "dev", "dev_examples": n, ...}``) and TensorBoard. With
  ``eval_subset`` the periodic ones score a fixed seeded sample of dev and the last one
  all of dev (selection then compares sample scores, the last step's taken from its
  sample rows). With ``select_metric``, the trainable weights of the best evaluation are
  kept in ``best/`` and restored at the end.
- Checkpoints every ``save_every`` steps and at the end: the trainable parameters only
  (not frozen modules inside ``model``), optimizer, scheduler and the RNG of every process
  in safetensors and JSON (``kadapter.checkpoint``: no pickle is written or loaded) plus
  ``training_state.json`` (step, epoch, step position inside the epoch, best value, token
  and time counters, the training-relevant config), written to
  ``checkpoints/step-XXXXXXXX`` via a temporary directory and a rename; the newest
  ``keep_checkpoints`` are kept. ``resume=True`` loads the latest one, skips the batches
  already seen, truncates ``metrics.jsonl`` to its step, and continues: the final weights
  equal those of an uninterrupted run with the same seed. Resume with the same number of
  processes and the same training config (``resume_config``): a change is refused with the
  keys that differ unless ``resume_with_changed_config`` is set, and then reported in
  ``TrainResult.config_changes``. ``output_dir`` must be on a filesystem that every node
  sees; it is marked as ``stage``'s (``kadapter.io.claim_output_dir``) and refused when it
  holds anything else.
- Only the main process prints, writes logs and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from kadapter.checkpoint import load_training_state, save_training_state
from kadapter.config import ConfigError
from kadapter.io import (
    atomic_write_bytes,
    atomic_write_json,
    claim_output_dir,
    ordinary_permissions,
    read_json,
)
from kadapter.precision import Precision, check_bf16, precision_for

MEGABATCH = 50  # batches per length-sorting window: big enough to group, small enough to mix
CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
BEST_DIR = "best"
RECORD_KEYS = ("kind", "step", "epoch", "dev_examples")  # metrics.jsonl fields that are not metrics


@dataclass
class TrainingConfig:
    """Optimisation, batching, logging and checkpointing of one training run."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (reached after warm-up)."""
    batch_size: int = 32
    """Examples per optimizer step, over all processes together (the global batch, as
    papers state it): each process takes micro-batches of batch_size / (processes x
    grad_accumulation) examples, so a step count means the same epochs on 1 or 8 GPUs. A
    value that does not divide is an error. An epoch's last examples that cannot fill a
    whole step are left out of that epoch (a different few each epoch)."""
    grad_accumulation: int = 1
    """Micro-batches per process whose gradients are summed before each optimizer step
    (smaller micro-batches, same global batch: for memory)."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (epochs repeat as needed); None = epochs."""
    warmup_ratio: float = 0.0
    """Share of the optimizer steps over which the learning rate rises linearly from 0;
    it then decays linearly to 0 at the last step."""
    warmup_steps: int = 0
    """Warm-up length in optimizer steps; when > 0 it replaces warmup_ratio."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None = no clipping."""
    eval_batch_size: int | None = None
    """Examples per evaluation batch per process; None = 2 x the training micro-batch."""
    eval_subset: int | None = None
    """Periodic evaluations (eval_every, epoch ends) score a fixed sample of this many dev
    examples, drawn with the run's seed (the same at every evaluation and after resume);
    the last step scores the whole dev set. None = every evaluation scores all of dev."""
    prefetch_batches: int = 2
    """Micro-batches collated ahead of the step in a background thread (pinned memory and
    non-blocking copies on CUDA); 0 = collate in the training thread."""
    length_grouping: bool = True
    """Group examples of similar length into the same batch (less padding)."""
    log_every: int = 10
    """Log loss, learning rate and tokens/s every this many optimizer steps."""
    eval_every: int = 0
    """Evaluate on dev every this many optimizer steps (0 = only at each epoch's end);
    training always ends with an evaluation."""
    save_every: int = 500
    """Write a resumable checkpoint every this many optimizer steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    select_metric: str | None = None
    """Dev metric for model selection (higher is better): the weights of the best
    evaluation are restored at the end. None = keep the last weights."""
    bf16: Literal["auto", True, False] = "auto"
    """Mixed precision (the trainable modules keep fp32 master weights): ``true`` = bf16
    autocast on any device, CPU included; ``false`` = none; ``auto`` = Accelerate's own
    setting (ACCELERATE_MIXED_PRECISION=bf16|fp16, from accelerate config / launch) when it
    names one, else bf16 on a CUDA GPU with bf16, loss-scaled fp16 on an older GPU, none
    on CPU (kadapter/precision.py)."""
    resume_with_changed_config: bool = False
    """On resume, accept a checkpoint whose training config differs from this one (the
    changed keys are recorded in the manifest); False = refuse, naming the keys."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (kadapter/tracking.py): tensorboard (<run dir>/tensorboard/),
    wandb, mlflow (when installed); they get the hyperparameters and every logged record."""
    process_group_timeout_s: int = 7200
    """Seconds a process waits at a collective before the run fails: long enough for the
    main process to build a missing feature cache while the others wait (torch's default
    of 600 s is not; run `make features` first and nobody waits)."""

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accumulation": self.grad_accumulation,
                    "epochs": self.epochs, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints}
        bad = [name for name, value in positive.items() if value < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null, got {self.eval_batch_size}")
        if self.eval_subset is not None and self.eval_subset < 1:
            raise ValueError(f"eval_subset must be >= 1 or null, got {self.eval_subset}")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.eval_every < 0 or self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("eval_every, save_every and warmup_steps must be >= 0")
        check_bf16(self.bf16)
        if self.process_group_timeout_s < 1:
            raise ValueError(f"process_group_timeout_s must be >= 1, got {self.process_group_timeout_s}")


# --------------------------------------------------------------------------- data


class FeatureTable(torch.utils.data.Dataset):
    """Tokenized features held column-wise in numpy (no Python object per example).

    *Ragged* columns hold one integer sequence per example (``input_ids``, per-token
    labels), stored as one flat array plus offsets, like Arrow lists; *scalar* columns
    hold one integer per example (label, span positions). ``table[i]`` is a dict of
    1-D arrays (ragged) and Python ints (scalar). ``lengths`` are the ``input_ids`` lengths.
    """

    def __init__(self, ragged: dict[str, tuple[np.ndarray, np.ndarray]],
                 scalar: dict[str, np.ndarray]):
        if "input_ids" not in ragged:
            raise ValueError("a FeatureTable needs an input_ids column")
        self.ragged = ragged
        self.scalar = scalar
        offsets = ragged["input_ids"][1]
        self.lengths = np.diff(offsets)
        for name, (_, other) in ragged.items():
            if not np.array_equal(np.diff(other), self.lengths):
                raise ValueError(f"ragged column {name!r} does not match input_ids lengths")
        for name, column in scalar.items():
            if len(column) != len(self):
                raise ValueError(f"column {name!r} has {len(column)} rows, expected {len(self)}")

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], ragged: Sequence[str]) -> FeatureTable:
        """Build from per-example dicts; ``ragged`` names the sequence columns."""
        if not rows:
            raise ValueError("no examples")
        columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in ragged:
            sequences = [row[name] for row in rows]
            offsets = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in sequences], out=offsets[1:])
            values = np.fromiter((v for s in sequences for v in s), dtype=np.int64,
                                 count=int(offsets[-1]))
            columns[name] = (values, offsets)
        scalar = {name: np.asarray([row[name] for row in rows], dtype=np.int64)
                  for name in rows[0] if name not in ragged}
        return cls(columns, scalar)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for name, (values, offsets) in self.ragged.items():
            item[name] = values[offsets[index]:offsets[index + 1]]
        for name, column in self.scalar.items():
            item[name] = int(column[index])
        return item

    def write_parquet(self, path: str | Path) -> None:
        """Atomically write as Parquet (ragged columns as list<int32>, scalars as int64)."""
        arrays = {
            name: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                           pa.array(values, pa.int32()))
            for name, (values, offsets) in self.ragged.items()
        }
        arrays.update({name: pa.array(column, pa.int64()) for name, column in self.scalar.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(arrays), sink, compression="zstd")
        atomic_write_bytes(path, sink.getvalue().to_pybytes())

    @classmethod
    def read_parquet(cls, path: str | Path) -> FeatureTable:
        table = pq.read_table(path)
        ragged, scalar = {}, {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_list(column.type):
                offsets = column.offsets.to_numpy().astype(np.int64)
                values = column.values.to_numpy().astype(np.int64)
                ragged[name] = (values[offsets[0]:offsets[-1]], offsets - offsets[0])
            else:
                scalar[name] = column.to_numpy().astype(np.int64)
        return cls(ragged, scalar)


class PadCollator:
    """Dynamic padding: ragged columns padded to the batch's longest example.

    ``pad_values`` maps each ragged column to its pad value (``input_ids`` -> the
    tokenizer's pad id, per-token labels -> -100); ``attention_mask`` is added. With
    ``pad_to_multiple_of`` the width is rounded up (8 suits GPU tensor cores);
    ``pad_to`` pads every batch to one fixed width (the original's behaviour, used by the
    throughput benchmark's baseline). Scalar columns become (B,) int64 tensors.
    """

    def __init__(self, pad_values: dict[str, int], pad_to_multiple_of: int | None = None,
                 pad_to: int | None = None):
        if "input_ids" not in pad_values:
            raise ValueError("pad_values needs an entry for input_ids")
        self.pad_values = pad_values
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_to = pad_to

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        width = self.pad_to or max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if max(lengths) > width:
            raise ValueError(f"an example of {max(lengths)} tokens does not fit pad_to={width}")
        batch: dict[str, torch.Tensor] = {}
        for name, pad in self.pad_values.items():
            out = np.full((len(items), width), pad, dtype=np.int64)
            for row, item in enumerate(items):
                out[row, : len(item[name])] = item[name]
            batch[name] = torch.from_numpy(out)
        mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
        batch["attention_mask"] = torch.from_numpy(mask.astype(np.int64))
        for name in items[0]:
            if name not in self.pad_values:
                batch[name] = torch.tensor([item[name] for item in items], dtype=torch.long)
        return batch


def batch_order(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                shuffle: bool = True, group_by_length: bool = True) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one epoch; deterministic in (seed, epoch).

    Training: shuffled, length-grouped within windows of ``MEGABATCH`` batches, batch
    order shuffled. Evaluation (``shuffle=False``): sorted by length, longest first.
    """
    count = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, count, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(count)
    if group_by_length:
        window = batch_size * MEGABATCH
        order = np.concatenate([
            chunk[np.argsort(-lengths[chunk], kind="stable")]
            for chunk in (order[i:i + window] for i in range(0, count, window))
        ])
    batches = [order[i:i + batch_size] for i in range(0, count, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def example_lengths(data: Sequence[dict[str, Any]]) -> np.ndarray:
    if isinstance(data, (FeatureTable, SubsetView)):
        return data.lengths
    return np.asarray([len(data[i]["input_ids"]) for i in range(len(data))])


def predict_in_order(accelerator: Any, data: Sequence[dict[str, Any]], batch_size: int,
                     collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
                     predict: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                     ) -> dict[str, np.ndarray]:
    """Run ``predict(batch) -> {name: tensor}`` over ``data`` without gradients, batches
    (longest first) sharded over the processes; gather and return ``{name: array}`` with
    one row per example, in ``data`` order, on every process."""
    from accelerate.utils import gather_object

    batches = shard_batches(
        batch_order(example_lengths(data), batch_size, seed=0, epoch=0, shuffle=False),
        accelerator.process_index, accelerator.num_processes, even=False)
    indices, outputs = [], []
    with torch.no_grad():
        for index in batches:
            batch = {k: v.to(accelerator.device, non_blocking=True)
                     for k, v in collate([data[int(i)] for i in index]).items()}
            with accelerator.autocast():
                predicted = predict(batch)
            indices.append(index)
            outputs.append({k: v.float().cpu().numpy() if v.is_floating_point()
                            else v.cpu().numpy() for k, v in predicted.items()})
    gathered = gather_object([(indices, outputs)])
    parts = [part for _, process_parts in gathered for part in process_parts]
    order = np.argsort(np.concatenate([i for process_index, _ in gathered for i in process_index]),
                       kind="stable")
    return {name: np.concatenate([part[name] for part in parts])[order] for name in parts[0]}


def shard_batches(batches: list[np.ndarray], rank: int, world: int,
                  even: bool = True) -> list[np.ndarray]:
    """Batches rank, rank + world, ...; with ``even`` the tail that cannot be shared
    equally is dropped so every process runs the same number of steps."""
    usable = len(batches) - len(batches) % world if even else len(batches)
    return batches[rank:usable:world]


@dataclass(frozen=True)
class BatchPlan:
    """How the examples of one optimizer step are spread over processes and micro-batches:
    ``global_batch = processes x grad_accumulation x micro_batch``."""

    global_batch: int
    micro_batch: int
    processes: int
    grad_accumulation: int
    eval_batch: int
    """Examples per evaluation batch per process."""

    def micro_batches(self, step_examples: np.ndarray, rank: int) -> list[np.ndarray]:
        """The ``grad_accumulation`` micro-batches of process ``rank`` in one step's examples.

        The step's examples (length-sorted when grouped) are cut into processes x
        grad_accumulation consecutive slices; accumulation round a gives processes
        neighbouring slices, so processes that wait for each other hold similar lengths.
        """
        slices = len(step_examples) // self.micro_batch
        if len(step_examples) != self.global_batch or slices != self.processes * self.grad_accumulation:
            raise ValueError(f"a step holds {len(step_examples)} examples, expected {self.global_batch}")
        return [step_examples[(a * self.processes + rank) * self.micro_batch:][:self.micro_batch]
                for a in range(self.grad_accumulation)]

    def to_dict(self) -> dict[str, int]:
        return {"global_batch": self.global_batch, "micro_batch": self.micro_batch,
                "processes": self.processes, "grad_accumulation": self.grad_accumulation,
                "eval_batch": self.eval_batch}


def batch_plan(config: TrainingConfig, processes: int, key: str = "batch_size") -> BatchPlan:
    """The micro-batch of each process for ``config.batch_size`` examples a step; a global
    batch that does not divide is a one-line error naming ``key`` and the process count."""
    slots = processes * config.grad_accumulation
    if config.batch_size % slots:
        hint = f"make it a multiple of {slots}"
        if config.batch_size % processes == 0:
            per_process = config.batch_size // processes
            fits = [g for g in range(1, per_process + 1) if per_process % g == 0]
            hint += f", or set grad_accumulation to one of {fits}"
        raise ConfigError(f"{key} {config.batch_size} (examples per optimizer step) does not split "
                          f"over {processes} process(es) x grad_accumulation "
                          f"{config.grad_accumulation}: {hint}")
    micro = config.batch_size // slots
    return BatchPlan(config.batch_size, micro, processes, config.grad_accumulation,
                     config.eval_batch_size or 2 * micro)


def step_batches(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                 group_by_length: bool = True) -> list[np.ndarray]:
    """The examples of each optimizer step of one epoch: ``batch_order``'s batches of the
    global batch size, the one short batch (the epoch's leftover) left out. The same for
    any number of processes."""
    return [b for b in batch_order(lengths, batch_size, seed=seed, epoch=epoch,
                                   group_by_length=group_by_length) if len(b) == batch_size]


def eval_subset_indices(size: int, subset: int | None, seed: int) -> np.ndarray | None:
    """Sorted dev indices of the periodic evaluations: a sample drawn from ``seed`` alone
    (so the same at every evaluation and after resume); None = the whole dev set."""
    if subset is None or subset >= size:
        return None
    return np.sort(np.random.default_rng([seed, size, subset]).choice(size, subset, replace=False))


class SubsetView(Sequence):
    """Rows ``indices`` of a dataset, in that order (lengths kept for batching)."""

    def __init__(self, data: Sequence[dict[str, Any]], indices: np.ndarray):
        self.data, self.indices = data, indices
        self.lengths = example_lengths(data)[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[int(self.indices[index])]


_DONE = object()


class Prefetcher:
    """Collates batches in a background thread, up to ``depth`` ahead of the consumer.

    ``make_batch(indices) -> {name: tensor}`` runs in the thread, in order, one call per
    item of ``index_batches``; with ``pin`` the tensors are copied to pinned (page-locked)
    host memory so the step's ``.to(device, non_blocking=True)`` overlaps with compute.
    An error in the thread is raised by the consumer's next ``next()``. ``depth`` 0 =
    no thread: each batch is made when asked for. ``close()`` (or leaving the ``with``
    block) stops the thread without waiting for the remaining batches.
    """

    def __init__(self, make_batch: Callable[[np.ndarray], dict[str, torch.Tensor]],
                 index_batches: Sequence[np.ndarray], depth: int = 2, pin: bool = False):
        self.make_batch, self.index_batches, self.pin = make_batch, index_batches, pin
        self.inline = iter(index_batches) if depth == 0 else None
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stopped = threading.Event()
        self.thread = None
        if depth > 0:
            self.thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
            self.thread.start()

    def _prepare(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.make_batch(indices)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for indices in self.index_batches:
                if not self._put(self._prepare(indices)):
                    return
            self._put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.inline is not None:
            return self._prepare(next(self.inline))
        item = self.queue.get()
        if item is _DONE:
            self.queue.put(_DONE)  # later calls stop too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- helpers


def make_accelerator(config: TrainingConfig):
    """An ``Accelerator`` with the mixed precision of ``config.bf16`` (``precision_of``)
    and a process group that waits ``config.process_group_timeout_s`` at collectives.

    Without CUDA it is created with ``cpu=True``: only then does Accelerate 1.15 join the
    processes that ``torchrun`` starts into one gloo group (MULTI_CPU); otherwise each
    would run alone.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    precision = precision_of(config)
    # Accelerate keeps one precision per process and refuses another; runs in one process
    # (fine-tuning's tasks, tests) may differ, so the process-wide state is reset (the
    # process group, held by PartialState, stays).
    if AcceleratorState._shared_state.get("_mixed_precision", precision.mixed_precision) \
            != precision.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout_s))
    return Accelerator(mixed_precision=precision.mixed_precision,
                       cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])


def precision_of(config: TrainingConfig) -> Precision:
    """The mixed precision ``config.bf16`` resolves to on this machine, and why."""
    return precision_for(config.bf16)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / CHECKPOINTS
    found = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def remove_stale_run_temporaries(output_dir: str | Path) -> int:
    """Remove what a killed run leaves in its directory (a half-written checkpoint, best
    weights or curves); the caller owns the directory. Prints and returns the count."""
    output_dir = Path(output_dir)
    stale = [*(output_dir / CHECKPOINTS).glob(".step-*.tmp"),
             output_dir / BEST_DIR / ".model.safetensors.tmp",
             output_dir / f".{CURVES_FILE}.tmp.png"]
    removed = 0
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed += 1
    if removed:
        print(f"{output_dir}: removed {removed} stale temporar{'y' if removed == 1 else 'ies'} "
              "left by a killed run")
    return removed


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def plot_curves(records: list[dict[str, Any]], path: str | Path, title: str = "",
                baselines: dict[str, float] | None = None) -> None:
    """PNG: training loss (left) and every dev metric (right) against the optimizer step.

    Metrics with identical values at every evaluation (accuracy and micro-F1 of
    single-label classification) share one line ("accuracy = micro_f1"); ``baselines``
    (metric -> value, e.g. the majority class's dev accuracy) are dashed lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train_records = [r for r in records if r["kind"] == "train"]
    dev_records = [r for r in records if r["kind"] == "dev"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=(1, 1.35))
    left.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], marker=".")
    left.set(xlabel="optimizer step", ylabel="training loss", title="loss")
    names = sorted({k for r in dev_records for k in r if k not in RECORD_KEYS})
    series: dict[tuple, list[str]] = {}  # identical point lists -> the metrics that have them
    for name in names:
        points = tuple((r["step"], r[name]) for r in dev_records if name in r)
        series.setdefault(points, []).append(name)
    for points, same in series.items():
        (line,) = right.plot(*zip(*points), marker="o", label=" = ".join(same))
        for name in same:
            if baselines and name in baselines:
                right.axhline(baselines[name], color=line.get_color(), linestyle="--",
                              linewidth=1, label=f"majority class ({name})")
    right.set(xlabel="optimizer step", title="dev metrics")
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if names:  # beside the panel: the lines stay visible
        right.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)


RESUME_IGNORED = ("log_every", "save_every", "keep_checkpoints", "eval_batch_size",
                  "resume_with_changed_config", "output_dir", "data_dir", "cache_dir")
"""Config keys that do not change the trained weights (paths, logging, checkpointing)."""


def resume_config(config: TrainingConfig, seed: int, extra: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The training-relevant config stored in each checkpoint and compared on resume: the
    section's fields except RESUME_IGNORED, the seed, and the caller's ``extra``."""
    plain = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name not in RESUME_IGNORED}
    return orjson.loads(orjson.dumps({**plain, "seed": seed, **(extra or {})}))


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``{key: {"checkpoint": old, "now": new}}`` for each top-level key that differs."""
    return {key: {"checkpoint": saved.get(key), "now": current.get(key)}
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)}


@dataclass
class TrainResult:
    model: nn.Module
    """The unwrapped trainable module (best-on-dev weights when select_metric is set)."""
    global_step: int
    dev_metrics: dict[str, float] | None
    """Metrics of the returned weights: the final evaluation's (all of dev), or the best
    evaluation's when select_metric chose an earlier step (on the eval subset if set)."""
    best_step: int | None
    tokens: int
    """Real (non-pad) training tokens processed, all processes, over the whole run."""
    train_seconds: float
    """Wall time of the training steps (evaluation and checkpointing excluded)."""
    resumed_from: int | None
    batch: BatchPlan
    """Global batch, micro-batch, processes and accumulation of the run."""
    examples_left_per_epoch: int
    """Training examples of each epoch that fill no whole step (a different few each epoch)."""
    config_changes: dict[str, Any] | None = None
    """Keys of the training config that differ from the resumed checkpoint's (only with
    resume_with_changed_config); None when nothing changed or nothing was resumed."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def training_summary(result: TrainResult, config: TrainingConfig, accelerator: Any, started: float,
                     examples_left_per_epoch: int | None = None) -> dict[str, Any]:
    """A knowledge-stage manifest's ``training`` section: steps, tokens and their rate,
    processes and batch, device and precision, resume and selection. ``started`` is the
    stage's ``time.time()`` at its start; ``examples_left_per_epoch`` replaces the loop's
    count where the stage schedules its own epochs."""
    left = result.examples_left_per_epoch if examples_left_per_epoch is None else examples_left_per_epoch
    return {"steps": result.global_step, "tokens": result.tokens,
            "train_seconds": round(result.train_seconds, 3),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "wall_seconds": round(time.time() - started, 3),
            "processes": accelerator.num_processes,
            "batch": {**result.batch.to_dict(), "examples_left_per_epoch": left},
            "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision,
            "precision": precision_of(config).to_dict(),
            "resumed_from": result.resumed_from, "best_step": result.best_step,
            "resumed_config_changes": result.config_changes}


# --------------------------------------------------------------------------- the loop


def train(
    config: TrainingConfig,
    *,
    model: nn.Module,
    train_data: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor], Any], torch.Tensor],
    output_dir: str | Path,
    seed: int,
    dev_data: Sequence[dict[str, Any]] | None = None,
    predict_fn: Callable[[nn.Module, dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = None,
    metrics_fn: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None,
    frozen: nn.Module | None = None,
    frozen_dtype: torch.dtype | None = None,
    frozen_forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None,
    resume: bool = False,
    accelerator: Any = None,
    description: str = "train",
    batch_key: str = "batch_size",
    stage: str = "train",
    run_config: dict[str, Any] | None = None,
    epoch_steps: Callable[[int], list[np.ndarray]] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_data``; see the module docstring for the contract.
    ``batch_key`` names ``config.batch_size`` in errors (e.g. ``pretrain_fac.batch_size``).
    ``epoch_steps(epoch)`` gives the examples (indices into ``train_data``, ``batch_size``
    of them) of each optimizer step of an epoch, the same number every epoch and
    deterministic in the epoch (e.g. kadapter.multitask's task mix); None = ``step_batches``."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_model, save_model

    from kadapter.progress import progress

    if dev_data is not None and (predict_fn is None or metrics_fn is None):
        raise ValueError("dev_data needs predict_fn and metrics_fn")
    if dev_data is not None and len(dev_data) == 0:
        raise ValueError("dev_data is empty: pass None to train without evaluation")
    if (frozen is None) != (frozen_forward is None):
        raise ValueError("frozen and frozen_forward go together")
    if len(train_data) == 0:
        raise ValueError("no training examples")
    from kadapter.tracking import check_trackers

    check_trackers(config.trackers)  # on every process, before any of them starts
    accelerator = accelerator or make_accelerator(config)
    main = accelerator.is_main_process
    device = accelerator.device
    output_dir = Path(output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- the frozen part: on the device, eval mode, no gradients, never wrapped by DDP
    if frozen is not None:
        frozen.requires_grad_(False).eval().to(device=device, dtype=frozen_dtype)

    # ---- steps: global batches of batch_size examples, whatever the number of processes
    plan = batch_plan(config, world, batch_key)
    lengths = example_lengths(train_data)
    if epoch_steps is None:
        def epoch_steps(epoch: int) -> list[np.ndarray]:
            return step_batches(lengths, plan.global_batch, seed=seed, epoch=epoch,
                                group_by_length=config.length_grouping)
        steps_per_epoch = len(train_data) // plan.global_batch
    else:
        steps_per_epoch = len(epoch_steps(0))
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_data)} training examples do not fill one optimizer step "
                         f"of {batch_key} {plan.global_batch}")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    subset = eval_subset_indices(len(dev_data), config.eval_subset, seed) if dev_data else None
    warmup_steps = min(config.warmup_steps or int(config.warmup_ratio * total_steps),
                       total_steps - 1)

    # ---- optimizer, schedule; only the trainable module is prepared
    set_seed(seed)
    optimizer = torch.optim.AdamW(  # fused kernel: ~15x faster than foreach on CPU too
        optimizer_groups(model, config.weight_decay), lr=config.learning_rate,
        eps=config.adam_epsilon, fused=device.type in ("cuda", "cpu"))
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: Accelerate would step a prepared scheduler once per process.
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- fresh start or resume (in a directory that is this stage's own)
    if main:
        claim_output_dir(output_dir, stage)
        remove_stale_run_temporaries(output_dir)
    accelerator.wait_for_everyone()
    current_config = resume_config(config, seed, run_config)
    config_changes = None
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0,
                             "train_seconds": 0.0, "best": None, "best_step": None,
                             "best_metrics": None, "last_metrics": None, "processes": world,
                             "config": current_config}
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        saved = read_json(checkpoint / STATE_FILE)
        if saved["processes"] != world:  # dropout RNG states are per process
            raise ValueError(f"{checkpoint} was written by {saved['processes']} process(es); "
                             f"resume it with the same number, not {world}")
        config_changes = config_differences(saved.get("config") or {}, current_config) or None
        if config_changes and not config.resume_with_changed_config:
            raise ConfigError(f"{checkpoint} was trained with another config (differs in "
                              f"{', '.join(config_changes)}); resume with the same settings, "
                              "or set resume_with_changed_config true to continue anyway")
        load_training_state(checkpoint, accelerator, model, optimizer, scheduler)
        state = {**saved, "config": current_config}
        if main:
            print(f"resuming from {checkpoint} (step {state['step']} of {total_steps})")
    elif main:
        if resume:
            print(f"no checkpoint in {output_dir / CHECKPOINTS}: starting from scratch")
        for stale in (CHECKPOINTS, BEST_DIR, "tensorboard"):
            shutil.rmtree(output_dir / stale, ignore_errors=True)
        for stale in (METRICS_FILE, CURVES_FILE):
            (output_dir / stale).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    resumed_from = state["step"] if checkpoint is not None else None

    trackers = None
    if main:
        from kadapter.config import to_plain
        from kadapter.tracking import RunTrackers

        output_dir.mkdir(parents=True, exist_ok=True)
        records = [r for r in read_metrics(output_dir) if r["step"] <= state["step"]]
        atomic_write_bytes(output_dir / METRICS_FILE,
                           b"".join(orjson.dumps(r) + b"\n" for r in records))
        trackers = RunTrackers(config.trackers, output_dir, description,
                               {**to_plain(config), "seed": seed, "processes": world},
                               purge_step=None if resumed_from is None else state["step"] + 1)

    def log(record: dict[str, Any]) -> None:
        if not main:
            return
        with open(output_dir / METRICS_FILE, "ab") as handle:
            handle.write(orjson.dumps(record) + b"\n")
        prefix = record["kind"]
        trackers.log({f"{prefix}/{key}": value for key, value in record.items()
                      if key not in RECORD_KEYS and isinstance(value, (int, float))},
                     record["step"])

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def make_batch(index: np.ndarray) -> dict[str, torch.Tensor]:
        return collate([train_data[int(i)] for i in index])

    def encode(batch: dict[str, torch.Tensor]) -> Any:
        if frozen is None:
            return None
        with torch.no_grad(), accelerator.autocast():
            return frozen_forward(frozen, batch)

    def evaluate(final: bool) -> tuple[dict[str, float], dict[str, float]]:
        """Predict dev (sharded over processes), gather in dev order, score -> (metrics to
        log, metrics to select on). Periodic evaluations score the eval subset only; the
        final one scores all of dev, and its subset rows give the comparable selection value."""
        plain = accelerator.unwrap_model(model)
        plain.eval()
        data = dev_data if final or subset is None else SubsetView(dev_data, subset)
        merged = predict_in_order(accelerator, data, plan.eval_batch, collate,
                                  lambda batch: predict_fn(plain, batch, encode(batch)))
        model.train()
        metrics = metrics_fn(merged)
        if not final or subset is None:
            return metrics, metrics
        return metrics, metrics_fn({name: values[subset] for name, values in merged.items()})

    def save_checkpoint() -> None:
        root = output_dir / CHECKPOINTS
        final = root / f"step-{state['step']:08d}"
        tmp = root / f".step-{state['step']:08d}.tmp"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
        accelerator.wait_for_everyone()
        save_training_state(tmp, accelerator, model, optimizer, scheduler)
        accelerator.wait_for_everyone()
        if main:
            for path in tmp.rglob("*"):  # safetensors writes files 0600
                if path.is_file():
                    ordinary_permissions(path)
            atomic_write_json(tmp / STATE_FILE, state)
            os.replace(tmp, final)
            complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
            for old in complete[: -config.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def flush(window: dict[str, Any]) -> tuple[float, int, float]:
        """Sum the window over processes (this also waits for the device) -> totals."""
        totals = accelerator.reduce(
            torch.stack([window["loss_sum"], torch.tensor(float(window["loss_count"]), device=device),
                         window["tokens"].float()]), reduction="sum").tolist()
        seconds = time.perf_counter() - window["clock"]
        state["tokens"] += int(totals[2])
        state["train_seconds"] += seconds
        return totals[0] / max(totals[1], 1.0), int(totals[2]), seconds

    def new_window() -> dict[str, Any]:
        return {"loss_sum": torch.zeros((), device=device), "loss_count": 0,
                "tokens": torch.zeros((), device=device, dtype=torch.long),
                "clock": time.perf_counter()}

    def evaluate_and_select(step: int) -> None:
        final = step == total_steps
        metrics, selection = evaluate(final)
        state["last_metrics"] = metrics
        examples = len(dev_data) if final or subset is None else len(subset)
        log({"kind": "dev", "step": step, "epoch": state["epoch"], "dev_examples": examples,
             **metrics})
        if config.select_metric is None:
            return
        if config.select_metric not in selection:
            raise KeyError(f"select_metric {config.select_metric!r} is not a dev metric "
                           f"(have {sorted(selection)})")
        value = selection[config.select_metric]
        if state["best"] is None or value > state["best"]:
            state.update(best=value, best_step=step, best_metrics=selection)
            if main:
                best = output_dir / BEST_DIR
                best.mkdir(parents=True, exist_ok=True)
                tmp = best / ".model.safetensors.tmp"
                save_model(accelerator.unwrap_model(model), str(tmp))
                ordinary_permissions(tmp)  # safetensors creates files 0600
                os.replace(tmp, best / "model.safetensors")
            accelerator.wait_for_everyone()

    # ---- the loop
    bar = progress(total=total_steps, initial=state["step"], desc=description, unit="step",
                   disable=not main)
    model.train()
    window = new_window()  # since the last flush of token and time counters
    log_loss, log_count, log_tokens, log_seconds = 0.0, 0, 0, 0.0  # since the last log line
    steps_epoch, steps = None, []
    while state["step"] < total_steps:
        epoch = state["epoch"]
        if steps_epoch != epoch:
            steps_epoch, steps = epoch, epoch_steps(epoch)
        position = state["batch"]  # optimizer steps of this epoch already taken
        # One prefetched segment runs up to the next evaluation: an evaluation may call the
        # same collate (e.g. a seeded masking collator), so collation pauses around it and
        # the order of collate calls is that of an unprefetched run.
        segment_end = min(len(steps), position + total_steps - state["step"])
        if dev_data is not None and config.eval_every:
            next_eval = (state["step"] // config.eval_every + 1) * config.eval_every
            segment_end = min(segment_end, position + next_eval - state["step"])
        micro_batches = [m for examples in steps[position:segment_end]
                         for m in plan.micro_batches(examples, rank)]
        with Prefetcher(make_batch, micro_batches, config.prefetch_batches,
                        pin=device.type == "cuda") as prefetched:
            while position < segment_end:
                # one optimizer step: grad_accumulation micro-batches on every process
                for offset in range(plan.grad_accumulation):
                    batch = to_device(next(prefetched))
                    frozen_out = encode(batch)
                    last = offset == plan.grad_accumulation - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        with accelerator.autocast():  # modules loss_fn calls beside the model too
                            loss = loss_fn(model, batch, frozen_out)
                        accelerator.backward(loss / plan.grad_accumulation)
                    window["loss_sum"] += loss.detach().float()
                    window["loss_count"] += 1
                    window["tokens"] += batch["attention_mask"].sum()
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                if not optimizer.step_was_skipped:  # fp16: an overflowing step is not taken
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)

                position += 1
                step = state["step"] = state["step"] + 1
                epoch_end = position >= len(steps)
                state["epoch"], state["batch"] = (epoch + 1, 0) if epoch_end else (epoch, position)
                do_log = step % config.log_every == 0 or step == total_steps
                do_eval = dev_data is not None and (
                    epoch_end or step == total_steps
                    or bool(config.eval_every and step % config.eval_every == 0))
                do_save = bool(config.save_every and step % config.save_every == 0) or step == total_steps
                if not (do_log or do_eval or do_save):
                    continue
                loss_mean, tokens, seconds = flush(window)
                log_loss += loss_mean * window["loss_count"]
                log_count += window["loss_count"]
                log_tokens += tokens
                log_seconds += seconds
                if do_log:
                    tokens_per_s = log_tokens / max(log_seconds, 1e-9)
                    log({"kind": "train", "step": step, "epoch": epoch, "loss": log_loss / log_count,
                         "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s})
                    bar.set_postfix(loss=f"{log_loss / log_count:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                    log_loss, log_count, log_tokens, log_seconds = 0.0, 0, 0, 0.0
                if do_eval:
                    evaluate_and_select(step)
                if do_save:
                    save_checkpoint()
                window = new_window()  # evaluation and checkpointing are not training time
    bar.close()

    # ---- best weights back, logs closed, curves drawn
    plain = accelerator.unwrap_model(model)
    dev_metrics = state["last_metrics"]
    if config.select_metric is not None and state["best_step"] is not None:
        accelerator.wait_for_everyone()
        # safetensors takes "cpu" but not the "cpu:0" a multi-process CPU run reports.
        target = "cpu" if device.type == "cpu" else str(device)
        load_model(plain, str(output_dir / BEST_DIR / "model.safetensors"), device=target)
        if state["best_step"] != state["step"]:  # else the final, whole-dev metrics
            dev_metrics = state["best_metrics"]
    if main:
        trackers.finish()
        plot_curves(read_metrics(output_dir), output_dir / CURVES_FILE, description)
    accelerator.wait_for_everyone()
    plain.eval()
    return TrainResult(plain, state["step"], dev_metrics, state["best_step"],
                       state["tokens"], state["train_seconds"], resumed_from, plan,
                       len(train_data) - steps_per_epoch * plan.global_batch, config_changes)
