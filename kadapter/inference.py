"""Running K-Adapter models on new text: combined features, fine-tuned models, predictions.

    from kadapter.inference import load_finetuned, predict
    model = load_finetuned("runs/sample/finetune/tacred/fac+lin/model")   # or a Hub id
    predict(model, [{"token": [...], "subj_start": 0, "subj_end": 1, "obj_start": 4, "obj_end": 4}])

A fine-tuned model directory (written at the end of every fine-tuning run, or by
``FinetunedModel.save_pretrained``) holds:
- ``kadapter_model.json``: task, labels, head settings, combiner mode, max length, the
  adapters used (their path or Hub id and the sha256 of their weights), the base model
  and tokenizer names, dev/test metrics, the data fingerprints and the file list;
- ``model.safetensors``: the trainable weights (encoder, combiner, task head); the frozen
  adapters are not copied, they are loaded from where they were and checked against
  their recorded sha256;
- ``encoder/config.json`` (to rebuild the encoder) and the tokenizer's files;
- ``README.md``: the model card.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kadapter.io import (
    OUTPUT_MARKER,
    atomic_output_dir,
    atomic_save_safetensors,
    atomic_write_json,
    file_fingerprint,
    ordinary_permissions,
    read_json,
)

MODEL_CONFIG_FILE = "kadapter_model.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
ENCODER_CONFIG_FILE = "encoder/config.json"
FORMAT = "kadapter-finetuned"
FORMAT_VERSION = 1
ADAPTER_PREFIX = "kadapter.adapters."
SERIAL_PREFIX = "kadapter.encoder.serial_adapters."  # frozen serial adapters inside the encoder
FROZEN_PREFIXES = (ADAPTER_PREFIX, SERIAL_PREFIX)


class ModelLoadError(ValueError):
    """A fine-tuned model directory is missing, corrupt, or its adapters changed."""


# --------------------------------------------------------------------------- the model


class FinetunedModel:
    """A fine-tuned K-Adapter model with what it needs to predict: ``model`` (a
    ``kadapter.finetune.FinetuneModel``), ``tokenizer`` and ``config``."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: dict[str, Any]):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    @property
    def task(self):
        from kadapter.tasks import TASKS

        return TASKS[self.config["task"]]

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> FinetunedModel:
        self.model.to(device)
        return self

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, revision: str | None = None, *,
                        adapters: dict[str, str] | None = None,
                        device: str | torch.device | None = None) -> FinetunedModel:
        """Load a model directory or Hub id (``owner/name[@revision]``). ``adapters``
        overrides where an adapter is loaded from (its weights must still match)."""
        from kadapter.hub import resolve

        directory = resolve(repo_id_or_dir, revision, config_file=MODEL_CONFIG_FILE,
                            more_files=lambda config: list(config.get("files", [])))
        path = directory / MODEL_CONFIG_FILE
        if not path.is_file():
            raise ModelLoadError(f"{directory}: not a fine-tuned model directory ({MODEL_CONFIG_FILE} "
                                 "missing); fine-tuning runs write one under <run>/model")
        config = read_json(path)
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ModelLoadError(f"{path}: not a kadapter fine-tuned model config")
        model = build_model(directory, config, adapters or {})
        tokenizer = _tokenizer(directory)
        loaded = cls(model.eval(), tokenizer, config)
        return loaded.to(device) if device is not None else loaded

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model directory (replaced atomically)."""
        return save_finetuned(directory, self.model, self.tokenizer, self.config)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload in one commit (``token``, ``private``, ``revision``, ``commit_message``
        as for ``HfApi.create_commit``)."""
        from kadapter.hub import push_folder

        return push_folder(self.save_pretrained, repo_id, **kwargs)


load_finetuned = FinetunedModel.from_pretrained


