"""Adapters and fine-tuned models on the Hugging Face Hub, and their model cards.

Every saved directory (an adapter, a fine-tuned model) is also a Hub repository: its
files plus a model card (``README.md`` with Hub metadata). ``from_pretrained`` takes a
local directory or a Hub id (``owner/name``, optionally ``owner/name@revision``); the
files are fetched with ``huggingface_hub.hf_hub_download`` into the usual Hub cache
(``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` is honoured (cache only), and an unreachable
Hub fails within ``HUB_TIMEOUT`` seconds with a message naming ``hf download``.
``push_to_hub`` writes the directory with ``save_pretrained`` into a temporary folder and
uploads all its files in one commit (``HfApi.create_commit``): an interrupted push leaves
the previous version whole.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kadapter.io import OUTPUT_MARKER, atomic_write_bytes, read_json

MODEL_CARD_FILE = "README.md"
HUB_TIMEOUT = 10.0
"""Seconds to wait for the Hub before falling back to the local cache."""
# Hub licence id and wording of each task's training data (KADAPTER.md section 7).
DATA_LICENCES = {
    "fac": ("cc-by-sa-4.0", "T-REx, CC BY-SA 4.0"),
    "lin": ("other", "BookCorpus sentences with parsed dependency heads; BookCorpus may not "
                     "be redistributed"),
    "typing": ("other", "Open Entity; see its release's terms"),
    "figer": ("other", "FIGER; see its release's terms"),
    "tacred": ("other", "TACRED, LDC licence; the data may not be redistributed"),
    "csqa": ("mit", "CommonsenseQA, MIT"),
    "cosmosqa": ("cc-by-4.0", "Cosmos QA, CC BY 4.0"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class HubNotAvailable(FileNotFoundError):
    """A name is neither a local directory nor fetchable from the Hub (or its cache)."""


def split_revision(name: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); a name without ``@`` -> (name, None)."""
    if "@" in name and not Path(name).exists():
        repo, revision = name.rsplit("@", 1)
        return repo, revision or None
    return name, None


def is_hub_id(name: str) -> bool:
    """A Hub repository id (``name`` or ``owner/name``), not a path with more parts."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name


def model_revision(name_or_path: str) -> str | None:
    """Which version of a model was loaded: the Hub commit of a cached Hub model or of a
    cache snapshot directory, or the build fingerprint of the tiny model; else None."""
    from kadapter.tiny import STAMP_FILE

    path = Path(name_or_path) if name_or_path else None
    if path is not None and path.is_dir():
        if (path / STAMP_FILE).is_file():
            return f"tiny build {read_json(path / STAMP_FILE).get('fingerprint')}"
        parts = path.resolve().parts
        if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
            return parts[-1]
        return None
    if name_or_path and is_hub_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json",
                                        cache_dir=os.environ.get("HF_HUB_CACHE") or None)
        if isinstance(cached, str):
            return Path(cached).parent.name
    return None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve(name_or_path: str | Path, revision: str | None, *, config_file: str,
            more_files: Callable[[dict[str, Any]], list[str]],
            optional_files: tuple[str, ...] = (MODEL_CARD_FILE,)) -> Path:
    """A local directory as it is; else a Hub id's files fetched into the cache -> their
    snapshot directory. A path that is not a Hub id is returned unchanged (the caller
    reports it missing with its own advice)."""
    name = str(name_or_path)
    path = Path(name)
    if path.exists():
        return path
    repo_id, pinned = split_revision(name)
    revision = revision or pinned
    if not is_hub_id(repo_id):
        return path
    return download(repo_id, revision, config_file, more_files, optional_files)


def download(repo_id: str, revision: str | None, config_file: str,
             more_files: Callable[[dict[str, Any]], list[str]],
             optional_files: tuple[str, ...] = ()) -> Path:
    """Fetch ``config_file``, then the files it names, of one commit; -> the snapshot dir.

    One HEAD request without retries, bounded by ``HUB_TIMEOUT``, first decides whether the
    Hub answers: ``hf_hub_download`` itself retries for minutes when nothing is cached.
    When it does not, only the cache is used."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    # read at call time: huggingface_hub reads these environment variables once, at import
    is_offline = offline()
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    endpoint = os.environ.get("HF_ENDPOINT") or None
    probe_error: Exception | None = None
    if not is_offline:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, config_file, revision=revision, endpoint=endpoint),
                                 timeout=HUB_TIMEOUT, endpoint=endpoint)
        except Exception as err:  # unreachable, timed out, not found, refused: the cache decides
            probe_error = err
    cache_only = is_offline or probe_error is not None

    def fetch(filename: str, rev: str | None) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=cache_dir,
                                    endpoint=endpoint, local_files_only=cache_only,
                                    etag_timeout=HUB_TIMEOUT))

    try:
        config_path = fetch(config_file, revision)
        snapshot = config_path.parent
        commit = snapshot.name  # the snapshot folder is named by its commit
        for filename in more_files(read_json(config_path)):
            fetch(filename, commit)
        for filename in optional_files:
            try:
                fetch(filename, commit)
            except (EntryNotFoundError, LocalEntryNotFoundError):
                pass
    except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError, ValueError) as err:
        err = probe_error or err  # why the Hub was not used says more than "not in the cache"
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        mode = " (HF_HUB_OFFLINE is set: the local cache only)" if is_offline else ""
        pin = f" --revision {revision}" if revision else ""
        raise HubNotAvailable(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face "
            f"Hub{mode}: {type(err).__name__}: {reason}. Fetch it where the Hub is reachable with "
            f"`hf download {repo_id}{pin} --local-dir DIR` and pass DIR instead") from None
    return snapshot


