"""Resumable training state without pickle: tensors in safetensors, everything else JSON.

Accelerate's ``save_state``/``load_state`` write the optimizer, the RNG states and custom
objects (``register_for_checkpointing``) with ``torch.save`` and read custom objects back
with ``torch.load(weights_only=False)``: a tampered checkpoint runs code on resume, and a
bad RNG file is silently skipped. The training loop uses these two functions instead, and
nothing on the resume path unpickles anything; a checkpoint holding a pickle is refused.

A checkpoint directory holds (``<rank>`` = process index):

- ``model.safetensors``: the trainable parameters of the (unwrapped) module only; frozen
  modules inside it (fine-tuning's adapters, a frozen encoder) are loaded from their own
  files at every start;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors
  (``state.<param>.<name>``) and its plain values (param groups, non-tensor state);
- ``scheduler.json``: the learning-rate schedule's ``state_dict`` (plain numbers);
- ``scaler.json``: the fp16 loss scaler's state, when there is one;
- ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: torch (CPU, CUDA), numpy and Python
  random states of each process.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kadapter.io import InputError, atomic_write_json, read_json

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_VALUES = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "scaler.json"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")


def _rng_files(directory: Path, rank: int) -> tuple[Path, Path]:
    return directory / f"rng-{rank}.safetensors", directory / f"rng-{rank}.json"


def save_training_state(directory: str | Path, accelerator: Any, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Write the resumable state; call on every process (each writes its RNG state)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_file(_trainable(accelerator.unwrap_model(model)), str(directory / MODEL_FILE))
        tensors, values = _optimizer_parts(optimizer.state_dict())
        save_file(tensors, str(directory / OPTIMIZER_TENSORS))
        atomic_write_json(directory / OPTIMIZER_VALUES, values)
        atomic_write_json(directory / SCHEDULER_FILE, _plain(scheduler.state_dict(), "scheduler"))
        if getattr(accelerator, "scaler", None) is not None:
            atomic_write_json(directory / SCALER_FILE, accelerator.scaler.state_dict())
    tensors, values = _rng_parts()
    tensor_file, value_file = _rng_files(directory, accelerator.process_index)
    save_file(tensors, str(tensor_file))
    atomic_write_json(value_file, values)


def load_training_state(directory: str | Path, accelerator: Any, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Restore what ``save_training_state`` wrote; every problem is an InputError naming
    the file (a pickle in the directory, a missing or corrupt file)."""
    directory = Path(directory)
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InputError(directory, None, f"holds {', '.join(pickles)}: pickled state is never "
                         "loaded (it can run code); this checkpoint is from an older version or "
                         "was tampered with: remove it to start afresh")
    unwrapped = accelerator.unwrap_model(model)
    _guarded(directory / MODEL_FILE, lambda path: _load_trainable(unwrapped, path))
    tensors = _guarded(directory / OPTIMIZER_TENSORS, _read_tensors)
    values = read_json(directory / OPTIMIZER_VALUES)
    _guarded(directory / OPTIMIZER_VALUES,
             lambda _: optimizer.load_state_dict(_optimizer_state(tensors, values)))
    schedule = read_json(directory / SCHEDULER_FILE)
    _guarded(directory / SCHEDULER_FILE, lambda _: scheduler.load_state_dict(schedule))
    if getattr(accelerator, "scaler", None) is not None:
        scale = read_json(directory / SCALER_FILE)
        _guarded(directory / SCALER_FILE, lambda _: accelerator.scaler.load_state_dict(scale))
    tensor_file, value_file = _rng_files(directory, accelerator.process_index)
    rng_tensors = _guarded(tensor_file, _read_tensors)
    rng_values = read_json(value_file)
    _guarded(value_file, lambda _: _set_rng(rng_tensors, rng_values))


def _guarded(path: Path, action):
    """``action(path)``; a missing file or one that does not fit is an InputError naming it."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise InputError(path, None, "missing from the checkpoint (incomplete or not kadapter's)")
    try:
        return action(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError,
            IndexError) as err:
        problem = " ".join(str(err).split())[:300]
        raise InputError(path, None, f"does not fit this run: {type(err).__name__}: {problem}") from None


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu").contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def _load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Copy the saved trainable parameters into ``model``; the file must hold exactly its
    trainable parameters (a ValueError otherwise)."""
    saved = _read_tensors(path)
    names = {name for name, param in model.named_parameters() if param.requires_grad}
    if set(saved) != names:
        raise ValueError(f"holds {len(saved)} tensors, not the {len(names)} trainable weights "
                         f"of this model (e.g. {sorted(set(saved) ^ names)[:3]})")
    model.load_state_dict(saved, strict=False)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _plain(value: Any, what: str) -> Any:
    """``value`` as JSON data (tuples become lists); anything else is a TypeError."""
    if isinstance(value, dict):
        return {str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{what} state holds a {type(value).__name__}, not plain data")


def _optimizer_parts(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = _plain(value, "optimizer")
    groups = [_plain(group, "optimizer") for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = tensor
    for param, entries in values["scalars"].items():
        state.setdefault(int(param), {}).update(entries)
    # JSON has no tuples: give back the tuples AdamW's param groups hold (betas)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
               for k, v in group.items()} for group in values["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_parts() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(),
               "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    version, python_state, gauss = random.getstate()
    values = {"numpy": {"kind": kind, "position": int(position), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)},
              "python": {"version": version, "state": list(python_state), "gauss": gauss}}
    return tensors, values


def _set_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    numpy = values["numpy"]
    np.random.set_state((numpy["kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = values["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


__all__ = ["load_training_state", "save_training_state"]