def _tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def build_model(directory: Path, config: dict[str, Any], overrides: dict[str, str]) -> nn.Module:
    """Encoder from its config, adapters from their sources (checked), head and combiner,
    then the saved trainable weights, strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from kadapter.finetune import FinetuneModel
    from kadapter.hub import resolve_adapter
    from kadapter.modeling import AdapterLoadError, load_adapter
    from kadapter.serial import is_serial_adapter_dir, load_serial_adapter
    from kadapter.tasks import TASKS

    encoder_config = AutoConfig.from_pretrained(str(directory / Path(ENCODER_CONFIG_FILE).parent))
    try:
        encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False)
    except TypeError:  # encoders without a pooling layer argument
        encoder = AutoModel.from_config(encoder_config)
    adapters = {}
    for name, recorded in sorted(config["adapters"].items()):
        source = overrides.get(name, recorded["source"])
        try:
            serial = is_serial_adapter_dir(resolve_adapter(source))
            loaded = (load_serial_adapter(source, encoder) if serial
                      else load_adapter(source, encoder_config))
        except (AdapterLoadError, FileNotFoundError) as err:
            raise ModelLoadError(f"{directory}: its {name} adapter {source!r} cannot be loaded ({err}); "
                                 f"pass adapters={{{name!r}: PATH_OR_HUB_ID}}") from None
        from kadapter.modeling import ADAPTER_WEIGHTS_FILE

        sha = file_fingerprint(resolve_adapter(source) / ADAPTER_WEIGHTS_FILE)["sha256"]
        if sha != recorded["sha256"]:
            raise ModelLoadError(f"{directory}: the {name} adapter at {source!r} is not the one this model "
                                 f"was fine-tuned with (sha256 {sha[:12]}..., recorded "
                                 f"{recorded['sha256'][:12]}...)")
        if serial:  # inside the encoder now, frozen as in fine-tuning
            loaded.adapters.requires_grad_(False)
        else:
            adapters[name] = loaded.adapter
    head_settings = config["head"]
    task = TASKS[config["task"]]
    head = task.head(encoder_config.hidden_size, len(config["labels"]), head_settings["dropout"],
                     head_settings["pooling"])
    model = FinetuneModel(encoder, adapters, head, config["combine"])
    weights = directory / MODEL_WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{weights}: cannot read weights ({err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES)]
    if missing or unexpected:
        raise ModelLoadError(f"{weights}: weights do not match the model config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the frozen adapters (K-Adapters, serial adapters), as contiguous CPU
    tensors."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
            if not k.startswith(FROZEN_PREFIXES)}


def save_finetuned(directory: str | Path, model: nn.Module, tokenizer: Any,
                   config: dict[str, Any]) -> Path:
    """Write a fine-tuned model directory (config, weights, encoder config, tokenizer,
    model card); ``config`` is the ``kadapter_model.json`` content without ``files``."""
    from kadapter.hub import CardFacts, write_card

    encoder = model.kadapter.encoder
    with atomic_output_dir(directory, stage="finetuned-model") as tmp:
        atomic_save_safetensors(trainable_state(model), tmp / MODEL_WEIGHTS_FILE, metadata={"format": "pt"})
        encoder.config.save_pretrained(str(tmp / Path(ENCODER_CONFIG_FILE).parent))
        tokenizer.save_pretrained(str(tmp))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                       if p.is_file() and p.name != OUTPUT_MARKER)
        for name in files:
            ordinary_permissions(tmp / name)
        config = {**config, "format": FORMAT, "format_version": FORMAT_VERSION,
                  "files": [f for f in files if f != MODEL_CONFIG_FILE] + ["README.md"]}
        atomic_write_json(tmp / MODEL_CONFIG_FILE, config)
        task = config["task"]
        snippet = (
            "from kadapter.inference import load_finetuned, predict\n"
            "model = load_finetuned('DIR_OR_HUB_ID')\n"
            f"print(predict(model, [{_example_input(task)}]))"
        )
        adapters = "; ".join(f"`{n}`: `{a['source']}` (sha256 {a['sha256'][:12]}...)"
                             for n, a in sorted(config["adapters"].items())) or "none (encoder alone)"
        write_card(tmp, CardFacts(
            title=f"K-Adapter fine-tuned on {task} ({config.get('variant', '')})",
            kind="fine-tuned model", task=task, base_model=config["base_model"],
            base_model_revision=config.get("base_model_revision"), labels=config["labels"] or None,
            parameters=config["parameters"], metrics=config.get("metrics", {}),
            data=config.get("data"), load_snippet=snippet,
            extra=[f"Adapters (frozen, loaded from their source and checked): {adapters}."]))
    return Path(directory)


def _example_input(task: str) -> str:
    if task in ("typing", "figer"):
        return '{"sent": "Paris is the capital of France .", "start": 0, "end": 5}'
    if task == "tacred":
        return ('{"token": ["Ada", "Lovelace", "was", "born", "in", "London", "."], '
                '"subj_start": 0, "subj_end": 1, "obj_start": 5, "obj_end": 5}')
    return '{"question": "Where do fish live?", "choices": ["water", "desert", "sky"]}'


# --------------------------------------------------------------------------- predictions


def _examples(task, inputs: Sequence[dict[str, Any]], labels: list[str]) -> list[Any]:
    """Inputs in the task's own record format -> the task's examples; a bad input is a
    ValueError naming its index."""
    from kadapter.tasks import PTB_ESCAPES, ChoiceExample, RelationExample, TypingExample

    examples = []
    for index, item in enumerate(inputs):
        where = f"input {index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a dict, got {type(item).__name__}")
        try:
            if task.kind == "typing":
                text, start, end = item["sent"], int(item["start"]), int(item["end"])
                if not 0 <= start < end <= len(text):
                    raise ValueError(f"mention [{start}, {end}) outside a sentence of {len(text)} characters")
                examples.append(TypingExample(str(index), text, start, end, ()))
            elif task.kind == "relation":
                tokens = [PTB_ESCAPES.get(t, t) for t in item["token"]]
                spans = [(int(item[f"{r}_start"]), int(item[f"{r}_end"])) for r in ("subj", "obj")]
                for first, last in spans:
                    if not 0 <= first <= last < len(tokens):
                        raise ValueError(f"span [{first}, {last}] (inclusive) outside {len(tokens)} tokens")
                # the relation is not used for prediction; encode() only needs a valid label
                examples.append(RelationExample(str(index), tuple(tokens), spans[0], spans[1], labels[0]))
            else:
                choices = tuple(item["choices"])
                if len(choices) < 2:
                    raise ValueError(f"expected at least 2 choices, got {len(choices)}")
                examples.append(ChoiceExample(str(index), item.get("context"), item["question"], choices,
                                              tuple(item.get("labels", choices)), None))
        except KeyError as err:
            raise ValueError(f"{where}: missing field {err.args[0]!r}") from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
    return examples


@torch.no_grad()
def predict(model: FinetunedModel, inputs: Sequence[dict[str, Any]], *, batch_size: int = 16) -> list[Any]:
    """Labels for new inputs, in order, in the task's own record format:
    typing / FIGER ``{"sent", "start", "end"}`` (character offsets, end exclusive) -> a list
    of types; TACRED ``{"token", "subj_start", "subj_end", "obj_start", "obj_end"}``
    (inclusive token spans) -> a relation; multiple choice ``{"question", "choices",
    "context"?, "labels"?}`` -> the chosen choice's label (default: its text).
    An input whose markers do not fit ``max_length`` gets the task's fallback."""
    from kadapter.tasks import collate

    task, labels = model.task, model.labels
    examples = _examples(task, inputs, labels)
    encoded = task.encode(examples, model.tokenizer, labels, model.config["max_length"])
    device = model.device
    net = model.model.eval()
    decoded: dict[int, Any] = {}
    for start in range(0, len(encoded.features), batch_size):
        rows = encoded.features[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(rows, model.tokenizer.pad_token_id).items()}
        logits = net(batch).float().cpu()
        for example, row in zip(encoded.examples[start:start + batch_size], logits):
            decoded[id(example)] = task.decode(row, labels, example)
    return [decoded[id(e)] if id(e) in decoded else task.fallback(labels, e) for e in examples]


