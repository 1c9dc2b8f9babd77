"""Adapters on the Hugging Face Hub: save / load / push, model cards, hub ids in configs.

No network: loading by Hub id goes through huggingface_hub's real download code
(``hf_hub_download``) on a local cache laid out as the Hub leaves it
(``models--owner--name/{refs/main, snapshots/<commit>/...}``); pushing goes to a fake Hub
that keeps a branch of commits (``FakeHub``: ``HfApi``'s upload calls replaced).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import threading
import time
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from kadapter import hub
from kadapter.hub import HubNotAvailable, PretrainedAdapter, resolve_adapter
from kadapter.modeling import AdapterConfig, KnowledgeAdapter, load_adapter, save_adapter

ENCODER = SimpleNamespace(model_type="roberta", hidden_size=32, num_hidden_layers=4)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache, repo_id: str, folder, commit: str = COMMIT):
    """Lay ``folder`` out in a Hub cache as a download of ``repo_id`` at ``commit`` (main)."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


class FakeHub:
    """One Hub repository's branch as a push sees it: a list of commits, each the previous
    one's files updated by those it commits. After ``drop_after`` more file transfers the
    connection drops (ConnectionError)."""

    def __init__(self) -> None:
        self.commits: list[dict[str, bytes]] = []
        self.drop_after: int | None = None

    def _transfer(self, path) -> bytes:
        if self.drop_after is not None:
            if self.drop_after == 0:
                raise ConnectionError("connection to the Hub dropped")
            self.drop_after -= 1
        return Path(path).read_bytes()

    def _commit(self, files: dict[str, bytes]) -> str:
        self.commits.append({**(self.commits[-1] if self.commits else {}), **files})
        return f"commit-{len(self.commits)}"

    def install(self, monkeypatch) -> FakeHub:
        fake = self

        def create_commit(api, repo_id, operations, **kwargs):
            # every file is uploaded first; the commit that makes them visible comes last
            files = {op.path_in_repo: fake._transfer(op.path_or_fileobj) for op in operations}
            return fake._commit(files)

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=(), **kwargs):
            # huggingface_hub >= 2 with hf_xet: a folder goes in batches, one commit each (a
            # batch closes at a size or after MAX_COMMIT_INTERVAL); here one file per batch
            for path in sorted(Path(folder_path).rglob("*")):
                if path.is_file() and not any(fnmatch(path.name, p) for p in ignore_patterns):
                    last = fake._commit({path.relative_to(folder_path).as_posix(): fake._transfer(path)})
            return last

        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: None)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self

    def checkout(self, folder: Path) -> Path:
        """The latest commit's files written into ``folder``."""
        for name, data in self.commits[-1].items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return folder


@pytest.fixture()
def adapter_dir(tmp_path):
    torch.manual_seed(0)
    adapter = KnowledgeAdapter(AdapterConfig(positions=[0, 2, 4], adapter_size=16), 32, 4)
    head = {"classifier.weight": torch.randn(3, 64), "classifier.bias": torch.randn(3)}
    task = {"name": "fac", "labels": ["P1", "P2", "P3"], "dev_metrics": {"accuracy": 0.5},
            "data": {"manifest_sha256": "ab" * 32}}
    return save_adapter(tmp_path / "fac-adapter", adapter, base_model="roberta-large",
                        encoder_config=ENCODER, task=task, head_state=head)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_adapter_has_a_model_card_and_ordinary_permissions(adapter_dir):
    card = ModelCard.load(adapter_dir / "README.md")
    assert card.data.library_name == "kadapter"
    assert card.data.base_model == "roberta-large"
    assert card.data.license == "cc-by-sa-4.0"  # T-REx
    text = card.text
    for needle in ("`P1`, `P2`, `P3`", "accuracy 0.5000", "ab" * 32, "PretrainedAdapter.from_pretrained",
                   "Parameters: adapter", "T-REx, CC BY-SA 4.0", "Base model: `roberta-large`"):
        assert needle in text, needle
    mask = os.umask(0)
    os.umask(mask)
    for path in adapter_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path.name


def test_round_trip_through_save_and_from_pretrained(adapter_dir, tmp_path):
    first = PretrainedAdapter.from_pretrained(adapter_dir)
    again = PretrainedAdapter.from_pretrained(first.save_pretrained(tmp_path / "copy"))
    assert same_weights(first.adapter, again.adapter)
    assert again.head_state.keys() == first.head_state.keys()
    assert again.config["task"] == first.config["task"]
    assert (tmp_path / "copy" / "README.md").read_bytes() == (adapter_dir / "README.md").read_bytes()


