"""Saved files get ordinary permissions (0644 under umask 022): safetensors, tempfile and
Accelerate create theirs 0600."""

from __future__ import annotations

import os
import stat

import torch

from kadapter.io import atomic_save_safetensors
from tests.test_training import run


def ordinary_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_safetensors_written_through_io_are_readable(tmp_path):
    atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == ordinary_mode()
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp left


def test_training_checkpoints_and_best_weights_are_readable(tmp_path):
    run(tmp_path, select_metric="accuracy", epochs=1)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" and "checkpoints" in p.parts for p in written)
    assert any(p.parent.name == "best" for p in written)
    wrong = [str(p) for p in written if stat.S_IMODE(p.stat().st_mode) != ordinary_mode()]
    assert not wrong
