"""Building blocks shared by the test modules: fine-tuning workspaces, toy training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kadapter.modeling import AdapterConfig, KnowledgeAdapter, save_adapter
from kadapter.tasks import TASKS
from kadapter.training import FeatureTable


def copy_sample_splits(root: Path, repo_root: Path, sample_dirs: dict[str, str],
                       sizes: tuple[int, int, int]) -> None:
    """The first ``sizes`` (train, dev, test) records of each task's sample files, copied
    to ``root/data/<directory>/``."""
    for task, directory in sample_dirs.items():
        for name, size in zip(TASKS[task].files, sizes):
            source = repo_root / "data/sample" / directory / name
            target = root / "data" / directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".jsonl"):
                target.write_text("".join(source.read_text().splitlines(keepends=True)[:size]))
            else:
                target.write_text(json.dumps(json.loads(source.read_text())[:size]))


def save_random_adapters(root: Path, encoder_config) -> None:
    """Two small seeded random adapters, ``root/fac-adapter`` and ``root/lin-adapter``."""
    shape = AdapterConfig(positions=[0, 11, 23], adapter_size=32, num_transformer_layers=1)
    for seed, name in enumerate(["fac", "lin"]):
        torch.manual_seed(seed)
        adapter = KnowledgeAdapter(shape, encoder_config.hidden_size, encoder_config.num_hidden_layers)
        save_adapter(root / f"{name}-adapter", adapter, base_model="tiny",
                     encoder_config=encoder_config, task={"name": name})


def toy_table(count: int, seed: int, vocab: int = 30, classes: int = 3) -> FeatureTable:
    """Rows with an ``id`` column, so a run can tell which examples each step held; the
    first token gives the label away (1 + label), so a toy model can learn it."""
    rng = np.random.default_rng(seed)
    rows = []
    for row_id in range(count):
        ids = rng.integers(4, vocab, size=int(rng.integers(2, 12)))
        label = int(rng.integers(0, classes))
        ids[0] = 1 + label
        rows.append({"input_ids": ids.tolist(), "label": label, "id": row_id})
    return FeatureTable.from_rows(rows, ragged=["input_ids"])
