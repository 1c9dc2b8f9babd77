"""K-Adapter model: knowledge adapters beside a frozen Hugging Face encoder.

Shapes at the paper's size (RoBERTa-large): encoder hidden H = 1024, 24 layers;
one adapter = 3 adapter layers at hidden-state positions 0, 11, 23, each
down-projection 1024 -> 768, two transformer layers (768 wide, 12 heads, FFN 3072),
up-projection 768 -> 1024: ~15.75M parameters a layer, ~47.3M an adapter.

Positions index the encoder's ``hidden_states`` tuple: 0 is the embedding output,
k the output of encoder layer k (so 23 is the last-but-one layer's output for a
24-layer encoder, and 24 would be the last).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.utils import ModelOutput

from kadapter.io import atomic_output_dir, atomic_save_safetensors, atomic_write_json, read_json

POSITION_CONVENTION = (
    "positions index the encoder's hidden_states tuple: 0 = embedding output, "
    "k = output of encoder layer k"
)
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    """Which encoder to load and how to run it."""

    name_or_path: str = "tiny"
    """Encoder: a Hugging Face hub name (``roberta-large``), a local model directory, or
    ``tiny`` for the offline 24-layer tiny RoBERTa built from the sample text."""
    tiny_dir: str = "data/models/tiny-roberta"
    """Where the tiny model is built on first use (only used when name_or_path is ``tiny``)."""
    tiny_corpus: str = "data/sample"
    """Directory whose .txt/.json/.jsonl files train the tiny model's BPE tokenizer."""
    encoder_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen encoder's weights (pretraining, LAMA; fine-tuning trains the
    encoder in fp32): ``auto`` = bfloat16 on CUDA (float16 when the run's mixed precision
    is fp16), float32 on CPU. Trainable modules stay float32 whatever this is."""


@dataclass
class AdapterConfig:
    """Shape of one knowledge adapter (see KADAPTER.md section 2)."""

    positions: list[int] = field(default_factory=lambda: [0, 11, 23])
    """Encoder hidden-state positions the adapter layers sit beside (0 = embeddings,
    k = output of encoder layer k)."""
    adapter_size: int = 768
    """Hidden size inside each adapter layer (down-projection target)."""
    num_transformer_layers: int = 2
    """Transformer layers inside each adapter layer."""
    num_heads: int | None = None
    """Attention heads; default adapter_size // 64 (12 at 768), at least 1."""
    intermediate_size: int | None = None
    """Feed-forward size; default 4 * adapter_size."""
    input_mode: Literal["sum", "concat"] = "sum"
    """How adapter layer i combines the encoder state at its position with layer i-1's
    output: ``sum`` (the original code) or ``concat`` then a projection (the paper's
    wording; initialised to equal the sum)."""
    init_std: float = 2e-4
    """Std of the Normal init of the down/up projections (biases zero): a fresh adapter
    is close to the identity."""
    dropout: float = 0.1
    """Dropout inside the adapter's transformer layers."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon inside the adapter's transformer layers."""

    def __post_init__(self) -> None:
        if not self.positions:
            raise ValueError("positions must not be empty")
        if self.adapter_size <= 0 or self.num_transformer_layers < 0:
            raise ValueError("adapter_size must be positive, num_transformer_layers >= 0")
        if self.heads <= 0 or self.adapter_size % self.heads:
            raise ValueError(f"adapter_size {self.adapter_size} is not divisible by {self.heads} heads")

    @property
    def heads(self) -> int:
        return self.num_heads or max(1, self.adapter_size // 64)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.adapter_size


class ModelNotAvailable(FileNotFoundError):
    """The encoder named in the config is neither a local directory nor reachable."""


class AdapterLoadError(ValueError):
    """An adapter directory is missing, corrupt or does not fit the encoder."""


# --------------------------------------------------------------------------- layers


class AdapterTransformerLayer(nn.Module):
    """A BERT-style (post-LayerNorm, GELU) transformer layer using fused SDPA attention."""

    def __init__(self, size: int, heads: int, ffn_size: int, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(size, 3 * size)
        self.attn_out = nn.Linear(size, size)
        self.attn_norm = nn.LayerNorm(size, eps=eps)
        self.ffn_in = nn.Linear(size, ffn_size)
        self.ffn_out = nn.Linear(ffn_size, size)
        self.ffn_norm = nn.LayerNorm(size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, size); key_mask: (B, 1, 1, T) bool, True where a key is a real token."""
        batch, length, size = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout.p if self.training else 0.0
        )
        attn = attn.transpose(1, 2).reshape(batch, length, size)
        x = self.attn_norm(x + self.dropout(self.attn_out(attn)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class AdapterLayer(nn.Module):
    """down-projection -> N transformer layers -> up-projection, residual around it all."""

    def __init__(self, config: AdapterConfig, hidden_size: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, config.adapter_size)
        self.layers = nn.ModuleList(
            AdapterTransformerLayer(
                config.adapter_size, config.heads, config.ffn_size, config.dropout,
                config.layer_norm_eps,
            )
            for _ in range(config.num_transformer_layers)
        )
        self.up = nn.Linear(config.adapter_size, hidden_size)
        for proj in (self.down, self.up):
            nn.init.normal_(proj.weight, mean=0.0, std=config.init_std)
            nn.init.zeros_(proj.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        inner = self.down(x)
        for layer in self.layers:
            inner = layer(inner, key_mask)
        return x + self.up(inner)


class KnowledgeAdapter(nn.Module):
    """Adapter layers beside chosen encoder positions; returns (B, T, H) features."""

    def __init__(self, config: AdapterConfig, hidden_size: int, num_encoder_layers: int):
        super().__init__()
        bad = [p for p in config.positions if not 0 <= p <= num_encoder_layers]
        if bad:
            raise ValueError(
                f"adapter positions {bad} out of range for an encoder with "
                f"{num_encoder_layers} layers (valid 0..{num_encoder_layers}; {POSITION_CONVENTION})"
            )
        self.config = config
        self.hidden_size = hidden_size
        self.num_encoder_layers = num_encoder_layers
        self.layers = nn.ModuleList(AdapterLayer(config, hidden_size) for _ in config.positions)
        if config.input_mode == "concat":
            # concat(encoder state, previous output) -> hidden, initialised as [I, I] = the sum.
            self.fuse = nn.ModuleList(
                nn.Linear(2 * hidden_size, hidden_size) for _ in config.positions
            )
            with torch.no_grad():
                eye = torch.eye(hidden_size)
                for proj in self.fuse:
                    proj.weight.copy_(torch.cat([eye, eye], dim=1))
                    proj.bias.zero_()
        self.dropped_positions: frozenset[int] = frozenset()

    def drop_positions(self, positions: list[int] | tuple[int, ...] = ()) -> None:
        """AdapterDrop (Rücklé et al., 2021) at inference: skip the adapter layers at these
        positions; the next layer gets its encoder state + the last computed output (zeros
        if none), so an empty list is the full adapter."""
        bad = sorted(set(positions) - set(self.config.positions))
        if bad:
            raise ValueError(f"cannot drop adapter positions {bad}: this adapter's layers sit at "
                             f"{self.config.positions} ({POSITION_CONVENTION})")
        self.dropped_positions = frozenset(positions)

    def forward(
        self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
    ) -> torch.Tensor:
        dtype = self.layers[0].down.weight.dtype
        key_mask = attention_mask.bool()[:, None, None, :]
        previous = None
        for i, (position, layer) in enumerate(zip(self.config.positions, self.layers)):
            if position in self.dropped_positions:
                continue
            state = hidden_states[position].to(dtype)
            if previous is None:
                previous = torch.zeros_like(state)
            if self.config.input_mode == "sum":
                fused = state + previous
            else:
                fused = self.fuse[i](torch.cat([state, previous], dim=-1))
            previous = layer(fused, key_mask)
        if previous is None:  # every layer dropped: the adapter adds nothing
            previous = torch.zeros_like(hidden_states[-1], dtype=dtype)
        return previous


class Combiner(nn.Module):
    """Combine the encoder's last state with any subset of adapter outputs -> (B, T, H).

    ``concat``: per adapter dense(concat(encoder_last, adapter_out)), then, with two or
    more adapters, dense over the concatenation of those (``out``; KADAPTER.md section 2).
    With one adapter ``out`` is left out: the per-adapter layer is the only combining
    layer, as in the original's single-adapter scripts. ``add``: encoder_last + sum of
    adapter outputs. ``fusion``: AdapterFusion (Pfeiffer et al., 2021), see
    ``fusion_weights``. With no adapters every mode returns encoder_last unchanged (the
    "encoder alone" row).
    """

    def __init__(self, adapter_names: list[str], hidden_size: int,
                 mode: Literal["concat", "add", "fusion"] = "concat", fusion_dropout: float = 0.1):
        super().__init__()
        self.adapter_names = sorted(adapter_names)
        self.mode = mode
        if mode == "concat" and self.adapter_names:
            self.per_adapter = nn.ModuleDict(
                {n: nn.Linear(2 * hidden_size, hidden_size) for n in self.adapter_names}
            )
            if len(self.adapter_names) > 1:
                self.out = nn.Linear(len(self.adapter_names) * hidden_size, hidden_size)
        if mode == "fusion" and self.adapter_names:
            # As the adapters library's BertFusion (DynamicFusionConfig): query and key
            # N(0, 0.02) with zero bias, so the first softmax is near uniform; value without
            # bias, initialised to the identity (1e-6 off the diagonal); dropout on the scores.
            self.query = nn.Linear(hidden_size, hidden_size)
            self.key = nn.Linear(hidden_size, hidden_size)
            for proj in (self.query, self.key):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02)
                nn.init.zeros_(proj.bias)
            self.value = nn.Linear(hidden_size, hidden_size, bias=False)
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
            self.score_dropout = nn.Dropout(fusion_dropout)

    def fusion_candidates(self, encoder_last: torch.Tensor,
                          adapter_outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, 1 + nA, H): the encoder state, then encoder_last + each adapter's output
        (what that adapter's ``add`` model would pass on), in the fusion layers' dtype."""
        dtype = self.value.weight.dtype
        last = encoder_last.to(dtype)
        return torch.stack([last, *(last + adapter_outputs[n].to(dtype) for n in self.adapter_names)],
                           dim=-2)

    def fusion_weights(self, encoder_last: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(B, T, 1 + nA) softmax over the candidates per token: query from the encoder's last
        state, keys from the candidates, unscaled dot products (as BertFusion)."""
        query = self.query(encoder_last.to(self.query.weight.dtype))
        scores = (self.key(candidates) * query.unsqueeze(-2)).sum(-1)
        return torch.softmax(self.score_dropout(scores).float(), dim=-1)

    def forward(self, encoder_last: torch.Tensor,
                adapter_outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.adapter_names if n not in adapter_outputs]
        if missing:
            raise KeyError(f"combiner expects adapter outputs {missing}")
        if not self.adapter_names:
            return encoder_last
        if self.mode == "add":  # in the widest dtype: a bf16 encoder beside fp32 adapters
            dtype = encoder_last.dtype
            for n in self.adapter_names:
                dtype = torch.promote_types(dtype, adapter_outputs[n].dtype)
            return encoder_last.to(dtype) + sum(adapter_outputs[n].to(dtype)
                                                for n in self.adapter_names)
        if self.mode == "fusion":
            # The values hold the residual (the adapters library's residual_before): one-hot
            # weights on an adapter with an identity value give exactly its ``add`` output.
            candidates = self.fusion_candidates(encoder_last, adapter_outputs)
            weights = self.fusion_weights(encoder_last, candidates).to(candidates.dtype)
            return self.value((weights.unsqueeze(-1) * candidates).sum(-2))
        # inputs in the layers' own dtype (fp32 master weights; autocast, when on, lowers it)
        dtype = self.per_adapter[self.adapter_names[0]].weight.dtype
        last = encoder_last.to(dtype)
        parts = [self.per_adapter[n](torch.cat([last, adapter_outputs[n].to(dtype)], -1))
                 for n in self.adapter_names]
        return self.out(torch.cat(parts, dim=-1)) if len(parts) > 1 else parts[0]


@dataclass
class KAdapterOutput(ModelOutput):
    """A ``transformers`` ModelOutput (a registered pytree node), so ``torch.export`` and
    tracing accept the model's output."""

    last_hidden_state: torch.Tensor | None = None
    """(B, T, H): the encoder's last hidden state."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """The encoder's hidden-states tuple (embeddings first)."""
    adapter_outputs: dict[str, torch.Tensor] | None = None
    """Adapter name -> (B, T, H) adapter output."""


class KAdapterModel(nn.Module):
    """A Hugging Face encoder plus named knowledge adapters.

    ``freeze_encoder`` (adapter pretraining, probing): encoder weights get no gradient,
    the encoder stays in eval mode (no dropout) whatever ``train()`` is called with, and
    runs under ``no_grad`` so no autograd graph is built for it.
    ``frozen_adapters`` (fine-tuning): those adapters get no gradient and stay in eval
    mode, but gradients still flow through them into a trainable encoder.
    """

    def __init__(
        self,
        encoder: nn.Module,
        adapters: dict[str, KnowledgeAdapter] | None = None,
        *,
        freeze_encoder: bool = True,
        frozen_adapters: tuple[str, ...] | list[str] = (),
    ):
        super().__init__()
        self.encoder = encoder
        self.adapters = nn.ModuleDict(adapters or {})
        self.freeze_encoder = freeze_encoder
        self.frozen_adapters = tuple(frozen_adapters)
        unknown = [n for n in self.frozen_adapters if n not in self.adapters]
        if unknown:
            raise KeyError(f"frozen_adapters names unknown adapters {unknown}")
        hidden = encoder.config.hidden_size
        for name, adapter in self.adapters.items():
            if adapter.hidden_size != hidden:
                raise ValueError(
                    f"adapter {name!r} expects encoder hidden size {adapter.hidden_size}, "
                    f"encoder has {hidden}"
                )
        if freeze_encoder:
            encoder.requires_grad_(False)
        for name in self.frozen_adapters:
            self.adapters[name].requires_grad_(False)
        self.train(False)

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def train(self, mode: bool = True) -> KAdapterModel:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        for name in self.frozen_adapters:
            self.adapters[name].eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **encoder_kwargs: Any) -> KAdapterOutput:
        grad_context = torch.no_grad() if self.freeze_encoder else contextlib.nullcontext()
        with grad_context:
            encoded = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=True,
                return_dict=True,
                **encoder_kwargs,
            )
        hidden_states = tuple(encoded.hidden_states)
        adapter_outputs = {
            name: adapter(hidden_states, attention_mask) for name, adapter in self.adapters.items()
        }
        return KAdapterOutput(encoded.last_hidden_state, hidden_states, adapter_outputs)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- checkpoints


def save_adapter(
    directory: str | Path,
    adapter: KnowledgeAdapter,
    *,
    base_model: str,
    encoder_config: Any,
    task: dict[str, Any],
    head_state: dict[str, torch.Tensor] | None = None,
    base_model_revision: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter.safetensors`` (adapter and head weights)
    + ``README.md`` (a model card with Hub metadata).

    ``task`` describes the pretraining task (name, label list, head settings); it is stored
    verbatim so the head can be rebuilt. ``extra`` adds top-level keys to the config (e.g.
    ``converted_from``). The directory is replaced atomically.
    """
    return write_adapter_dir(
        directory, adapter, {"positions_convention": POSITION_CONVENTION,
                             "adapter": dataclasses.asdict(adapter.config)},
        base_model=base_model, encoder_config=encoder_config, task=task, head_state=head_state,
        base_model_revision=base_model_revision, extra=extra)


def write_adapter_dir(
    directory: str | Path,
    module: nn.Module,
    fields: dict[str, Any],
    *,
    base_model: str,
    encoder_config: Any,
    task: dict[str, Any],
    head_state: dict[str, torch.Tensor] | None = None,
    base_model_revision: str | None = None,
    extra: dict[str, Any] | None = None,
    card_title: str | None = None,
    card_load_snippet: str | None = None,
) -> Path:
    """The adapter directory every adapter kind writes: ``adapter.safetensors`` (``module``'s
    weights as ``adapter.*``, the head's as ``head.*``), ``adapter_config.json`` (format,
    base model, encoder shape, then the kind's own ``fields``, the parameter count, ``task``
    and ``extra``) and a model card (its title and load snippet replaceable). The
    directory is replaced atomically."""
    from kadapter.hub import adapter_card, model_revision, write_card

    tensors = {f"adapter.{k}": v for k, v in module.state_dict().items()}
    tensors.update({f"head.{k}": v for k, v in (head_state or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    config = {
        "format": "kadapter-adapter",
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "base_model_revision": base_model_revision or model_revision(
            getattr(encoder_config, "_name_or_path", "") or base_model),
        "encoder": {
            "model_type": getattr(encoder_config, "model_type", None),
            "hidden_size": encoder_config.hidden_size,
            "num_hidden_layers": encoder_config.num_hidden_layers,
        },
        **fields,
        "parameters": count_parameters(module),
        "task": task,
        **(extra or {}),
    }
    directory = Path(directory)
    with atomic_output_dir(directory, stage="adapter") as tmp:
        atomic_save_safetensors(tensors, tmp / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG_FILE, config)
        card = adapter_card(config)
        card.title = card_title or card.title
        card.load_snippet = card_load_snippet or card.load_snippet
        write_card(tmp, card)
    return directory


@dataclass
class LoadedAdapter:
    adapter: KnowledgeAdapter
    head_state: dict[str, torch.Tensor]
    config: dict[str, Any]


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise AdapterLoadError(f"{directory}: not an adapter directory ({ADAPTER_CONFIG_FILE} missing)")
    try:
        config = read_json(path)
    except ValueError as err:
        raise AdapterLoadError(str(err)) from err
    if not isinstance(config, dict) or config.get("format") != "kadapter-adapter":
        raise AdapterLoadError(f"{path}: not a kadapter adapter config")
    return config


def _config_section(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        problem = "missing" if value is None else f"not an object ({type(value).__name__})"
        raise AdapterLoadError(f"{path}: key {key!r} {problem}")
    return value


def check_fits_encoder(directory: Path, config: dict[str, Any], actual: dict[str, int],
                       what: str = "adapter") -> None:
    """An AdapterLoadError unless the saved ``encoder`` section matches ``actual``
    (hidden_size, num_hidden_layers) of the encoder it is loaded onto."""
    expected = _config_section(config, "encoder", directory / ADAPTER_CONFIG_FILE)
    mismatched = {k: (expected.get(k), v) for k, v in actual.items() if expected.get(k) != v}
    if mismatched:
        details = ", ".join(f"{k}: adapter built for {a}, encoder has {b}"
                            for k, (a, b) in mismatched.items())
        raise AdapterLoadError(f"{directory}: {what} does not fit this encoder ({details}); "
                               f"it was trained on {config.get('base_model')!r}")


@contextlib.contextmanager
def section_errors(config_path: Path, key: str,
                   errors: tuple[type, ...] = (ValueError,)) -> Iterator[None]:
    """A ConfigError (or another of ``errors``) raised while building from the config's
    section ``key`` becomes an AdapterLoadError naming the file and the key."""
    try:
        yield
    except errors as err:  # ConfigError is a ValueError
        if isinstance(err, AdapterLoadError):
            raise
        problem = str(err).removeprefix(f"{config_path}:{key}").lstrip(":. ")
        raise AdapterLoadError(f"{config_path}: key {key!r}: {problem}") from None


def build_section(cls: type, config: dict[str, Any], key: str, config_path: Path) -> Any:
    """The dataclass ``cls`` from the adapter config's section ``key``."""
    from kadapter.config import build  # local: config imports this module's dataclasses

    return build(cls, _config_section(config, key, config_path), f"{config_path}:{key}")


def read_adapter_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
    """(weights path, adapter state, head state) of an adapter directory's safetensors."""
    weights_path = directory / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterLoadError(f"{directory}: {ADAPTER_WEIGHTS_FILE} missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise AdapterLoadError(f"{weights_path}: cannot read weights ({err})") from err
    adapter_state = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    head_state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    return weights_path, adapter_state, head_state


def load_adapter(directory: str | Path, encoder_config: Any, revision: str | None = None) -> LoadedAdapter:
    """Load an adapter directory (or a Hub id: ``owner/name[@revision]``) for an encoder
    with ``encoder_config``; fail clearly on a missing or corrupt file or on an encoder of
    another shape."""
    from kadapter.hub import resolve_adapter

    directory = resolve_adapter(directory, revision)
    config = read_adapter_config(directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if config.get("kind", "kadapter") != "kadapter":
        raise AdapterLoadError(f"{directory}: a {config.get('kind')!r} adapter, not a K-Adapter "
                               "(a serial one loads with kadapter.serial.load_serial_adapter)")
    check_fits_encoder(directory, config, {"hidden_size": encoder_config.hidden_size,
                                           "num_hidden_layers": encoder_config.num_hidden_layers})
    with section_errors(config_path, "adapter", errors=(ValueError, TypeError)):
        adapter = KnowledgeAdapter(build_section(AdapterConfig, config, "adapter", config_path),
                                   encoder_config.hidden_size, encoder_config.num_hidden_layers)
    weights_path, adapter_state, head_state = read_adapter_weights(directory)
    try:
        adapter.load_state_dict(adapter_state, strict=True)
    except RuntimeError as err:
        raise AdapterLoadError(f"{weights_path}: weights do not match the adapter config: {err}") from err
    return LoadedAdapter(adapter, head_state, config)


# -------------------------------------------------------------------- encoder loading


def resolve_model_path(config: ModelConfig) -> str:
    """``tiny`` -> the built tiny model's directory (building it if needed); else as given."""
    if config.name_or_path == "tiny":
        from kadapter.tiny import ensure_tiny_model

        return str(ensure_tiny_model(config.tiny_dir, config.tiny_corpus))
    return config.name_or_path


def _not_available(name: str, err: Exception) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"model {name!r} is not available: it is not a local directory and could not be "
        f"loaded from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        "Download it where the hub is reachable (e.g. `huggingface-cli download roberta-large "
        "--local-dir /path/to/roberta-large`) and set `--model.name_or_path /path/to/roberta-large`, "
        "or use the offline sample preset (`PRESET=sample`, model `tiny`)."
    )


def encoder_dtype(config: ModelConfig, device: torch.device | str | None = None,
                  mixed_precision: str = "no") -> torch.dtype:
    """The frozen encoder's weight dtype for ``config.encoder_dtype`` on ``device`` in a run
    of Accelerate's ``mixed_precision`` (``no``, ``bf16``, ``fp16``)."""
    if config.encoder_dtype != "auto":
        return getattr(torch, config.encoder_dtype)
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type != "cuda":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _not_available(name_or_path, err) from err


def load_encoder(name_or_path: str, *, masked_lm: bool = False,
                 dtype: torch.dtype = torch.float32) -> nn.Module:
    """``AutoModel`` (or ``AutoModelForMaskedLM``) from a hub name or a local path."""
    from transformers import AutoModel, AutoModelForMaskedLM

    loader = AutoModelForMaskedLM if masked_lm else AutoModel
    if not Path(name_or_path).exists() and os.sep in name_or_path.rstrip(os.sep):
        raise ModelNotAvailable(
            f"model path {name_or_path!r} does not exist; set --model.name_or_path to a "
            "directory holding config.json, the weights and the tokenizer files"
        )
    try:
        kwargs = {"dtype": dtype}
        if not masked_lm:
            kwargs["add_pooling_layer"] = False
        try:
            return loader.from_pretrained(name_or_path, **kwargs)
        except TypeError:  # encoders without a pooling layer argument
            kwargs.pop("add_pooling_layer", None)
            return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise _not_available(name_or_path, err) from err


def max_sequence_length(encoder: nn.Module, tokenizer: Any = None) -> int:
    """The longest input (special tokens included) the encoder takes: its position table,
    less the positions RoBERTa-style models skip (their position ids start after the pad
    id), and no more than the tokenizer's ``model_max_length`` when a tokenizer is given
    (transformers reports ~1e30 when that is unset, e.g. for bare vocabulary files)."""
    positions = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
    if isinstance(positions, nn.Embedding):
        skipped = 0 if positions.padding_idx is None else positions.padding_idx + 1
        length = positions.num_embeddings - skipped
    else:  # no learned position table (rotary, relative): trust the config
        length = encoder.config.max_position_embeddings
    return length if tokenizer is None else min(length, tokenizer.model_max_length)


def adapter_flops_per_token(config: AdapterConfig, hidden_size: int, seq_len: int) -> float:
    """Forward multiply-accumulate FLOPs (x2) per token of one adapter (for MFU figures)."""
    a, f = config.adapter_size, config.ffn_size
    per_transformer = 2 * (4 * a * a + 2 * a * f) + 2 * 2 * seq_len * a
    per_layer = 2 * (2 * hidden_size * a) + config.num_transformer_layers * per_transformer
    return float(len(config.positions) * per_layer)


def encoder_flops_per_token(hidden_size: int, num_layers: int, ffn_size: int, seq_len: int) -> float:
    """Forward FLOPs per token of a BERT-style encoder (matmuls only, attention included)."""
    per_layer = 2 * (4 * hidden_size * hidden_size + 2 * hidden_size * ffn_size)
    per_layer += 2 * 2 * seq_len * hidden_size
    return float(num_layers * per_layer)

