"""The training loop at scale: evaluation on a fixed dev sample, checkpoints that hold the
trained weights only, and a loader that prepares batches ahead without per-step syncs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_finetune import config_for, workspace  # noqa: F401  (the fine-tuning fixture)
from torch import nn
from workspace import toy_table

from kadapter.training import (
    CHECKPOINTS,
    PadCollator,
    Prefetcher,
    TrainingConfig,
    eval_subset_indices,
    latest_checkpoint,
    read_metrics,
    train,
)

PAD, VOCAB, HIDDEN, CLASSES = 0, 30, 8, 3




class Toy(nn.Module):
    """A frozen embedding *inside* the trained module (as fine-tuning's adapters are),
    then a trainable projection and classifier with dropout."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD).requires_grad_(False)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.proj(self.frozen(batch["input_ids"])) * mask).sum(1) / mask.sum(1)
        return self.out(self.drop(torch.tanh(pooled)))


def run(tmp_path, *, resume=False, loss_hook=None, collate_hook=None, predict_hook=None,
        train_rows=80, dev_rows=30, **overrides):
    settings = dict(learning_rate=5e-2, batch_size=8, epochs=2, log_every=2, eval_every=3,
                    save_every=4, keep_checkpoints=2)
    settings.update(overrides)
    pad = PadCollator({"input_ids": PAD})

    def collate(items):
        if collate_hook:
            collate_hook(items)
        return pad(items)

    def loss_fn(model, batch, _):
        if loss_hook:
            loss_hook(batch)
        return nn.functional.cross_entropy(model(batch), batch["label"])

    def predict_fn(model, batch, _):
        if predict_hook:
            predict_hook(batch)
        return {"pred": model(batch).argmax(-1), "gold": batch["label"]}

    torch.manual_seed(0)
    model = Toy()
    result = train(TrainingConfig(**settings), model=model, train_data=toy_table(train_rows, 1),
                   dev_data=toy_table(dev_rows, 2) if dev_rows else None, collate=collate,
                   loss_fn=loss_fn, predict_fn=predict_fn,
                   metrics_fn=lambda o: {"accuracy": float((o["pred"] == o["gold"]).mean())},
                   output_dir=tmp_path / "run", seed=5, resume=resume)
    return result


def records(root) -> list[dict]:
    """metrics.jsonl without its timings."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(root / "run")]


def weights(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ eval_subset


def test_eval_subset_is_seeded_and_fixed():
    first = eval_subset_indices(1000, 50, seed=3)
    assert len(first) == 50 == len(set(first.tolist())) and np.all(np.diff(first) > 0)
    assert np.array_equal(first, eval_subset_indices(1000, 50, seed=3))
    assert not np.array_equal(first, eval_subset_indices(1000, 50, seed=4))
    assert eval_subset_indices(1000, None, seed=3) is None
    assert eval_subset_indices(40, 40, seed=3) is None  # the whole set anyway


def test_periodic_evaluations_score_the_subset_and_the_last_one_all_of_dev(tmp_path):
    scored: list[list[int]] = []

    def predict_hook(batch):
        scored[-1].extend(batch["id"].tolist())

    def loss_hook(_):
        if not scored or scored[-1]:
            scored.append([])  # a new evaluation starts after the next training step

    result = run(tmp_path, eval_subset=12, predict_hook=predict_hook, loss_hook=loss_hook)
    evaluations = [sorted(ids) for ids in scored if ids]
    dev = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "dev"]
    assert [r["step"] for r in dev] == [3, 6, 9, 10, 12, 15, 18, 20]
    assert [r["dev_examples"] for r in dev] == [12] * 7 + [30]
    subset = eval_subset_indices(30, 12, seed=5).tolist()
    assert evaluations[:-1] == [subset] * 7  # the same sample every time
    assert evaluations[-1] == list(range(30))  # the final evaluation: every dev example
    assert result.dev_metrics == {"accuracy": dev[-1]["accuracy"]}


def crash_at(call: int):
    """A loss hook that interrupts the run at its ``call``-th loss (one per step here)."""
    calls = {"n": 0}

    def crash(_):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt

    return crash


def test_selection_compares_subset_scores_and_resume_keeps_the_sample(tmp_path):
    straight = run(tmp_path / "a", eval_subset=12, select_metric="accuracy")
    crash = crash_at(11)  # step 11, after the step-8 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", eval_subset=12, select_metric="accuracy", loss_hook=crash)
    resumed = run(tmp_path / "b", eval_subset=12, select_metric="accuracy", resume=True)
    assert resumed.resumed_from == 8
    assert records(tmp_path / "b") == records(tmp_path / "a")
    assert (resumed.best_step, resumed.dev_metrics) == (straight.best_step, straight.dev_metrics)
    assert weights(resumed.model) == weights(straight.model)


# ------------------------------------------------------------------ checkpoints


def test_checkpoints_hold_the_trained_weights_only_and_resume_exactly(tmp_path):
    reference = run(tmp_path / "a")
    crash = crash_at(14)  # step 14, after the step-12 checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", loss_hook=crash, keep_checkpoints=1, save_every=2)
    root = tmp_path / "b" / "run" / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-00000012"]  # keep_checkpoints=1
    with safe_open(str(root / "step-00000012" / "model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["out.bias", "out.weight", "proj.bias", "proj.weight"]
    resumed = run(tmp_path / "b", resume=True, keep_checkpoints=1, save_every=2)
    assert resumed.resumed_from == 12
    assert weights(resumed.model) == weights(reference.model)  # frozen part included


def test_a_checkpoint_with_other_weights_is_refused(tmp_path):
    run(tmp_path, epochs=1, dev_rows=0)
    checkpoint = latest_checkpoint(tmp_path / "run")
    save_file({"proj.weight": torch.zeros(HIDDEN, HIDDEN)}, str(checkpoint / "model.safetensors"))
    with pytest.raises(ValueError, match="not the 4 trainable weights"):
        run(tmp_path, epochs=1, dev_rows=0, resume=True)


# ------------------------------------------------------------------ the loader


def test_batches_are_prepared_one_step_ahead(tmp_path):
    collated = {"n": 0}
    lock = threading.Condition()

    def collate_hook(_):
        with lock:
            collated["n"] += 1
            lock.notify_all()

    steps = {"n": 0}

    def loss_hook(_):
        # while step k runs, the batch of step k+1 is (being) collated in the background
        steps["n"] += 1
        with lock:
            assert lock.wait_for(lambda: collated["n"] >= min(steps["n"] + 1, 10), timeout=10)

    run(tmp_path, dev_rows=0, epochs=1, save_every=0, collate_hook=collate_hook,
        loss_hook=loss_hook)
    assert steps["n"] == 10


def test_prefetching_changes_no_result(tmp_path):
    ahead = run(tmp_path / "a", prefetch_batches=3, eval_subset=12)
    inline = run(tmp_path / "b", prefetch_batches=0, eval_subset=12)
    assert weights(ahead.model) == weights(inline.model)
    assert records(tmp_path / "a") == records(tmp_path / "b")


def test_an_error_while_collating_reaches_the_training_loop(tmp_path):
    calls = {"n": 0}

    def collate_hook(_):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("bad row 4")

    with pytest.raises(ValueError, match="bad row 4"):
        run(tmp_path, dev_rows=0, collate_hook=collate_hook)


def test_a_closed_prefetcher_stops_its_thread():
    with Prefetcher(lambda i: {"x": torch.as_tensor(i)}, [np.arange(3)] * 1000, depth=2) as batches:
        first = next(batches)
    assert first["x"].tolist() == [0, 1, 2]
    deadline = time.time() + 5
    while batches.thread.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert not batches.thread.is_alive()


def test_pinned_batches_when_asked(monkeypatch):
    pinned = []

    def fake_pin(self):  # pinning needs CUDA; record the call instead
        pinned.append(self.shape)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    make = lambda i: {"x": torch.as_tensor(i), "y": torch.zeros(2)}  # noqa: E731
    with Prefetcher(make, [np.arange(3), np.arange(2)], depth=1, pin=True) as batches:
        assert [b["x"].tolist() for b in batches] == [[0, 1, 2], [0, 1]]
    assert pinned == [(3,), (2,), (2,), (2,)]


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


def test_no_host_device_sync_per_step_outside_logging_steps(tmp_path, monkeypatch):
    """Reading a tensor's value on the host (``.item()``, ``bool(t)``, ...) in the training
    thread waits for the device; counted here, the number must not grow with the steps.
    (Collation runs in the prefetch thread, on host tensors.)"""
    counts = {"n": 0}
    trainer = threading.current_thread()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            if threading.current_thread() is trainer:
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    seen = []
    for steps in (4, 12):
        counts["n"] = 0
        run(tmp_path / str(steps), dev_rows=0, max_steps=steps, log_every=100, save_every=0)
        seen.append(counts["n"])
    assert seen[0] == seen[1], seen


# ------------------------------------------------------------------ fine-tuning checkpoints


def test_finetuning_checkpoints_leave_the_frozen_adapters_out(workspace, monkeypatch):  # noqa: F811
    from kadapter import finetune
    from kadapter.tasks import TASKS

    built = []
    original_model = finetune.FinetuneModel

    def recording_model(*args, **kwargs):
        built.append(original_model(*args, **kwargs))
        return built[-1]

    task = TASKS["typing"]
    calls = {"n": 0}

    def crashing_loss(logits, targets, original=task.loss):
        calls["n"] += 1
        if calls["n"] == 5:  # step 5, after the step-4 checkpoint
            raise KeyboardInterrupt("simulated interruption")
        return original(logits, targets)

    monkeypatch.setattr(finetune, "FinetuneModel", recording_model)
    monkeypatch.setattr(task, "loss", crashing_loss)
    config = config_for(workspace, "--finetune.typing.max_steps", "6", "--finetune.typing.save_every",
                        "1", "--finetune.typing.keep_checkpoints", "1",
                        "--output_dir", str(workspace / "ckpt"))
    with pytest.raises(KeyboardInterrupt):
        finetune.run_finetune(config, "typing", "fac,lin")
    root = workspace / "ckpt/typing/.fac+lin.partial" / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]  # keep_checkpoints=1
    with safe_open(str(root / "step-00000004" / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    parameters = dict(built[0].named_parameters())
    frozen = {n for n, p in parameters.items() if not p.requires_grad}
    assert frozen and all(".adapters." in n for n in frozen)  # the adapters, and only they
    assert saved == {n for n, p in parameters.items() if p.requires_grad}