def push_folder(save_pretrained: Callable[[Path], Any], repo_id: str, *, token: str | None = None,
                private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None) -> Any:
    """``save_pretrained`` into a temporary folder, then every file of it in one commit.

    One ``create_commit``: the files are uploaded first and the commit that makes them
    visible comes last, so an interrupted push leaves the previous version as it was.
    ``upload_folder`` is not used: with ``hf_xet`` installed it may split a folder into
    several commits, and a push cut between two could leave a new config beside the
    previous weights (a load reads both from the latest commit)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="kadapter-push-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        save_pretrained(folder)
        api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(),
                                         path_or_fileobj=str(path))
                      for path in sorted(folder.rglob("*"))
                      if path.is_file() and path.name != OUTPUT_MARKER]  # local bookkeeping only
        return api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload {folder.name} with kadapter")


# --------------------------------------------------------------------------- model cards


@dataclass
class CardFacts:
    """What a model card says."""

    title: str
    kind: str
    """``adapter`` or ``fine-tuned model``."""
    task: str
    base_model: str
    base_model_revision: str | None
    labels: list[str] | None
    parameters: dict[str, int]
    metrics: dict[str, Any]
    data: Any
    """Fingerprints of the training data (manifest sha256, file hashes)."""
    load_snippet: str
    extra: list[str]
    """More lines for the body (e.g. where a converted adapter came from)."""


def _hub_base_model(name: str) -> str | None:
    """The base model as Hub metadata accepts it: a Hub id, not a local path or ``tiny``."""
    return name if is_hub_id(name) and name != "tiny" and not Path(name).exists() else None


def render_card(facts: CardFacts) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    licence_id, licence_text = DATA_LICENCES.get(facts.task, ("other", "see the data's own terms"))
    data = ModelCardData(library_name="kadapter", license=licence_id,
                         base_model=_hub_base_model(facts.base_model),
                         tags=["kadapter", "k-adapter", facts.task,
                               "adapter" if facts.kind == "adapter" else "fine-tuned"])
    revision = facts.base_model_revision or "not recorded (loaded from local files)"
    if facts.labels:
        label_text = f"{len(facts.labels)}: " + ", ".join(f"`{x}`" for x in facts.labels)
    elif facts.task == "lin":
        label_text = "none (the head points at each word's head position)"
    else:
        label_text = "none (the answer is one of each question's own choices)"
    metric_lines = [f"- {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in values.items())
                    for split, values in facts.metrics.items() if isinstance(values, dict) and values]
    body = [
        f"# {facts.title}",
        "",
        f"A {facts.kind} of kadapter, a reimplementation of K-Adapter "
        "([Wang et al., 2021](https://arxiv.org/abs/2002.01808); original code "
        "[microsoft/K-Adapter](https://github.com/microsoft/K-Adapter)): knowledge adapters "
        "beside a frozen pre-trained encoder.",
        "",
        f"- Base model: `{facts.base_model}`, revision {revision}",
        f"- Task: `{facts.task}`",
        f"- Labels: {label_text}",
        "- Parameters: " + ", ".join(f"{k} {v:,}" for k, v in facts.parameters.items()),
        f"- Training data: {licence_text}",
        "",
        "## Metrics",
        "",
        *(metric_lines or ["- none recorded"]),
        "",
        "## Training data fingerprints",
        "",
        "```json",
        _json_text(facts.data),
        "```",
        "",
        "## Load it",
        "",
        "```python",
        facts.load_snippet.strip(),
        "```",
    ]
    if facts.extra:
        body += ["", "## Provenance", "", *facts.extra]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


def _json_text(obj: Any) -> str:
    from kadapter.io import json_dumps

    return json_dumps(obj).decode().rstrip()


def write_card(directory: str | Path, facts: CardFacts) -> Path:
    path = Path(directory) / MODEL_CARD_FILE
    atomic_write_bytes(path, render_card(facts).encode())
    return path


def adapter_card(config: dict[str, Any], load_name: str = "DIR_OR_HUB_ID") -> CardFacts:
    """The facts of an adapter directory's card, from its ``adapter_config.json``."""
    task = config.get("task") or {}
    converted = config.get("converted_from")
    extra = []
    if converted:
        extra.append(f"Converted from the original release ({converted.get('repository')}): "
                     f"`{Path(converted.get('file', '')).name}`, sha256 `{converted.get('sha256')}`; "
                     f"positions from {converted.get('positions_from')}.")
    if task.get("note"):
        extra.append(f"Head: {task['note']}.")
    snippet = (
        "from kadapter.hub import PretrainedAdapter\n"
        f"adapter = PretrainedAdapter.from_pretrained({load_name!r})\n"
        "features = adapter.adapter(encoder_hidden_states, attention_mask)  # (B, T, H)"
    )
    return CardFacts(
        title=f"K-Adapter {task.get('name', '?')} adapter",
        kind="adapter", task=str(task.get("name", "?")), base_model=str(config.get("base_model")),
        base_model_revision=config.get("base_model_revision"), labels=task.get("labels"),
        parameters={"adapter": int(config.get("parameters", 0))},
        metrics={"dev": task.get("dev_metrics") or {}}, data=task.get("data"),
        load_snippet=snippet, extra=extra)