def test_load_by_hub_id_from_the_cache_offline(adapter_dir, offline_cache):
    snapshot = populate_cache(offline_cache, "kadapter-test/fac-adapter", adapter_dir)
    local = load_adapter(adapter_dir, ENCODER)
    for name in ("kadapter-test/fac-adapter", f"kadapter-test/fac-adapter@{COMMIT}"):
        loaded = load_adapter(name, ENCODER)
        assert same_weights(loaded.adapter, local.adapter)
    assert resolve_adapter("kadapter-test/fac-adapter").resolve() == snapshot.resolve()
    assert PretrainedAdapter.from_pretrained("kadapter-test/fac-adapter").config["task"]["name"] == "fac"


def test_load_by_hub_id_from_the_cache_when_the_hub_is_down(adapter_dir, offline_cache, monkeypatch):
    populate_cache(offline_cache, "kadapter-test/fac-adapter", adapter_dir)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    loaded = load_adapter("kadapter-test/fac-adapter", ENCODER)
    assert same_weights(loaded.adapter, load_adapter(adapter_dir, ENCODER).adapter)


def test_finetune_adapter_keys_take_hub_ids(adapter_dir, offline_cache, tmp_path):
    from kadapter.config import load_config
    from kadapter.finetune import adapter_dirs, adapter_fingerprints

    snapshot = populate_cache(offline_cache, "kadapter-test/fac-adapter", adapter_dir)
    (tmp_path / "p.yaml").write_text("preset: t\nseed: 1\nfinetune:\n  fac_adapter: kadapter-test/fac-adapter\n")
    config = load_config(tmp_path / "p.yaml", [], default_section="finetune")
    assert adapter_dirs(config, "fac")["fac"].resolve() == snapshot.resolve()
    sha = {e["sha256"] for e in adapter_fingerprints(config, "fac")["fac"]}
    assert len(sha) == 3  # adapter_config.json, adapter.safetensors, README.md


def test_unknown_hub_id_offline_fails_at_once_naming_hf_download(offline_cache):
    started = time.perf_counter()
    with pytest.raises(HubNotAvailable) as err:
        load_adapter("kadapter-test/not-cached", ENCODER)
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "`hf download kadapter-test/not-cached --local-dir DIR`" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_unreachable_hub_fails_in_seconds(monkeypatch, tmp_path):
    """A Hub endpoint that accepts connections and never answers: the wait is bounded by
    HUB_TIMEOUT, not by minutes of retries."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub, "HUB_TIMEOUT", 1.0)
    started = time.perf_counter()
    try:
        with pytest.raises(HubNotAvailable, match="hf download kadapter-test/silent"):
            resolve_adapter("kadapter-test/silent")
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()
    assert elapsed < 5, elapsed


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    missing = tmp_path / "runs" / "sample" / "fac-adapter"
    assert resolve_adapter(str(missing)) == missing
    with pytest.raises(Exception, match="not an adapter directory"):
        load_adapter(str(missing), ENCODER)


def test_push_uploads_the_saved_folder(adapter_dir, monkeypatch, tmp_path):
    fake = FakeHub().install(monkeypatch)
    adapter = PretrainedAdapter.from_pretrained(adapter_dir)
    assert adapter.push_to_hub("someone/fac-adapter") == "commit-1"
    # what the Hub holds: the folder less the output marker (local bookkeeping)
    uploaded = fake.checkout(tmp_path / "uploaded")
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "adapter.safetensors",
                                                          "adapter_config.json"]
    assert same_weights(PretrainedAdapter.from_pretrained(uploaded).adapter, adapter.adapter)
    assert ModelCard.load(uploaded / "README.md").data.library_name == "kadapter"


def test_an_interrupted_push_leaves_the_previous_adapter_whole(adapter_dir, monkeypatch, tmp_path):
    """A retrained adapter (same shape, other weights and metrics) pushed over the previous
    one: a connection lost mid-push must not leave a commit that mixes the two (a load reads
    config and weights from the latest commit); the push run again completes it."""
    fake = FakeHub().install(monkeypatch)
    PretrainedAdapter.from_pretrained(adapter_dir).push_to_hub("someone/fac-adapter")
    previous = fake.commits[-1]
    retrained = PretrainedAdapter.from_pretrained(adapter_dir)
    with torch.no_grad():
        for parameter in retrained.adapter.parameters():
            parameter.add_(1.0)
    retrained.config["task"]["dev_metrics"] = {"accuracy": 0.75}
    for transfers in (0, 1, 2):  # lost at the first, second or last of the three files
        fake.drop_after = transfers
        with pytest.raises(ConnectionError):
            retrained.push_to_hub("someone/fac-adapter")
        assert fake.commits[-1] == previous, f"half a push visible after {transfers} file(s)"
    fake.drop_after = None
    retrained.push_to_hub("someone/fac-adapter")
    loaded = PretrainedAdapter.from_pretrained(fake.checkout(tmp_path / "pushed"))
    assert same_weights(loaded.adapter, retrained.adapter)
    assert loaded.config["task"]["dev_metrics"] == {"accuracy": 0.75}
