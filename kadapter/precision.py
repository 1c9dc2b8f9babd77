"""Which mixed precision a training run uses, and who decided it.

Every training section (``pretrain_fac``, ``pretrain_lin``, ``finetune`` and its task
sections, ``lama.mlm_head``) has ``bf16: auto | true | false``:

- ``true``: bf16 autocast on any device, CPU included;
- ``false``: no autocast (fp32 compute; a frozen encoder keeps ``model.encoder_dtype``);
- ``auto`` (the default): Accelerate's own setting when it names one, that is
  ``ACCELERATE_MIXED_PRECISION=bf16|fp16`` (what ``accelerate launch`` exports from
  ``accelerate config``'s file, ``--config_file`` or ``--mixed_precision``); otherwise bf16
  on a CUDA GPU with native bf16, fp16 with dynamic loss scaling on an older CUDA GPU
  (V100, T4), and none on CPU. Accelerate's ``no`` does not turn bf16 off under ``auto``:
  a bare ``accelerate launch`` passes ``no`` when nothing is configured, so it cannot be
  told from a choice; write ``bf16: false`` for fp32.

fp16 is therefore chosen by the machine (its GPU, or its Accelerate configuration), not
by the preset: the same preset runs bf16 on an H100 and loss-scaled fp16 on a V100.
Accelerate does the loss scaling (``accelerator.backward``, ``clip_grad_norm_``, and the
prepared optimizer, which skips a step whose gradients overflowed). fp16 needs CUDA.

Trainable modules keep fp32 master weights in every mode; the decision and its reason go
into each stage's ``manifest.json`` (``precision``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from kadapter.config import ConfigError

ENV = "ACCELERATE_MIXED_PRECISION"
ACCELERATE_CHOICES = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    mixed_precision: str
    """What Accelerate runs: ``no``, ``bf16`` or ``fp16``."""
    decided_by: str
    """Why: the config value, Accelerate's setting, or the device under ``auto``."""
    accelerate_setting: str | None = None
    """ACCELERATE_MIXED_PRECISION as this run saw it (None = unset), whichever won."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_bf16(value: Any) -> None:
    """``bf16`` must be true, false or "auto" (1 and "yes" are not booleans here)."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ValueError(f"bf16 must be auto, true or false, got {value!r}")


def resolve_precision(bf16: bool | str, *, device_type: str, bf16_native: bool = True,
                      environ: Mapping[str, str] | None = None) -> Precision:
    """The mixed precision for a config's ``bf16`` on ``device_type`` (see the module doc).

    ``bf16_native``: whether the CUDA device computes bf16 natively (Ampere and later);
    ``environ``: where Accelerate's setting is read (default ``os.environ``).
    """
    check_bf16(bf16)
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV)
    if bf16 is True:
        return Precision("bf16", "config: bf16: true", raw)
    if bf16 is False:
        return Precision("no", "config: bf16: false", raw)
    accelerate = (raw or "").strip().lower()
    if accelerate not in ("", *ACCELERATE_CHOICES):
        raise ConfigError(f"{ENV}={raw!r} is not one of {list(ACCELERATE_CHOICES)} (kadapter does "
                         "not run fp8); change it, or set bf16: true/false in the config")
    if accelerate in ("bf16", "fp16"):
        if accelerate == "fp16" and device_type != "cuda":
            raise ConfigError(f"{ENV}=fp16 (Accelerate's setting) needs a CUDA GPU, this run is "
                             f"on {device_type}; unset it or set bf16: true/false in the config")
        return Precision(accelerate, f"Accelerate's setting: {ENV}={accelerate} (bf16: auto)", raw)
    ignored = f"; {ENV}=no ignored under auto (set bf16: false for fp32)" if accelerate else ""
    if device_type != "cuda":
        return Precision("no", f"bf16: auto, no CUDA device{ignored}", raw)
    if bf16_native:
        return Precision("bf16", f"bf16: auto, CUDA GPU with native bf16{ignored}", raw)
    return Precision("fp16", f"bf16: auto, CUDA GPU without native bf16: fp16 with loss "
                             f"scaling{ignored}", raw)


def cuda_bf16_native() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def precision_for(bf16: bool | str, device_type: str | None = None) -> Precision:
    """``resolve_precision`` for this machine (CUDA when available, else CPU)."""
    import torch

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_precision(bf16, device_type=device_type,
                             bf16_native=device_type == "cuda" and cuda_bf16_native())


__all__ = ["ENV", "Precision", "check_bf16", "precision_for", "resolve_precision"]
