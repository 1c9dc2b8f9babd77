"""The generic training loop: batching, padding, schedule, checkpoints, exact resume."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from torch import nn

from kadapter.io import read_json
from kadapter.training import (
    CHECKPOINTS,
    CURVES_FILE,
    METRICS_FILE,
    FeatureTable,
    PadCollator,
    TrainingConfig,
    batch_order,
    latest_checkpoint,
    linear_schedule,
    read_metrics,
    shard_batches,
    train,
)

PAD, VOCAB, HIDDEN, CLASSES = 0, 40, 16, 3


# ------------------------------------------------------------------ a toy task
# Label = which of three "keyword" tokens (1, 2, 3) the sequence holds; the other tokens
# are noise from 4..VOCAB-1. A frozen embedding plays the encoder, a mean-pool + MLP the
# trainable part.


def toy_rows(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        length = int(rng.integers(3, 20))
        ids = rng.integers(4, VOCAB, size=length)
        label = int(rng.integers(0, CLASSES))
        ids[int(rng.integers(0, length))] = 1 + label
        rows.append({"input_ids": ids.tolist(), "label": label})
    return rows


class ToyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 32), nn.Dropout(0.1), nn.GELU(),
                                 nn.Linear(32, CLASSES))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        token_logits = self.mlp(states)  # a keyword shows at its own position: max-pool scores
        return token_logits.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)


def frozen_forward(frozen, batch):
    return frozen(batch["input_ids"])


def loss_fn(model, batch, states):
    return nn.functional.cross_entropy(model(states, batch["attention_mask"]), batch["label"])


def predict_fn(model, batch, states):
    return {"pred": model(states, batch["attention_mask"]).argmax(-1), "gold": batch["label"]}


def metrics_fn(outputs):
    return {"accuracy": float((outputs["pred"] == outputs["gold"]).mean()),
            "examples": float(len(outputs["gold"]))}


def build(seed: int = 0):
    torch.manual_seed(seed)
    frozen = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD)
    return frozen, ToyHead()


def run(tmp_path, *, resume=False, crash_at_call=None, seed=0, **overrides):
    settings = dict(learning_rate=3e-2, batch_size=8, epochs=3, warmup_ratio=0.1,
                    log_every=2, eval_every=5, save_every=4, keep_checkpoints=2)
    settings.update(overrides)
    config = TrainingConfig(**settings)
    frozen, head = build(seed)
    calls = {"n": 0}

    def maybe_crashing_loss(model, batch, states):
        calls["n"] += 1
        if crash_at_call is not None and calls["n"] == crash_at_call:
            raise KeyboardInterrupt("simulated interruption")
        return loss_fn(model, batch, states)

    train_table = FeatureTable.from_rows(toy_rows(120, 1), ragged=["input_ids"])
    dev_table = FeatureTable.from_rows(toy_rows(40, 2), ragged=["input_ids"])
    result = train(
        config, model=head, train_data=train_table, dev_data=dev_table,
        collate=PadCollator({"input_ids": PAD}), loss_fn=maybe_crashing_loss,
        predict_fn=predict_fn, metrics_fn=metrics_fn, frozen=frozen,
        frozen_forward=frozen_forward, output_dir=tmp_path / "run", seed=seed, resume=resume)
    return result, frozen


def state_bytes(module: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ data helpers


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("count,batch_size", [(1, 4), (10, 3), (257, 16)])
def test_batch_order_covers_every_example_once_and_is_seeded(count, batch_size, group_by_length):
    lengths = np.random.default_rng(0).integers(1, 64, size=count)
    batches = batch_order(lengths, batch_size, seed=5, epoch=2, group_by_length=group_by_length)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(count))
    assert all(len(b) <= batch_size for b in batches)
    again = batch_order(lengths, batch_size, seed=5, epoch=2, group_by_length=group_by_length)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other_epoch = batch_order(lengths, batch_size, seed=5, epoch=3, group_by_length=group_by_length)
    if count > batch_size:
        assert not all(np.array_equal(a, b) for a, b in zip(batches, other_epoch))


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(5, 64, size=4000)

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches) / lengths.sum()

    grouped = padded(batch_order(lengths, 32, seed=0, epoch=0, group_by_length=True))
    random = padded(batch_order(lengths, 32, seed=0, epoch=0, group_by_length=False))
    assert grouped < 1.1 < 1.4 < random  # ~3% padding against ~70%


def test_eval_order_is_sorted_and_complete():
    lengths = np.array([3, 9, 1, 9, 4])
    batches = batch_order(lengths, 2, seed=0, epoch=0, shuffle=False)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]


@pytest.mark.parametrize("count,world,even,expected", [
    (7, 2, True, [[0, 2, 4], [1, 3, 5]]),
    (7, 2, False, [[0, 2, 4, 6], [1, 3, 5]]),
    (5, 1, True, [[0, 1, 2, 3, 4]]),
    (2, 3, True, [[], [], []]),
])
def test_shard_batches(count, world, even, expected):
    batches = list(range(count))
    assert [shard_batches(batches, r, world, even) for r in range(world)] == expected


@pytest.mark.parametrize("pad_to_multiple_of,pad_to,width", [(None, None, 4), (8, None, 8), (None, 6, 6)])
def test_pad_collator(pad_to_multiple_of, pad_to, width):
    items = [{"input_ids": np.array([5, 6, 7, 8]), "labels": np.array([-100, 2, 0, -100]), "y": 1},
             {"input_ids": np.array([9, 10]), "labels": np.array([0, 1]), "y": 0}]
    batch = PadCollator({"input_ids": 1, "labels": -100}, pad_to_multiple_of, pad_to)(items)
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][1].tolist() == [9, 10] + [1] * (width - 2)
    assert batch["labels"][1].tolist() == [0, 1] + [-100] * (width - 2)
    assert batch["attention_mask"].sum(1).tolist() == [4, 2]
    assert batch["y"].tolist() == [1, 0]


def test_pad_collator_refuses_an_example_longer_than_pad_to():
    with pytest.raises(ValueError, match="does not fit"):
        PadCollator({"input_ids": 1}, pad_to=3)([{"input_ids": np.arange(5)}])


def test_feature_table_parquet_round_trip(tmp_path):
    rows = [{"input_ids": [0, 5, 2], "labels": [-100, 0, -100], "label": 3},
            {"input_ids": [0, 2], "labels": [-100, -100], "label": 1}]
    table = FeatureTable.from_rows(rows, ragged=["input_ids", "labels"])
    table.write_parquet(tmp_path / "t.parquet")
    back = FeatureTable.read_parquet(tmp_path / "t.parquet")
    assert len(back) == 2 and back.lengths.tolist() == [3, 2]
    for i, row in enumerate(rows):
        item = back[i]
        assert item["input_ids"].tolist() == row["input_ids"]
        assert item["labels"].tolist() == row["labels"]
        assert item["label"] == row["label"]


def test_feature_table_rejects_mismatched_ragged_columns():
    with pytest.raises(ValueError, match="does not match input_ids"):
        FeatureTable.from_rows([{"input_ids": [1, 2], "labels": [0]}], ragged=["input_ids", "labels"])


@pytest.mark.parametrize("warmup,total,expected", [
    (0, 4, [1.0, 0.75, 0.5, 0.25]),
    (2, 6, [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
])
def test_linear_schedule_warms_up_then_decays_to_zero(warmup, total, expected):
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = linear_schedule(optimizer, warmup, total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("warmup_ratio", 1.0),
                                          ("max_steps", 0), ("learning_rate", 0.0)])
def test_training_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**{field: value})


# ------------------------------------------------------------------ the loop


def test_training_learns_keeps_frozen_part_and_writes_logs(tmp_path):
    before = state_bytes(build(0)[0])
    result, frozen = run(tmp_path)
    run_dir = tmp_path / "run"
    assert state_bytes(frozen) == before  # the frozen module never changes
    assert result.global_step == 3 * 15  # 120 examples / batch 8 = 15 steps an epoch
    assert result.dev_metrics["accuracy"] > 0.8  # chance is 1/3
    assert result.dev_metrics["examples"] == 40  # every dev example scored once
    records = read_metrics(run_dir)
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    dev_steps = [r["step"] for r in records if r["kind"] == "dev"]
    assert train_steps == list(range(2, 46, 2)) + [45]
    assert dev_steps == [5, 10, 15, 20, 25, 30, 35, 40, 45]  # every 5 and at epoch ends
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.5 * losses[0]
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert result.tokens == 3 * int(FeatureTable.from_rows(toy_rows(120, 1), ["input_ids"]).lengths.sum())
    checkpoints = sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir())
    assert checkpoints == ["step-00000044", "step-00000045"]  # keep_checkpoints=2
    assert (run_dir / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run_dir / "tensorboard").iterdir())


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # batch_size is examples per optimizer step: 32 = 4 accumulated micro-batches of 8
    result, _ = run(tmp_path, batch_size=32, grad_accumulation=4, epochs=2, eval_every=0,
                    save_every=0)
    assert result.global_step == 2 * 3  # 120 examples -> 3 steps of 32 an epoch, 24 left over
    assert (result.batch.micro_batch, result.examples_left_per_epoch) == (8, 24)
    dev_steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "dev"]
    assert dev_steps == [3, 6]


def test_interrupted_run_resumes_to_identical_weights(tmp_path):
    reference, _ = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at_call=27)  # inside epoch 2, after the step-24 checkpoint
    assert latest_checkpoint(tmp_path / "b" / "run").name == "step-00000024"
    resumed, _ = run(tmp_path / "b", resume=True)
    assert resumed.resumed_from == 24
    assert state_bytes(resumed.model) == state_bytes(reference.model)
    lines = (tmp_path / "b" / "run" / METRICS_FILE).read_bytes().splitlines()
    steps = [(r["kind"], r["step"]) for r in map(orjson.loads, lines)]
    assert steps == [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "a" / "run")]


def test_resume_refuses_another_number_of_processes(tmp_path):
    run(tmp_path, epochs=1)
    checkpoint = latest_checkpoint(tmp_path / "run")
    state = read_json(checkpoint / "training_state.json")
    (checkpoint / "training_state.json").write_bytes(orjson.dumps({**state, "processes": 4}))
    with pytest.raises(ValueError, match="written by 4 process"):
        run(tmp_path, epochs=1, resume=True)


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    result, _ = run(tmp_path, resume=True, epochs=1)
    assert result.resumed_from is None and result.global_step == 15
    assert "starting from scratch" in capsys.readouterr().out


def test_select_metric_restores_the_best_evaluation(tmp_path):
    result, _ = run(tmp_path, select_metric="accuracy", learning_rate=0.3, epochs=2)
    dev = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "dev"]
    best = max(dev, key=lambda r: r["accuracy"])  # first of the best on ties
    assert result.best_step == best["step"]
    assert result.dev_metrics["accuracy"] == best["accuracy"]


def test_select_metric_must_be_a_dev_metric(tmp_path):
    with pytest.raises(KeyError, match="f1"):
        run(tmp_path, select_metric="f1", epochs=1)


def test_empty_dev_data_is_refused_before_training(tmp_path):
    frozen, head = build(0)
    with pytest.raises(ValueError, match="dev_data is empty"):
        train(TrainingConfig(epochs=1), model=head,
              train_data=FeatureTable.from_rows(toy_rows(8, 1), ragged=["input_ids"]),
              dev_data=[], collate=PadCollator({"input_ids": PAD}), loss_fn=loss_fn,
              predict_fn=predict_fn, metrics_fn=metrics_fn, frozen=frozen,
              frozen_forward=frozen_forward, output_dir=tmp_path / "run", seed=0)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
