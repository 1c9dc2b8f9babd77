"""Convert the original K-Adapter release's checkpoints into adapter directories of ours.

The original (microsoft/K-Adapter, KADAPTER.md section 8) saves ``pytorch_model.bin``, a
pickled state dict of its adapter model (no RoBERTa), and ``training_args.bin``, a pickled
``argparse.Namespace`` (``adapter_list``, ``adapter_size``, ``adapter_skip_layers``, ...).
Both are read with ``torch.load(weights_only=True)``: plain tensors and containers only,
plus ``argparse.Namespace`` for the arguments, so nothing in either file is executed.

Key layout of the original, adapter layer ``i`` and transformer layer ``j`` inside it::

    adapter.{i}.down_project.{weight,bias}                        -> layers.{i}.down
    adapter.{i}.encoder.layer.{j}.attention.self.{query,key,value} -> layers.{i}.layers.{j}.qkv (concatenated q, k, v)
    adapter.{i}.encoder.layer.{j}.attention.output.dense          -> ...attn_out
    adapter.{i}.encoder.layer.{j}.attention.output.LayerNorm      -> ...attn_norm
    adapter.{i}.encoder.layer.{j}.intermediate.dense              -> ...ffn_in
    adapter.{i}.encoder.layer.{j}.output.dense                    -> ...ffn_out
    adapter.{i}.encoder.layer.{j}.output.LayerNorm                -> ...ffn_norm
    adapter.{i}.up_project.{weight,bias}                          -> layers.{i}.up

The original's adapter layers are BERT layers (post-LayerNorm, erf GELU, eps 1e-5) with
``num_attention_heads`` fixed at 12 in its ``AdapterConfig``; each takes the encoder state
at its position plus the previous layer's output, as ours do with ``input_mode: sum``.

Factual head (``com_dense``, ``dense``, ``out_proj``): ``com_dense`` on
concat(encoder_last, adapter_out) becomes our combiner's per-adapter layer (with one
adapter it is the only combining layer, as in the original); ``dense`` and ``out_proj`` have no nonlinearity between them
(only dropout), so they fold exactly into our classifier, ``W = W_out W_dense``,
``b = W_out b_dense + b_out``; its rows are permuted from the original's 410 P-ids
(``kadapter/data/original_trex_relations.json``) to our sorted label order; pooling is
``marker`` (the original pools the ``@`` / ``#`` marker states). The linguistic head (an
absolute-position classifier) is a different design from ours: only the adapter is
converted, and ``adapter_config.json`` says so.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kadapter.io import file_fingerprint, read_json

WEIGHTS_FILE = "pytorch_model.bin"
ARGS_FILE = "training_args.bin"
ORIGINAL_REPOSITORY = "microsoft/K-Adapter"
ORIGINAL_HEADS = 12  # the original's AdapterConfig hard-codes num_attention_heads = 12
ORIGINAL_LAYER_NORM_EPS = 1e-5
ORIGINAL_DROPOUT = 0.1
DEFAULT_POSITIONS = [0, 11, 22]  # --adapter_list of the shipped run_pretrain_*.sh scripts
ORIGINAL_MAX_LENGTH = {"fac": 64, "lin": 64}  # --max_seq_length of the shipped scripts
# The original's only base model; its shape is known without reaching the Hub.
KNOWN_ENCODERS = {
    "roberta-large": {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24},
    "FacebookAI/roberta-large": {"model_type": "roberta", "hidden_size": 1024, "num_hidden_layers": 24},
}
RELATIONS_FILE = Path(__file__).parent / "data" / "original_trex_relations.json"
LINGUISTIC_NOTE = (
    "adapter only: the original's linguistic head (com_dense, 1-head self-attention, dense, "
    "out_proj over absolute positions) differs from ours (kadapter.pretrain.HeadPositionHead) "
    "and is not converted"
)

_TRANSFORMER_KEYS = {  # original sub-key -> ours, inside one transformer layer
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_QKV = ("query", "key", "value")


class ConversionError(ValueError):
    """An original checkpoint cannot be converted; the message names the file and the key."""


def original_relations() -> list[str]:
    """The original's 410 P-ids in its output-row order (``trex_relations``)."""
    return list(read_json(RELATIONS_FILE)["relations"])


# ------------------------------------------------------------------------------ reading


