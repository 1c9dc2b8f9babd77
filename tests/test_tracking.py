"""Trackers through Accelerate: TensorBoard by default with the hyperparameters; clear
errors for unknown or uninstalled trackers."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from kadapter.tracking import RunTrackers, check_trackers, flat_hparams
from kadapter.training import TrainingConfig


def test_tensorboard_gets_hyperparameters_and_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainingConfig(learning_rate=3e-3, max_steps=5)
    assert config.trackers == ["tensorboard"]
    trackers = RunTrackers(config.trackers, tmp_path, "fac", {"training": vars(config), "seed": 3})
    trackers.log({"train/loss": 1.5}, step=1)
    trackers.log({"train/loss": 1.25}, step=2)
    trackers.finish()
    (hparams,) = (tmp_path / "tensorboard").glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored["training.learning_rate"] == 3e-3 and stored["seed"] == 3
    assert stored["training.trackers"] == "['tensorboard']"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [1.5, 1.25]


def test_flat_hparams():
    assert flat_hparams({"a": {"b": 1, "c": None}, "d": [1, 2]}) == {"a.b": 1, "a.c": "null",
                                                                   "d": "[1, 2]"}


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_optional_trackers_need_their_package(name):
    if importlib.util.find_spec(name) is not None:
        check_trackers([name])  # installed here: accepted
        return
    with pytest.raises(ValueError, match=rf"trackers: {name} is not installed \(pip install {name}\)"):
        check_trackers([name])


def test_unknown_tracker():
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