# --------------------------------------------------------------------------- features


@torch.no_grad()
def encode(texts: Sequence[str], encoder: str | nn.Module | FinetunedModel,
           adapters: dict[str, Any] | Sequence[str] | None = None, *, tokenizer: Any = None,
           combiner: nn.Module | None = None, batch_size: int = 32,
           device: str | torch.device | None = None, max_length: int | None = None) -> list[torch.Tensor]:
    """The combined features of each text: a (tokens, D) CPU tensor per text, computed in
    batches on ``device``.

    ``encoder``: a model name or path (``tiny`` for the sample preset's), an encoder
    module (then give ``tokenizer``), or a ``FinetunedModel`` (its encoder, adapters and
    trained combiner: D = H). ``adapters``: name -> adapter directory, Hub id or
    ``KnowledgeAdapter``, or a list of directories / Hub ids (named by their task).
    Without a ``combiner`` the features are concat(encoder last state, each adapter's
    output in name order): D = H * (1 + number of adapters)."""
    from kadapter.modeling import (
        KAdapterModel,
        KnowledgeAdapter,
        ModelConfig,
        load_adapter,
        load_encoder,
        load_tokenizer,
        max_sequence_length,
        resolve_model_path,
    )

    if isinstance(encoder, FinetunedModel):
        tokenizer = tokenizer or encoder.tokenizer
        combiner = combiner or encoder.model.combiner
        kadapter = encoder.model.kadapter
    else:
        if isinstance(encoder, str):
            path = resolve_model_path(ModelConfig(name_or_path=encoder))
            tokenizer = tokenizer or load_tokenizer(path)
            encoder = load_encoder(path)
        if tokenizer is None:
            raise ValueError("encode: give the tokenizer of an encoder module")
        items = adapters.items() if isinstance(adapters, dict) else [(None, a) for a in adapters or []]
        modules = {}
        for name, adapter in items:
            if not isinstance(adapter, KnowledgeAdapter):
                loaded = load_adapter(adapter, encoder.config)
                name = name or loaded.config["task"]["name"]
                adapter = loaded.adapter
            modules[name] = adapter
        kadapter = KAdapterModel(encoder, modules, freeze_encoder=True, frozen_adapters=list(modules))
    kadapter.eval()
    if device is not None:
        kadapter.to(device)
        if combiner is not None:
            combiner.to(device)
    target = next(kadapter.parameters()).device
    limit = max_length or max_sequence_length(kadapter.encoder, tokenizer)
    features: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=limit, return_tensors="pt")
        mask = batch["attention_mask"].to(target)
        out = kadapter(batch["input_ids"].to(target), mask)
        names = sorted(out.adapter_outputs)
        if combiner is not None:
            combined = combiner(out.last_hidden_state, out.adapter_outputs)
        else:
            combined = torch.cat([out.last_hidden_state, *(out.adapter_outputs[n].to(
                out.last_hidden_state.dtype) for n in names)], dim=-1)
        for row, length in zip(combined, mask.sum(1).tolist()):
            features.append(row[:length].float().cpu())
    return features


def finetuned_config(*, task: str, variant: str, labels: list[str], settings: Any, combine: str,
                     adapters: dict[str, str | Path], base_model: str, base_model_revision: str | None,
                     tokenizer_name: str, metrics: dict[str, Any], data: dict[str, Any],
                     parameters: dict[str, int]) -> dict[str, Any]:
    """The ``kadapter_model.json`` content of a fine-tuning run."""
    from kadapter.hub import resolve_adapter
    from kadapter.modeling import ADAPTER_WEIGHTS_FILE

    return {
        "task": task, "variant": variant, "labels": labels,
        "head": {"dropout": settings.dropout, "pooling": settings.pooling},
        "max_length": settings.max_length, "combine": combine,
        "adapters": {name: {"source": str(source), "sha256": file_fingerprint(
            resolve_adapter(source) / ADAPTER_WEIGHTS_FILE)["sha256"]} for name, source in adapters.items()},
        "base_model": base_model, "base_model_revision": base_model_revision,
        "tokenizer": tokenizer_name, "metrics": metrics, "data": data, "parameters": parameters,
    }


__all__ = ["FinetunedModel", "ModelLoadError", "encode", "finetuned_config", "load_finetuned",
           "predict", "save_finetuned"]
