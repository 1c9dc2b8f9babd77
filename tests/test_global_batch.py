"""Global batch semantics: batch_size is the number of examples per optimizer step on any
number of processes; the per-process micro-batch is derived, and a 2-process torchrun run
takes the same steps, over the same examples, as a 1-process run of the same config.

Run as a script (``torchrun ... tests/test_global_batch.py OUT``) it is the worker of the
multi-process test: it trains the toy model below and writes what each process saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from workspace import toy_table

from kadapter.config import ConfigError
from kadapter.training import (
    PadCollator,
    TrainingConfig,
    batch_plan,
    step_batches,
    train,
)

PAD, VOCAB, HIDDEN, CLASSES = 0, 30, 8, 3
SETTINGS = dict(learning_rate=5e-2, batch_size=8, epochs=2, log_every=3, eval_every=4,
                save_every=0, max_grad_norm=1.0)




class Toy(nn.Module):
    """Embedding -> masked mean -> linear; no dropout, so processes cannot differ by RNG."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD)
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
        return self.out(pooled)


def run_toy(output_dir: Path, **overrides) -> tuple[dict, list[list[int]]]:
    """Train the toy model; returns (the run's facts, the ids of every micro-batch of this
    process, in order)."""
    seen: list[list[int]] = []

    def loss_fn(model, batch, _):
        seen.append(batch["id"].tolist())
        return nn.functional.cross_entropy(model(batch), batch["label"])

    def predict_fn(model, batch, _):
        return {"pred": model(batch).argmax(-1), "gold": batch["label"]}

    torch.manual_seed(0)
    config = TrainingConfig(**{**SETTINGS, **overrides})
    result = train(config, model=Toy(), train_data=toy_table(52, 1), dev_data=toy_table(12, 2),
                   collate=PadCollator({"input_ids": PAD}), loss_fn=loss_fn,
                   predict_fn=predict_fn,
                   metrics_fn=lambda o: {"accuracy": float((o["pred"] == o["gold"]).mean())},
                   output_dir=output_dir, seed=3)
    facts = {"steps": result.global_step, "batch": result.batch.to_dict(),
             "left": result.examples_left_per_epoch,
             "weights": {k: v.tolist() for k, v in result.model.state_dict().items()}}
    return facts, seen


def examples_per_step(seen_by_rank: list[list[list[int]]], accumulation: int) -> list[list[int]]:
    """Sorted example ids of each optimizer step, over every process."""
    steps = len(seen_by_rank[0]) // accumulation
    return [sorted(i for seen in seen_by_rank
                   for micro in seen[s * accumulation:(s + 1) * accumulation] for i in micro)
            for s in range(steps)]


# ------------------------------------------------------------------ the plan


@pytest.mark.parametrize("batch,processes,accumulation,micro", [
    (128, 1, 1, 128), (128, 8, 1, 16), (256, 8, 2, 16), (16, 4, 4, 1), (16, 1, 8, 2)])
def test_micro_batch_is_derived_from_the_global_batch(batch, processes, accumulation, micro):
    config = TrainingConfig(batch_size=batch, grad_accumulation=accumulation)
    plan = batch_plan(config, processes)
    assert (plan.global_batch, plan.micro_batch, plan.processes) == (batch, micro, processes)
    assert plan.eval_batch == 2 * micro


@pytest.mark.parametrize("batch,processes,accumulation,hint", [
    (4, 8, 1, "make it a multiple of 8"),
    (16, 8, 4, "or set grad_accumulation to one of [1, 2]"),
    (100, 3, 1, "make it a multiple of 3"),
])
def test_a_batch_that_does_not_divide_is_a_one_line_error(batch, processes, accumulation, hint):
    config = TrainingConfig(batch_size=batch, grad_accumulation=accumulation)
    with pytest.raises(ConfigError) as caught:
        batch_plan(config, processes, "finetune.typing.batch_size")
    message = str(caught.value)
    assert "\n" not in message and hint in message
    assert message.startswith(f"finetune.typing.batch_size {batch} ")
    assert f"{processes} process(es)" in message


def test_steps_hold_the_same_examples_on_any_number_of_processes():
    lengths = np.random.default_rng(0).integers(1, 60, size=1003)
    steps = step_batches(lengths, 64, seed=1, epoch=0)
    assert len(steps) == 1003 // 64 and all(len(s) == 64 for s in steps)
    for processes, accumulation in [(1, 1), (2, 1), (4, 2), (8, 8)]:
        plan = batch_plan(TrainingConfig(batch_size=64, grad_accumulation=accumulation), processes)
        for examples in steps:
            parts = [m for rank in range(processes) for m in plan.micro_batches(examples, rank)]
            assert all(len(m) == plan.micro_batch for m in parts)
            assert sorted(np.concatenate(parts).tolist()) == sorted(examples.tolist())


def test_step_count_follows_the_global_batch(tmp_path):
    one, _ = run_toy(tmp_path / "one", grad_accumulation=1)
    four, seen = run_toy(tmp_path / "four", grad_accumulation=4)
    assert one["steps"] == four["steps"] == 2 * (52 // 8)  # 6 steps an epoch, 4 examples left
    assert one["left"] == 4 and four["batch"]["micro_batch"] == 2
    assert all(len(micro) == 2 for micro in seen)


def test_two_processes_take_the_same_steps_over_the_same_examples(tmp_path, repo_root):
    """torchrun, 2 CPU processes (gloo), micro-batches of 4 vs 1 process with one of 8."""
    single, seen_single = run_toy(tmp_path / "single")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(Path(__file__).resolve()), str(tmp_path / "ddp")],
        capture_output=True, text=True, cwd=repo_root, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ddp" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    double = ranks[0]["facts"]
    assert double["batch"] == {"global_batch": 8, "micro_batch": 4, "processes": 2,
                               "grad_accumulation": 1, "eval_batch": 8}
    assert double["steps"] == single["steps"] == 12
    assert examples_per_step([r["seen"] for r in ranks], 1) == examples_per_step([seen_single], 1)
    assert all(len(micro) == 4 for r in ranks for micro in r["seen"])
    # the same gradients (a mean of two halves' means), so the same weights up to rounding
    for name, value in single["weights"].items():
        np.testing.assert_allclose(double["weights"][name], value, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the paper preset


def test_paper_preset_holds_global_totals_that_fit_one_40gb_gpu():
    from kadapter.config import load_config

    config = load_config("configs/paper.yaml")
    assert (config.pretrain_fac.batch_size, config.pretrain_lin.batch_size) == (128, 256)
    assert config.pretrain_fac.eval_subset == config.pretrain_lin.eval_subset == 20_000
    # examples per optimizer step = the original's; sequences per micro-batch on one GPU
    # at most 16 x 256 tokens of roberta-large (CosmosQA: 4 sequences per question)
    sequences = {"figer": 1, "cosmosqa": 4}
    for task, effective in (("figer", 16), ("cosmosqa", 16)):
        settings = getattr(config.finetune, task)
        plan = batch_plan(settings, processes=1)
        assert plan.global_batch == effective
        assert plan.micro_batch * sequences[task] * settings.max_length <= 16 * 256, task

def worker(output: Path) -> None:
    facts, seen = run_toy(output / "run")
    rank = int(os.environ["RANK"])
    (output / f"rank-{rank}.json").write_text(json.dumps({"facts": facts, "seen": seen}))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