# --------------------------------------------------------------------------- adapters


def resolve_adapter(name_or_path: str | Path, revision: str | None = None) -> Path:
    """An adapter directory, or a Hub id fetched into the cache."""
    from kadapter.modeling import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

    return resolve(name_or_path, revision, config_file=ADAPTER_CONFIG_FILE,
                   more_files=lambda _config: [ADAPTER_WEIGHTS_FILE])


class PretrainedAdapter:
    """A knowledge adapter with its pretraining head: ``from_pretrained`` /
    ``save_pretrained`` / ``push_to_hub``."""

    def __init__(self, adapter, head_state: dict[str, Any], config: dict[str, Any]):
        self.adapter = adapter
        self.head_state = head_state
        self.config = config

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, revision: str | None = None,
                        encoder_config: Any = None) -> PretrainedAdapter:
        """Load for ``encoder_config`` (default: the encoder shape the adapter records)."""
        from kadapter.modeling import load_adapter, read_adapter_config

        directory = resolve_adapter(repo_id_or_dir, revision)
        if encoder_config is None:
            encoder_config = SimpleNamespace(**read_adapter_config(directory)["encoder"])
        loaded = load_adapter(directory, encoder_config)
        return cls(loaded.adapter, loaded.head_state, loaded.config)

    def save_pretrained(self, directory: str | Path) -> Path:
        from kadapter.modeling import save_adapter

        own = {"format", "format_version", "base_model", "base_model_revision", "encoder",
               "positions_convention", "adapter", "parameters", "task"}
        return save_adapter(directory, self.adapter, base_model=self.config["base_model"],
                            encoder_config=SimpleNamespace(**self.config["encoder"]),
                            task=self.config["task"], head_state=self.head_state,
                            base_model_revision=self.config.get("base_model_revision"),
                            extra={k: v for k, v in self.config.items() if k not in own})

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload in one commit (``token``, ``private``, ``revision``, ``commit_message``
        as for ``HfApi.create_commit``)."""
        return push_folder(self.save_pretrained, repo_id, **kwargs)
