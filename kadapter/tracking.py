"""Experiment trackers of a training run, through Accelerate's tracker classes.

``trackers: [tensorboard]`` (the default) writes ``<run dir>/tensorboard/``; ``wandb`` and
``mlflow`` log to Weights & Biases / MLflow when the package is installed (their own
settings, e.g. ``WANDB_PROJECT`` or ``MLFLOW_TRACKING_URI``, apply as usual). Every
tracker gets the run's hyperparameters once at the start and the loop's train and dev
records at their steps. Only the main process creates trackers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
PROJECT = "kadapter"  # W&B project / MLflow experiment when the environment sets none


def check_trackers(names: list[str]) -> None:
    """A clear error for an unknown tracker or one whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"trackers: unknown tracker {name!r}; known: {list(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"trackers: {name} is not installed (pip install {name}), "
                             f"or leave it out of trackers")


def flat_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> ``{"a.b": scalar}``; lists and other values as text (what
    TensorBoard's and MLflow's hyperparameter tables accept)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "null" if value is None else value
        else:
            flat[name] = str(value)
    return flat


class RunTrackers:
    """The trackers of one run: ``log(values, step)`` to all, ``finish()`` at the end."""

    def __init__(self, names: list[str], output_dir: Path, run_name: str,
                 hparams: dict[str, Any], purge_step: int | None = None):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        check_trackers(names)
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", str(output_dir), purge_step=purge_step)
            elif name == "wandb":
                tracker = WandBTracker(PROJECT, name=run_name, dir=str(output_dir))
            else:
                tracker = MLflowTracker(PROJECT, run_name=run_name)
            tracker.start()
            tracker.store_init_configuration(flat_hparams(hparams))
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
