"""Serial bottleneck adapters (Houlsby et al., 2019, "Parameter-Efficient Transfer
Learning for NLP") inside a Hugging Face RoBERTa-style encoder.

Each encoder layer gets two adapters: one on the attention block's output projection
(``RobertaSelfOutput``) and one on the feed-forward block's (``RobertaOutput``), after
the projection and its dropout and before the residual add + LayerNorm, as in
Houlsby et al.'s Figure 2 and their adapter-bert code::

    h = dropout(dense(x));  h = h + up(act(down(h)));  LayerNorm(h + residual)

``down`` maps H -> bottleneck, ``up`` bottleneck -> H, with the adapter's own skip
connection. ``up`` starts at zero (weights and bias), so an inserted adapter adds exactly
0 and the adapted encoder reproduces the plain encoder bit for bit at initialisation
(Houlsby et al. start near the identity with a small init of both projections; exact
zero for ``up`` keeps that and makes it testable). ``down`` starts Normal(0, init_std).

The adapters are attached with forward hooks on the two ``dropout`` modules of every
layer, and registered on the encoder as its sub-module ``serial_adapters``: the
encoder's own parameter names (its checkpoint) stay as they are, and the adapters move
with it (``.to(device)``, ``accelerator.prepare``). An adapter computes in its own
weights' dtype (fp32 master weights; autocast lowers it when on) and returns in the
encoder's dtype, so a bf16 encoder takes fp32 adapters with or without autocast.

Shapes at the paper's size (roberta-large, H = 1024, 24 layers): one adapter has
2 * H * m + H + m parameters, 48 of them (bottleneck m = 64) ~6.3M; K-Adapter's
knowledge adapter is ~47.3M (kadapter.modeling).

Files (``save_serial_adapter`` / ``load_serial_adapter``): the directory layout of a
K-Adapter (``adapter_config.json`` + ``adapter.safetensors``, ``adapter.*`` and
``head.*`` tensors, a model card) with ``"kind": "serial"`` and the adapter's shape
under ``"serial"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kadapter.io import read_json

KIND = "serial"
SUBMODULE = "serial_adapters"
VARIANTS = ("serial-fac", "serial-lin")
"""The fine-tuning variants (kadapter.finetune.VARIANTS keys) that load a serial adapter."""


@dataclass
class SerialAdapterConfig:
    """Section ``serial_adapter``: the serial (Houlsby) adapters' shape and where their
    pretraining runs write (``python -m pipelines.pretrain --task fac --kind serial``).
    The pretraining schedule, data, features and heads are ``pretrain_fac`` /
    ``pretrain_lin``'s, the same as K-Adapter's, so the two compare on equal terms."""

    bottleneck_size: int = 64
    """Hidden size inside each adapter (down-projection target); Houlsby et al. swept
    {8, 64, 256}."""
    activation: Literal["gelu", "relu"] = "gelu"
    """Nonlinearity between the down- and up-projection (adapter-bert uses GELU)."""
    init_std: float = 1e-2
    """Std of the Normal init of the down-projection (Houlsby et al.: std 1e-2); the
    up-projection starts at zero so the adapted encoder starts as the encoder."""
    learning_rate: float | None = None
    """Learning rate of serial pretraining; None = the K-Adapter section's (pretrain_fac
    / pretrain_lin), the same schedule for both kinds."""
    epochs: int | None = None
    """Epochs of serial pretraining; None = the K-Adapter section's. (Serial adapters
    back-propagate through the whole encoder: a step costs more than a K-Adapter's.)"""
    fac_output_dir: str = "runs/{preset}/serial-fac-adapter"
    """Run directory of the serial adapter pretrained on the factual task."""
    lin_output_dir: str = "runs/{preset}/serial-lin-adapter"
    """Run directory of the serial adapter pretrained on the linguistic task."""

    def __post_init__(self) -> None:
        if self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be positive, got {self.bottleneck_size}")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")

    def schedule(self) -> dict[str, Any]:
        """The pretraining section's fields this section replaces (those it sets)."""
        return {k: v for k, v in (("learning_rate", self.learning_rate), ("epochs", self.epochs))
                if v is not None}

    def output_dir(self, task: str) -> Path:
        return Path(self.fac_output_dir if task == "fac" else self.lin_output_dir)


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(h))); ``up`` zero-initialised (an exact identity at start)."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str = "gelu",
                 init_std: float = 1e-2):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.activation = {"gelu": F.gelu, "relu": F.relu}[activation]
        nn.init.normal_(self.down.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        inner = self.activation(self.down(hidden.to(self.down.weight.dtype)))
        return hidden + self.up(inner).to(hidden.dtype)  # the skip in the encoder's dtype

    def hook(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on a sub-layer's output dropout: its output through the adapter."""
        return self(output)


class SerialLayerAdapters(nn.Module):
    """The two adapters of one encoder layer."""

    def __init__(self, config: SerialAdapterConfig, hidden_size: int):
        super().__init__()
        args = (hidden_size, config.bottleneck_size, config.activation, config.init_std)
        self.attention = BottleneckAdapter(*args)
        self.output = BottleneckAdapter(*args)


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT/RoBERTa-style Hugging Face model
    (``encoder.encoder.layer``), or a clear error for another structure."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(encoder).__name__} has no encoder.layer list: serial adapters "
                         "need a BERT/RoBERTa-style encoder")
    return layers


def _output_dropouts(layer: nn.Module, index: int) -> tuple[nn.Dropout, nn.Dropout]:
    """The dropout after the attention output projection (``attention.output``, a
    RobertaSelfOutput) and after the feed-forward output projection (``output``, a
    RobertaOutput): the adapters' places."""
    found = []
    for path in ("attention.output", "output"):
        module = layer.get_submodule(path) if _has(layer, path) else None
        dropout = getattr(module, "dropout", None)
        if not (isinstance(dropout, nn.Dropout) and hasattr(module, "dense")
                and hasattr(module, "LayerNorm")):
            raise ValueError(f"encoder layer {index} ({type(layer).__name__}) has no {path} block "
                             "with dense -> dropout -> LayerNorm: serial adapters need a "
                             "BERT/RoBERTa-style layer")
        found.append(dropout)
    return found[0], found[1]


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class SerialAdapters(nn.Module):
    """Two bottleneck adapters per encoder layer; ``attach`` inserts them into an encoder."""

    def __init__(self, config: SerialAdapterConfig, hidden_size: int, num_layers: int):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.layers = nn.ModuleList(SerialLayerAdapters(config, hidden_size)
                                    for _ in range(num_layers))
        self._handles: list[Any] = []

    def attach(self, encoder: nn.Module) -> nn.Module:
        """Insert the adapters into ``encoder`` (hooks, and the sub-module
        ``serial_adapters``); returns the encoder. Refuses an encoder of another shape
        or one that already holds serial adapters."""
        layers = encoder_layers(encoder)
        hidden = encoder.config.hidden_size
        if (hidden, len(layers)) != (self.hidden_size, self.num_layers):
            raise ValueError(f"serial adapters built for hidden size {self.hidden_size} and "
                             f"{self.num_layers} layers; the encoder has {hidden} and {len(layers)}")
        if hasattr(encoder, SUBMODULE):
            raise ValueError("the encoder already holds serial adapters")
        places = [_output_dropouts(layer, i) for i, layer in enumerate(layers)]
        for (attention, output), adapters in zip(places, self.layers):
            self._handles.append(attention.register_forward_hook(adapters.attention.hook))
            self._handles.append(output.register_forward_hook(adapters.output.hook))
        encoder.add_module(SUBMODULE, self)
        return encoder

    def detach(self, encoder: nn.Module) -> nn.Module:
        """Remove the adapters from ``encoder``: it computes as before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(encoder, SUBMODULE, None) is self:
            delattr(encoder, SUBMODULE)
        return encoder


def attached(encoder: nn.Module) -> SerialAdapters | None:
    """The serial adapters inserted into ``encoder``, if any."""
    return getattr(encoder, SUBMODULE, None)


def insert_serial_adapters(encoder: nn.Module, config: SerialAdapterConfig) -> SerialAdapters:
    """Fresh adapters (fp32) inserted into ``encoder``; returns them."""
    adapters = SerialAdapters(config, encoder.config.hidden_size, len(encoder_layers(encoder)))
    adapters.to(next(encoder.parameters()).device)
    adapters.attach(encoder)
    return adapters


def serial_parameters(config: SerialAdapterConfig, hidden_size: int, num_layers: int) -> int:
    """Parameters of the serial adapters of an encoder (two per layer)."""
    m = config.bottleneck_size
    return num_layers * 2 * (2 * hidden_size * m + hidden_size + m)


# ------------------------------------------------------------------------ the files


def save_serial_adapter(directory: str | Path, adapters: SerialAdapters, *, base_model: str,
                        encoder_config: Any, task: dict[str, Any],
                        head_state: dict[str, torch.Tensor] | None = None,
                        base_model_revision: str | None = None) -> Path:
    """Write a serial adapter directory (the K-Adapter layout with ``kind: serial``):
    ``adapter_config.json``, ``adapter.safetensors`` (``adapter.*`` and ``head.*``) and a
    model card. Replaced atomically."""
    from kadapter.modeling import write_adapter_dir

    return write_adapter_dir(
        directory, adapters,
        {"kind": KIND,
         "placement": "Houlsby et al. 2019: after the attention and the feed-forward output "
                      "projections (and their dropout) of every layer, before residual + LayerNorm",
         "serial": dataclasses.asdict(adapters.config)},
        base_model=base_model, encoder_config=encoder_config, task=task, head_state=head_state,
        base_model_revision=base_model_revision,
        card_title=f"Serial (Houlsby) {task.get('name', '?')} adapter",
        card_load_snippet="from kadapter.serial import load_serial_adapter\n"
                          "loaded = load_serial_adapter('DIR', encoder)  # inserted into the encoder")


@dataclass
class LoadedSerialAdapter:
    adapters: SerialAdapters
    head_state: dict[str, torch.Tensor]
    config: dict[str, Any]


def is_serial_adapter_dir(directory: str | Path) -> bool:
    from kadapter.modeling import ADAPTER_CONFIG_FILE

    path = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        config = read_json(path) if path.is_file() else None
    except ValueError:
        return False
    return isinstance(config, dict) and config.get("kind") == KIND


def load_serial_adapter(directory: str | Path, encoder: nn.Module,
                        revision: str | None = None) -> LoadedSerialAdapter:
    """Read a serial adapter directory (or Hub id) and insert it into ``encoder`` (the
    adapters keep their saved dtype, fp32, on the encoder's device). A missing or corrupt
    file, another kind of adapter or an encoder of another shape is an AdapterLoadError."""
    from kadapter.hub import resolve_adapter
    from kadapter.modeling import (
        ADAPTER_CONFIG_FILE,
        AdapterLoadError,
        build_section,
        check_fits_encoder,
        read_adapter_config,
        read_adapter_weights,
        section_errors,
    )

    directory = resolve_adapter(directory, revision)
    config = read_adapter_config(directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if config.get("kind") != KIND:
        raise AdapterLoadError(f"{directory}: a K-Adapter, not a serial adapter (load it with "
                               "kadapter.modeling.load_adapter)")
    hidden_size, layers = encoder.config.hidden_size, len(encoder_layers(encoder))
    check_fits_encoder(directory, config, {"hidden_size": hidden_size, "num_hidden_layers": layers},
                       what="serial adapter")
    with section_errors(config_path, "serial"):
        shape = build_section(SerialAdapterConfig, config, "serial", config_path)
    weights_path, adapter_state, head_state = read_adapter_weights(directory)
    adapters = SerialAdapters(shape, hidden_size, layers)
    try:
        adapters.load_state_dict(adapter_state, strict=True)
    except RuntimeError as err:
        raise AdapterLoadError(f"{weights_path}: weights do not match the adapter config: "
                               f"{str(err).splitlines()[0]}") from None
    try:
        adapters.attach(encoder)
    except ValueError as err:
        raise AdapterLoadError(f"{directory}: {err}") from None
    adapters.to(next(encoder.parameters()).device)
    return LoadedSerialAdapter(adapters, head_state, config)


__all__ = [
    "BottleneckAdapter",
    "LoadedSerialAdapter",
    "SerialAdapterConfig",
    "SerialAdapters",
    "VARIANTS",
    "attached",
    "insert_serial_adapters",
    "is_serial_adapter_dir",
    "load_serial_adapter",
    "save_serial_adapter",
    "serial_parameters",
]