def locate(checkpoint: str | Path) -> tuple[Path, Path]:
    """A checkpoint directory or its ``pytorch_model.bin`` -> (weights, training args path)."""
    checkpoint = Path(checkpoint)
    weights = checkpoint / WEIGHTS_FILE if checkpoint.is_dir() else checkpoint
    if not weights.is_file():
        raise ConversionError(f"{weights}: not found (give the checkpoint directory or its {WEIGHTS_FILE})")
    return weights, weights.parent / ARGS_FILE


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an original ``pytorch_model.bin``; ``module.`` prefixes stripped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0][:300]
        raise ConversionError(f"{path}: refused: it holds more than tensors, and it is only read "
                              f"with weights_only=True ({reason})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is not a named tensor")
        tensors[key.removeprefix("module.")] = value
    return tensors


def read_training_args(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(arguments, how they were obtained): ``training_args.bin`` read with
    ``weights_only=True`` and ``argparse.Namespace`` as the one allowed global."""
    if not path.is_file():
        return None, f"{path} absent"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            args = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as err:
        return None, f"{path} unreadable ({str(err).strip().splitlines()[0][:200]})"
    if not isinstance(args, argparse.Namespace):
        return None, f"{path} unreadable (holds a {type(args).__name__}, not an argparse Namespace)"
    return vars(args), f"read from {path}"


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class OriginalLayout:
    hidden_size: int
    adapter_size: int
    ffn_size: int
    num_adapter_layers: int
    num_transformer_layers: int


def infer_layout(state: dict[str, torch.Tensor], path: Path) -> OriginalLayout:
    """Sizes and layer counts, read from the tensors themselves."""
    layers = sorted({int(k.split(".")[1]) for k in state
                     if k.startswith("adapter.") and k.split(".")[1].isdigit()})
    if not layers:
        raise ConversionError(f"{path}: missing tensor adapter.0.down_project.weight (no adapter.* keys)")
    if layers != list(range(len(layers))):
        raise ConversionError(f"{path}: adapter layer indices {layers} are not 0..{len(layers) - 1}")
    inner = sorted({int(k.split(".")[4]) for k in state
                    if k.startswith("adapter.0.encoder.layer.") and k.split(".")[4].isdigit()})
    for key in ("adapter.0.down_project.weight", "adapter.0.encoder.layer.0.intermediate.dense.weight"):
        if key not in state:
            raise ConversionError(f"{path}: missing tensor {key}")
        if state[key].dim() != 2:
            raise ConversionError(f"{path}: tensor {key} has shape {tuple(state[key].shape)}, expected 2 dims")
    adapter_size, hidden_size = state["adapter.0.down_project.weight"].shape
    ffn_size = state["adapter.0.encoder.layer.0.intermediate.dense.weight"].shape[0]
    return OriginalLayout(int(hidden_size), int(adapter_size), int(ffn_size), len(layers), len(inner))


def expected_shapes(task: str, layout: OriginalLayout, state: dict[str, torch.Tensor],
                    num_relations: int) -> dict[str, tuple[int, ...]]:
    """Every tensor an original checkpoint of ``task`` holds, with its shape."""
    h, a, f = layout.hidden_size, layout.adapter_size, layout.ffn_size

    def linear(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}

    def norm(name: str, size: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (size,), f"{name}.bias": (size,)}

    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layout.num_adapter_layers):
        shapes |= linear(f"adapter.{i}.down_project", a, h) | linear(f"adapter.{i}.up_project", h, a)
        for j in range(layout.num_transformer_layers):
            p = f"adapter.{i}.encoder.layer.{j}"
            for name in _QKV:
                shapes |= linear(f"{p}.attention.self.{name}", a, a)
            shapes |= linear(f"{p}.attention.output.dense", a, a) | norm(f"{p}.attention.output.LayerNorm", a)
            shapes |= linear(f"{p}.intermediate.dense", f, a) | linear(f"{p}.output.dense", a, f)
            shapes |= norm(f"{p}.output.LayerNorm", a)
    shapes |= linear("com_dense", h, 2 * h)
    if task == "fac":
        shapes |= linear("dense", h, 2 * h) | linear("out_proj", num_relations, h)
    else:
        for name in _QKV:
            shapes |= linear(f"self_attention.self.{name}", h, h)
        shapes |= linear("self_attention.output.dense", h, h) | norm("self_attention.output.LayerNorm", h)
        # one class per absolute position: as many as the original's --max_seq_length
        classes = state["out_proj.weight"].shape[0] if "out_proj.weight" in state else 0
        shapes |= linear("dense", h, h) | linear("out_proj", classes, h)
    return shapes


def check_tensors(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor, naming the file and the key."""
    missing = [k for k in shapes if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{path}: missing tensor {missing[0]}{more}")
    unexpected = sorted(k for k in state if k not in shapes)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{path}: unexpected tensor {unexpected[0]}{more}")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"expected {shape}")
        if not state[key].is_floating_point():
            raise ConversionError(f"{path}: tensor {key} has dtype {state[key].dtype}, expected floating point")


# ------------------------------------------------------------------------------ mapping


def adapter_state(state: dict[str, torch.Tensor], layout: OriginalLayout) -> dict[str, torch.Tensor]:
    """Original adapter tensors -> a ``KnowledgeAdapter`` state dict (fp32)."""
    out = {}
    for i in range(layout.num_adapter_layers):
        src, dst = f"adapter.{i}", f"layers.{i}"
        for suffix in ("weight", "bias"):
            out[f"{dst}.down.{suffix}"] = state[f"{src}.down_project.{suffix}"]
            out[f"{dst}.up.{suffix}"] = state[f"{src}.up_project.{suffix}"]
            for j in range(layout.num_transformer_layers):
                p, q = f"{src}.encoder.layer.{j}", f"{dst}.layers.{j}"
                out[f"{q}.qkv.{suffix}"] = torch.cat(
                    [state[f"{p}.attention.self.{name}.{suffix}"] for name in _QKV], dim=0)
                for theirs, ours in _TRANSFORMER_KEYS.items():
                    out[f"{q}.{ours}.{suffix}"] = state[f"{p}.{theirs}.{suffix}"]
    return {k: v.float().contiguous() for k, v in out.items()}


def factual_head_state(state: dict[str, torch.Tensor], original_order: list[str],
                       labels: list[str], adapter_name: str = "fac") -> dict[str, torch.Tensor]:
    """The original's com_dense / dense / out_proj -> a ``RelationHead`` state dict whose
    output rows follow ``labels``."""
    row = {pid: k for k, pid in enumerate(original_order)}
    permutation = torch.tensor([row[label] for label in labels])
    w_dense, b_dense = state["dense.weight"].double(), state["dense.bias"].double()
    w_out, b_out = state["out_proj.weight"].double(), state["out_proj.bias"].double()
    combiner = f"combiner.per_adapter.{adapter_name}"
    head = {
        f"{combiner}.weight": state["com_dense.weight"],
        f"{combiner}.bias": state["com_dense.bias"],
        "classifier.weight": (w_out @ w_dense)[permutation],
        "classifier.bias": (w_out @ b_dense + b_out)[permutation],
    }
    return {k: v.float().contiguous() for k, v in head.items()}


def encoder_shape(base_model: str) -> dict[str, Any]:
    """model_type, hidden_size, num_hidden_layers of the base encoder."""
    if base_model in KNOWN_ENCODERS:
        return dict(KNOWN_ENCODERS[base_model])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_model)
    except (OSError, ValueError) as err:
        raise ConversionError(f"base model {base_model!r}: cannot read its config ({str(err).splitlines()[0][:200]}); "
                              "give a local model directory, or download it first "
                              f"(`hf download {base_model} config.json --local-dir DIR`)") from None
    return {"model_type": config.model_type, "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers}


# ------------------------------------------------------------------------------ the run


def convert_checkpoint(checkpoint: str | Path, task: str, output_dir: str | Path, *,
                       positions: list[int] | None = None, base_model: str = "roberta-large",
                       log: Callable[[str], None] = print) -> Path:
    """Convert an original ``fac`` or ``lin`` checkpoint into ``output_dir`` (an adapter
    directory ``kadapter.modeling.load_adapter`` loads). Everything is checked before
    anything is written; on any failure nothing is written."""
    from kadapter.modeling import AdapterConfig, KnowledgeAdapter, save_adapter
    from kadapter.pretrain import build_head

    if task not in ("fac", "lin"):
        raise ConversionError(f"task must be fac or lin, got {task!r}")
    weights, args_path = locate(checkpoint)
    state = read_state_dict(weights)
    args, args_source = read_training_args(args_path)

    # ---- positions and skip connections: the training arguments, else --positions, else default
    if args is not None and _int_list(args.get("adapter_list")) is not None:
        chosen, source = _int_list(args["adapter_list"]), f"adapter_list {args_source}"
        if positions is not None and list(positions) != chosen:
            raise ConversionError(f"{args_path}: adapter_list {chosen} contradicts --positions "
                                  f"{list(positions)}; drop --positions or fix the file")
    elif positions is not None:
        chosen, source = list(positions), f"--positions (training arguments: {args_source})"
    else:
        chosen = list(DEFAULT_POSITIONS)
        source = f"the shipped default (training arguments: {args_source}; no --positions)"
    log(f"positions {','.join(map(str, chosen))}: {source}")
    skip = (args or {}).get("adapter_skip_layers", 0)
    if isinstance(skip, int) and skip >= 1:
        raise ConversionError(f"{args_path}: adapter_skip_layers {skip} >= 1: the original then adds "
                              "skip connections between adapter layers, which this model does not have")

    # ---- every tensor present, expected and of the right shape
    relations = original_relations()
    layout = infer_layout(state, weights)
    check_tensors(state, expected_shapes(task, layout, state, len(relations)), weights)
    if len(chosen) != layout.num_adapter_layers:
        raise ConversionError(f"{weights}: {layout.num_adapter_layers} adapter layers, but "
                              f"{len(chosen)} positions {chosen} ({source})")
    for key, have in (("adapter_size", layout.adapter_size),
                      ("adapter_transformer_layers", layout.num_transformer_layers)):
        if args is not None and isinstance(args.get(key), int) and args[key] != have:
            raise ConversionError(f"{args_path}: {key} {args[key]} but the weights have {have}")
    if layout.adapter_size % ORIGINAL_HEADS:
        raise ConversionError(f"{weights}: adapter size {layout.adapter_size} is not divisible by the "
                              f"original's {ORIGINAL_HEADS} attention heads")
    encoder = encoder_shape(base_model)
    if encoder["hidden_size"] != layout.hidden_size:
        raise ConversionError(f"{weights}: adapter.0.down_project.weight reads {layout.hidden_size}-wide "
                              f"states, base model {base_model!r} is {encoder['hidden_size']} wide")

    # ---- our adapter (and head), loaded strictly: every tensor is used
    config = AdapterConfig(positions=chosen, adapter_size=layout.adapter_size,
                           num_transformer_layers=layout.num_transformer_layers,
                           num_heads=ORIGINAL_HEADS, intermediate_size=layout.ffn_size,
                           input_mode="sum", dropout=ORIGINAL_DROPOUT,
                           layer_norm_eps=ORIGINAL_LAYER_NORM_EPS)
    try:
        adapter = KnowledgeAdapter(config, layout.hidden_size, encoder["num_hidden_layers"])
    except ValueError as err:
        raise ConversionError(f"{weights}: {err}") from None
    adapter.load_state_dict(adapter_state(state, layout), strict=True)
    task_info: dict[str, Any] = {"name": task, "max_length": ORIGINAL_MAX_LENGTH[task],
                                 "dev_metrics": None}
    head_state = None
    if task == "fac":
        labels = sorted(relations)
        settings = {"class": "RelationHead", "hidden_size": layout.hidden_size,
                    "num_labels": len(labels), "pooling": "marker", "dropout": ORIGINAL_DROPOUT,
                    "adapter_name": "fac"}
        head_state = factual_head_state(state, relations, labels)
        build_head(settings).load_state_dict(head_state, strict=True)
        task_info.update(labels=labels, head=settings, combiner="concat")
    else:
        task_info.update(labels=None, head=None, note=LINGUISTIC_NOTE)
    source_info = {
        "repository": ORIGINAL_REPOSITORY,
        "file": str(weights),
        "sha256": file_fingerprint(weights)["sha256"],
        "training_args": args_source,
        "positions_from": source,
        "original_label_order": str(RELATIONS_FILE.name) if task == "fac" else None,
    }
    out = save_adapter(output_dir, adapter, base_model=base_model,
                       encoder_config=SimpleNamespace(**encoder), task=task_info,
                       head_state=head_state, extra={"converted_from": source_info})
    log(f"{task} adapter converted from {weights} -> {out}")
    return out
