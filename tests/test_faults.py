"""Fault injection: malformed inputs over every reader, SIGKILLs at random points of each
stage, killed-and-resumed training, and the security checks (no pickle is ever loaded, no
directory a stage did not write is ever replaced).

Every bad input must end in a clear one-line error naming the file (``CLEAR_ERRORS``) or
in a counted skip; anything else (another exception, a silent acceptance) fails its case.
Each killed stage must leave the previous complete output untouched, no half output,
and temporaries that the next run removes; the rerun's bytes equal the first run's.
Kills happen in forked children (no interpreter start-up per kill) after seeded random
delays drawn within the stage's measured duration.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kadapter.config import ConfigError, load_config
from kadapter.io import OUTPUT_MARKER, InputError, UnsafeOutputError, atomic_output_dir
from kadapter.modeling import AdapterLoadError

CLEAR_ERRORS = (InputError, ConfigError, AdapterLoadError, FileNotFoundError)
ENTITY, PROP = "http://www.wikidata.org/entity/", "http://www.wikidata.org/prop/direct/"
SEED = 20261201


# ================================================================== malformed inputs


def trex_doc(docid: str = "Q1", subject: dict | None = None, obj: dict | None = None,
             **changes) -> dict:
    """One document, one triple: Paris (Q90) -P17-> France (Q142)."""
    text = "Paris is the capital of France."
    subj = {"boundaries": [0, 5], "surfaceform": "Paris", "uri": ENTITY + "Q90", "annotator": "t",
            **(subject or {})}
    objt = {"boundaries": [24, 30], "surfaceform": "France", "uri": ENTITY + "Q142",
            "annotator": "t", **(obj or {})}
    triple = {"sentence_id": 0, "subject": subj, "object": objt,
              "predicate": {"boundaries": None, "surfaceform": None, "uri": PROP + "P17",
                            "annotator": "t"}, "annotator": "Simple-Aligner"}
    for key in ("sentence_id",):
        if key in changes:
            triple[key] = changes.pop(key)
    doc = {"docid": ENTITY + docid, "text": text, "sentences_boundaries": [[0, len(text)]],
           "entities": [subj, objt], "triples": [triple]}
    doc.update(changes)
    return doc


# name -> {file name: content (documents or raw bytes)}
TREX_CASES = {
    "truncated_json": {"a.json": json.dumps([trex_doc()]).encode()[:-7]},
    "not_a_list": {"a.json": json.dumps({"docid": "x"}).encode()},
    "non_utf8": {"a.json": json.dumps([trex_doc()]).encode().replace(b"Paris is", b"Par\xffs is")},
    "empty_file": {"a.json": b""},
    "document_missing_text": {"a.json": [{k: v for k, v in trex_doc().items() if k != "text"}]},
    "boundaries_outside_text": {"a.json": [trex_doc(obj={"boundaries": [24, 99]})]},
    "boundaries_wrong_type": {"a.json": [trex_doc(obj={"boundaries": ["24", "30"]})]},
    "sentence_id_out_of_range": {"a.json": [trex_doc(sentence_id=3)]},
    "surfaceform_mismatch": {"a.json": [trex_doc(obj={"boundaries": [13, 20]})]},
    "uri_not_an_entity": {"a.json": [trex_doc(obj={"uri": "http://example.org/France"})]},
    "docid_twice_in_a_file": {"a.json": [trex_doc(), trex_doc()]},
    "docid_in_two_files": {"a.json": [trex_doc()], "b.json": [trex_doc()]},
}


def write_inputs(directory: Path, files: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (directory / name).write_bytes(data)
    return directory


def run_trex(tmp_path: Path, files: dict, on_error: str):
    from kadapter.trex import TrexConfig, build_trex_rc

    config = TrexConfig(input=str(write_inputs(tmp_path / "in", files)), min_entity_count=1,
                        min_relation_pairs=1, dev_fraction=0.0, on_error=on_error)
    return build_trex_rc(config, seed=1, output_dir=tmp_path / "out")


def trex_skips(manifest: dict) -> int:
    counts = manifest["counts"]
    dropped = {k: v for k, v in counts["triples_dropped"].items()
               if k not in ("duplicate", "missing_boundaries")}
    return counts["files_skipped_invalid_json"] + counts["documents_skipped"] + sum(dropped.values())


@pytest.mark.parametrize("case", sorted(TREX_CASES))
def test_trex_bad_input_is_a_clear_error(tmp_path, case):
    with pytest.raises(CLEAR_ERRORS, match=r"in/[ab]\.json"):
        run_trex(tmp_path, TREX_CASES[case], "raise")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(set(TREX_CASES) - {"not_a_list"}))
def test_trex_bad_input_is_a_counted_skip(tmp_path, case):
    manifest = run_trex(tmp_path, TREX_CASES[case], "skip")
    assert trex_skips(manifest) >= 1, manifest["counts"]


def test_trex_repeated_docid_is_counted_once(tmp_path):
    manifest = run_trex(tmp_path, TREX_CASES["docid_in_two_files"], "skip")
    counts = manifest["counts"]
    assert counts["documents_skipped_by_reason"]["duplicate_docid"] == 1
    assert counts["entity_mentions"] == 2 and counts["examples"]["train"] == 1


def test_trex_typed_values_are_dropped_and_counted(tmp_path):
    date = "1815-12-10T00:00:00Z^^http://www.w3.org/2001/XMLSchema#dateTime"
    manifest = run_trex(tmp_path, {"a.json": [trex_doc(obj={"uri": date})]}, "raise")
    assert manifest["counts"]["triples_dropped"]["literal_argument"] == 1


def deps_config(tmp_path: Path, text: bytes):
    from kadapter.deps import DepsConfig

    (tmp_path / "books").mkdir(exist_ok=True)
    (tmp_path / "books/a.txt").write_bytes(text)
    return DepsConfig(input=str(tmp_path / "books"), output_dir=str(tmp_path / "out"),
                      dev_fraction=0.0)


def test_deps_nul_byte_after_the_sniff_is_a_counted_skip(tmp_path):
    from kadapter.deps import SNIFF_BYTES, build_deps

    good = b"The cat sat on the mat today.\n" * (SNIFF_BYTES // 30 + 1)
    config = deps_config(tmp_path, good + b"Binary \x00\x01\x02 junk here now.\n" + good[:31])
    manifest = build_deps(config, seed=1)
    assert manifest["counts"]["lines"]["binary"] == 1
    assert {"file": str(tmp_path / "books/a.txt"), "line": SNIFF_BYTES // 30 + 2,
            "reason": "binary"} in manifest["skipped_line_examples"]


def test_deps_binary_file_is_a_clear_error(tmp_path):
    from kadapter.deps import build_deps

    with pytest.raises(InputError, match=r"a\.txt: contains NUL bytes"):
        build_deps(deps_config(tmp_path, b"\x1f\x8b\x08\x00\x00binary"), seed=1)


@pytest.fixture(scope="module")
def tiny_tokens(tiny_model_dir):
    from kadapter import lama
    from kadapter.modeling import load_tokenizer

    return lama.ProbeTokens(load_tokenizer(str(tiny_model_dir)))


def lama_dir(tmp_path: Path, facts: dict[str, bytes], template: str = "[X] is in [Y] .") -> Path:
    root = tmp_path / "lama"
    (root / "TREx").mkdir(parents=True)
    lines = [json.dumps({"relation": name, "template": template}) for name in facts]
    (root / "relations.jsonl").write_text("\n".join(lines) + "\n")
    for name, content in facts.items():
        (root / "TREx" / f"{name}.jsonl").write_bytes(content)
    return root


def fact_line(sub: str, obj: str, relation: str = "P17") -> bytes:
    return json.dumps({"sub_label": sub, "obj_label": obj, "predicate_id": relation}).encode() + b"\n"


def test_lama_empty_facts_file_is_reported_not_probed(tmp_path):
    from kadapter import lama

    relations, _ = lama.read_trex(lama_dir(tmp_path, {"P17": fact_line("Paris", "France"),
                                                     "P19": b""}))
    assert lama.empty_relations(relations) == ["P19"]
    results = {"preset": "t", "model": "m", "variants": ["encoder"],
               "person_name_filter": {"ran": False, "bert_model": None, "top_k": 10},
               "subsets": {"trex": {"encoder": {"p@1": 0.5, "p@10": 1.0, "mrr": 0.7, "mrr@10": 0.7,
                                                "relations": 1}}},
               "facts": {"trex": {"kept": 1, "read": 1, "dropped_by_reason": {},
                                  "relations_with_empty_facts_file": ["P19"]}}}
    assert "Not probed, their facts file is empty: LAMA-T-REx P19." in lama.results_markdown(results)


def test_lama_subject_holding_the_mask_token_is_dropped(tiny_tokens):
    from kadapter import lama

    mask = tiny_tokens.tokenizer.mask_token
    relation = lama.Relation("P17", "[X] is in [Y] .", [
        lama.Fact("P17", f"Paris {mask}", "France", "f:1"), lama.Fact("P17", "Paris", "France", "f:2")])
    words = ["France"]
    vocabulary = lama.CommonVocabulary(words, tiny_tokens)
    kept, dropped = lama.select_queries("trex", [relation], tiny_tokens, vocabulary, 64)
    assert [d["reason"] for d in dropped] == ["extra_mask_token"]
    assert [q.sub_label for q in kept] == ["Paris"]
    assert all(q.ids.count(tiny_tokens.mask_id) == 1 for q in kept)


LAMA_ERRORS = {
    "common_vocab_not_utf8": ("vocab", b"Paris\nFran\xe7e\n", r"vocab\.txt, record line 2: not UTF-8 \(byte offset 10"),
    "common_vocab_empty": ("vocab", b"\n\n", r"vocab\.txt: the common vocabulary is empty"),
    "facts_truncated_json": ("facts", b'{"sub_label": "Paris", "obj_lab', r"P17\.jsonl, record line 1"),
    "facts_missing_label": ("facts", b'{"sub_label": "Paris"}\n', r"P17\.jsonl, record line 1"),
    "template_without_object": ("template", b"", r"relations\.jsonl, record line 1"),
}


@pytest.mark.parametrize("case", sorted(LAMA_ERRORS))
def test_lama_bad_input_is_a_clear_error(tmp_path, case):
    from kadapter import lama

    kind, content, message = LAMA_ERRORS[case]
    with pytest.raises(CLEAR_ERRORS, match=message):
        if kind == "vocab":
            (tmp_path / "vocab.txt").write_bytes(content)
            lama.read_common_vocab(tmp_path / "vocab.txt")
        elif kind == "facts":
            lama.read_trex(lama_dir(tmp_path, {"P17": content}))
        else:
            lama.read_trex(lama_dir(tmp_path, {"P17": fact_line("a", "b")}, template="[X] is."))


def typing_files(tmp_path: Path, labels: list[str], start: int = 0) -> dict[str, Path]:
    record = {"sent": "Paris is a city .", "start": start, "end": 5, "labels": labels}
    files = {}
    for split in ("train", "dev", "test"):
        files[split] = tmp_path / f"{split}.json"
        files[split].write_text(json.dumps([record]))
    return files


FIGER_CASES = {
    "unknown_type": ({"labels": ["/location"]}, ["/location/cty"], 0, r"train\.json.*unknown type"),
    "no_vocabulary": ({}, ["/location"], 0, "needs its type vocabulary"),
    "labels_file_missing": ({"labels_file": "nowhere.txt"}, ["/location"], 0, "nowhere.txt: cannot read"),
    "mention_outside": ({"labels": ["/location"]}, ["/location"], 9, r"train\.json.*mention"),
}


@pytest.mark.parametrize("case", sorted(FIGER_CASES))
def test_figer_bad_input_is_a_clear_error(tmp_path, case):
    from kadapter.finetune import TASKS, TaskConfig, configured_labels

    settings, labels, start, message = FIGER_CASES[case]
    task = TASKS["figer"]
    files = typing_files(tmp_path, labels, start)
    with pytest.raises(CLEAR_ERRORS, match=message):
        vocabulary = configured_labels(task, TaskConfig(data_dir=str(tmp_path), **settings))
        task.reader(files["train"], vocabulary)


def test_figer_labels_file_is_the_vocabulary(tmp_path):
    from kadapter.finetune import TASKS, TaskConfig, configured_labels

    (tmp_path / "types.txt").write_text("/location\n/person\n\n")
    settings = TaskConfig(data_dir=str(tmp_path), labels_file=str(tmp_path / "types.txt"))
    assert configured_labels(TASKS["figer"], settings) == ["/location", "/person"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    from transformers import AutoConfig

    from kadapter.modeling import AdapterConfig, KnowledgeAdapter, save_adapter

    encoder_config = AutoConfig.from_pretrained(str(tiny_model_dir))
    adapter = KnowledgeAdapter(AdapterConfig(positions=[0, 6], adapter_size=32,
                                             num_transformer_layers=1),
                               encoder_config.hidden_size, encoder_config.num_hidden_layers)
    directory = tmp_path_factory.mktemp("adapter") / "good"
    save_adapter(directory, adapter, base_model="tiny", encoder_config=encoder_config,
                 task={"name": "t"})
    return directory, encoder_config


def _drop(key):
    return lambda config: config.pop(key)


ADAPTER_CASES = {
    "config_without_encoder": ("config", _drop("encoder"), r"adapter_config\.json: key 'encoder' missing"),
    "config_without_adapter": ("config", _drop("adapter"), r"adapter_config\.json: key 'adapter' missing"),
    "positions_out_of_range": ("config", lambda c: c["adapter"].update(positions=[0, 99]),
                               r"adapter_config\.json: key 'adapter': adapter positions \[99\] out of range"),
    "positions_wrong_type": ("config", lambda c: c["adapter"].update(positions="0,6"),
                             r"adapter_config\.json: key 'adapter': positions"),
    "config_of_another_shape": ("config", lambda c: c["encoder"].update(hidden_size=128),
                                "does not fit this encoder"),
    "config_truncated": ("config_bytes", lambda b: b[:40], r"adapter_config\.json: not valid JSON"),
    "weights_corrupt": ("weights", lambda b: b[:100], r"adapter\.safetensors: cannot read weights"),
    "weights_missing": ("weights", None, r"adapter\.safetensors missing"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter_dir_problems_are_one_line_errors(tmp_path, adapter_dir, case):
    import shutil

    from kadapter.modeling import load_adapter

    source, encoder_config = adapter_dir
    directory = tmp_path / "adapter"
    shutil.copytree(source, directory)
    kind, change, message = ADAPTER_CASES[case]
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter.safetensors"
    if kind == "config":
        config = json.loads(config_path.read_text())
        change(config)
        config_path.write_text(json.dumps(config))
    elif kind == "config_bytes":
        config_path.write_bytes(change(config_path.read_bytes()))
    elif change is None:
        weights_path.unlink()
    else:
        weights_path.write_bytes(change(weights_path.read_bytes()))
    with pytest.raises(AdapterLoadError, match=message) as caught:
        load_adapter(directory, encoder_config)
    assert "\n" not in str(caught.value)


# ================================================================== output directories


def test_a_stage_never_replaces_a_directory_it_did_not_write(tmp_path):
    user = tmp_path / "data"
    (user / "sample").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match=r"data: is not empty and was not written by stage"):
        with atomic_output_dir(user, stage="data_trex"):
            pass
    assert (user / "notes.txt").read_text() == "mine" and (user / "sample").is_dir()


@pytest.mark.parametrize("where", ["repository root", "home", "filesystem root", "working directory"])
def test_protected_directories_are_never_replaced(repo_root, where):
    target = {"repository root": repo_root, "home": Path.home(), "filesystem root": Path("/"),
              "working directory": Path.cwd()}[where]
    with pytest.raises(UnsafeOutputError, match="never replaces it"):
        with atomic_output_dir(target, stage="pretrain"):
            pass


def test_another_stages_output_is_refused_and_its_parent_too(tmp_path):
    with atomic_output_dir(tmp_path / "runs/fac-adapter", stage="pretrain") as out:
        (out / "adapter.safetensors").write_bytes(b"weights")
    with pytest.raises(UnsafeOutputError, match="holds the outputs of stage 'pretrain', not 'eval_lama'"):
        with atomic_output_dir(tmp_path / "runs/fac-adapter", stage="eval_lama"):
            pass
    with pytest.raises(UnsafeOutputError, match=r"other stages' outputs: fac-adapter \(pretrain\)"):
        with atomic_output_dir(tmp_path / "runs", stage="eval_lama"):
            pass
    assert (tmp_path / "runs/fac-adapter/adapter.safetensors").read_bytes() == b"weights"


def test_a_stage_reruns_into_its_own_output_and_empty_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    for _ in range(2):
        for name in ("out", "empty"):
            with atomic_output_dir(tmp_path / name, stage="data_deps") as out:
                (out / "train.parquet").write_bytes(b"rows")
    assert json.loads((tmp_path / "out" / OUTPUT_MARKER).read_text()) == {"stage": "data_deps"}


def test_training_refuses_to_clear_a_foreign_run_directory(tmp_path):
    from test_training import run as toy_run

    (tmp_path / "run/checkpoints").mkdir(parents=True)
    (tmp_path / "run/checkpoints/mine.txt").write_text("user data")
    with pytest.raises(UnsafeOutputError, match="was not written by stage 'train'"):
        toy_run(tmp_path, epochs=1)
    assert (tmp_path / "run/checkpoints/mine.txt").read_text() == "user data"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, capsys):
    from kadapter.io import remove_stale_temporaries

    dead = _dead_pid()
    (tmp_path / f".out.{dead}.abcd1234.tmp").mkdir()
    (tmp_path / f".out.json.{dead}.abcd1234.tmp").write_text("half")
    (tmp_path / f".out.{os.getppid()}.abcd1234.tmp").mkdir()  # a live process's: kept
    (tmp_path / f".other.{dead}.abcd1234.tmp").mkdir()  # another output's: not this one's
    (tmp_path / "user.tmp").write_text("not ours")
    assert remove_stale_temporaries(tmp_path, "out") == 1
    assert remove_stale_temporaries(tmp_path, "out.json") == 1
    assert "removed 1 stale temporary" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.{os.getppid()}.abcd1234.tmp", f".other.{dead}.abcd1234.tmp", "user.tmp"])


def test_a_swap_killed_between_its_renames_gives_the_old_output_back(tmp_path):
    from kadapter.io import remove_stale_temporaries

    moved = tmp_path / f".out.old-{_dead_pid()}"
    moved.mkdir()
    (moved / "a").write_text("previous")
    remove_stale_temporaries(tmp_path, "out")
    assert (tmp_path / "out/a").read_text() == "previous"


def _dead_pid() -> int:
    process = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    process.start()
    process.join()
    return process.pid


# ================================================================== resume security


def test_resume_refuses_a_planted_pickle_and_never_runs_it(tmp_path):
    from test_training import run as toy_run

    from kadapter.training import latest_checkpoint

    toy_run(tmp_path, epochs=1, save_every=5)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert not [p for p in checkpoint.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]
    witness = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        torch.save({"state": Exploit()}, checkpoint / name)
        with pytest.raises(InputError, match=f"holds {re.escape(name)}: pickled state is never loaded"):
            toy_run(tmp_path, epochs=1, save_every=5, resume=True)
        assert not witness.exists()
        (checkpoint / name).unlink()


def test_resume_refuses_a_corrupt_checkpoint_file(tmp_path):
    from test_training import run as toy_run

    from kadapter.training import latest_checkpoint

    toy_run(tmp_path, epochs=1, save_every=5)
    checkpoint = latest_checkpoint(tmp_path / "run")
    (checkpoint / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InputError, match=r"optimizer\.safetensors"):
        toy_run(tmp_path, epochs=1, save_every=5, resume=True)


def test_resume_with_a_changed_config_is_refused_unless_allowed(tmp_path):
    from test_training import run as toy_run
    from test_training import state_bytes

    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path, crash_at_call=27)
    with pytest.raises(ConfigError, match=r"differs in batch_size, learning_rate\)"):
        toy_run(tmp_path, resume=True, learning_rate=1e-2, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path / "logging", crash_at_call=27)
    reference, _ = toy_run(tmp_path / "straight")
    # logging and checkpointing keys are not compared
    resumed, _ = toy_run(tmp_path / "logging", resume=True, log_every=3, keep_checkpoints=3)
    assert resumed.config_changes is None
    assert state_bytes(resumed.model) == state_bytes(reference.model)
    changed, _ = toy_run(tmp_path, resume=True, learning_rate=1e-2,
                         resume_with_changed_config=True)
    assert changed.config_changes == {"learning_rate": {"checkpoint": 3e-2, "now": 1e-2}}


# ================================================================== SIGKILLs


CHILD_LIMIT_S = 600  # a child that runs to completion but never ends is a failure, not a hang


def _private_tqdm_lock() -> None:
    """tqdm's default write lock holds a multiprocessing semaphore shared with forked
    children: a child SIGKILLed while writing a bar would leave it held for the parent and
    every later child (a deadlock seen in this module). Bars here use a lock of their own."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _quiet(target, args):
    _private_tqdm_lock()  # a fresh one: a parent thread may have held the old one at fork
    # The parent's OpenMP threads (torch uses one per physical core) are not in the child:
    # a parallel region there waits for them forever (a hang or a crash seen on 2 cores).
    # One thread keeps torch out of OpenMP regions.
    torch.set_num_threads(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stderr stays: a child's traceback shows
    target(*args)


def in_child(target, *args, kill_after: float | None = None) -> tuple[bool, float]:
    """Run ``target(*args)`` in a forked child; SIGKILL it after ``kill_after`` seconds
    unless it finished. Returns (killed, seconds)."""
    _private_tqdm_lock()
    child = multiprocessing.get_context("fork").Process(target=_quiet, args=(target, args))
    started = time.monotonic()
    child.start()
    child.join(CHILD_LIMIT_S if kill_after is None else kill_after)
    killed = child.is_alive()
    if killed:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        if kill_after is None:
            raise AssertionError(f"{target.__name__} did not end within {CHILD_LIMIT_S} s")
    elif child.exitcode != 0:
        raise AssertionError(f"{target.__name__} failed in the child (exit code {child.exitcode})")
    return killed, time.monotonic() - started


def tree_bytes(directory: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in names if (directory / name).exists()}


def temporaries(root: Path) -> list[str]:
    """Temporaries anywhere under ``root`` (outside resumable ``.partial`` staging)."""
    found = []
    for path in root.rglob("*"):
        if any(part.endswith(".partial") for part in path.relative_to(root).parts[:-1]):
            continue
        if re.search(r"\.tmp(\.png)?$|\.old-\d+$", path.name):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def kill_repeatedly(target, args, output: Path, names: tuple[str, ...], kills: int,
                    rng: random.Random, root: Path) -> dict[str, int]:
    """A complete run, then ``kills`` reruns SIGKILLed at random points: after each the
    previous output must be intact (no half output, nothing lost); then a complete rerun
    must remove the temporaries and give the same bytes."""
    _, duration = in_child(target, *args)
    reference = tree_bytes(output, names)
    assert set(reference) == set(names), f"{output}: {sorted(reference)}"
    figures = {"kills": 0, "half_outputs": 0, "previous_lost": 0, "temporaries_after_kill": 0}
    for _ in range(kills):
        killed, _ = in_child(target, *args, kill_after=rng.uniform(0.05, 0.8) * duration)
        figures["kills"] += killed
        now = tree_bytes(output, names)
        figures["previous_lost"] += set(now) != set(reference)
        figures["half_outputs"] += now != reference
        figures["temporaries_after_kill"] += len(temporaries(root))
    in_child(target, *args)
    assert tree_bytes(output, names) == reference, "a rerun after kills gives other bytes"
    assert temporaries(root) == [], "the next run removes what killed runs left"
    assert figures["half_outputs"] == figures["previous_lost"] == 0, figures
    print(f"\n{output.name}: {figures}")
    return {**figures, "seconds": duration}


@pytest.fixture(scope="module")
def sample(repo_root):
    return load_config(repo_root / "configs/sample.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    """The kill tests' directory. What every stage imports is imported here once, so that
    the forked children do not each import it again."""
    import matplotlib.pyplot  # noqa: F401
    import spacy  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    from transformers import RobertaForMaskedLM, RobertaModel, RobertaTokenizerFast  # noqa: F401

    from kadapter import deps, lama, pretrain, trex  # noqa: F401

    return tmp_path_factory.mktemp("kills")


def _trex(config, seed, output):
    from kadapter.trex import build_trex_rc

    build_trex_rc(config, seed, output)


def _deps(config, seed):
    from kadapter.deps import build_deps

    build_deps(config, seed)


def _pretrain(config, task, resume):
    from kadapter.pretrain import run_pretraining

    run_pretraining(config, task, resume=resume)


def _lama(config):
    from kadapter.lama import run_lama

    run_lama(config)


def test_killed_data_stages_keep_the_previous_output(sample, workdir, repo_root):
    rng = random.Random(SEED)
    trex = dataclasses.replace(sample.data_trex, input=str(repo_root / "data/sample/trex"))
    kill_repeatedly(_trex, (trex, sample.seed, workdir / "trex_rc"), workdir / "trex_rc",
                    ("train.parquet", "dev.parquet", "relations.json", OUTPUT_MARKER), 3, rng,
                    workdir)
    deps = dataclasses.replace(sample.data_deps, input=str(repo_root / "data/sample/books"),
                               output_dir=str(workdir / "deps"), max_sentences=100)
    kill_repeatedly(_deps, (deps, sample.seed), workdir / "deps",
                    ("train.parquet", "dev.parquet", OUTPUT_MARKER), 2, rng, workdir)


def pretrain_config(repo_root: Path, workdir: Path, name: str):
    return load_config(repo_root / "configs/sample.yaml", [
        "--data_dir", str(workdir / "trex_rc"), "--output_dir", str(workdir / name),
        "--cache_dir", str(workdir / "cache"), "--max_steps", "6", "--save_every", "2",
        "--eval_every", "3"], default_section="pretrain_fac")


ADAPTER_FILES = ("adapter.safetensors", "adapter_config.json", OUTPUT_MARKER)


def test_killed_pretraining_keeps_the_previous_adapter_and_resumes_bit_identical(
        repo_root, workdir, sample):
    if not (workdir / "trex_rc/train.parquet").exists():
        trex = dataclasses.replace(sample.data_trex, input=str(repo_root / "data/sample/trex"))
        in_child(_trex, trex, sample.seed, workdir / "trex_rc")
    rng = random.Random(SEED + 1)
    config = pretrain_config(repo_root, workdir, "fac-adapter")
    duration = kill_repeatedly(_pretrain, (config, "fac", False), workdir / "fac-adapter",
                               ADAPTER_FILES, 2, rng, workdir)["seconds"]
    reference = tree_bytes(workdir / "fac-adapter", ADAPTER_FILES)

    # killed runs resumed: the adapter equals the uninterrupted run's, byte for byte
    resumed = identical = 0
    for _ in range(2):
        killed, _ = in_child(_pretrain, config, "fac", False,
                             kill_after=rng.uniform(0.5, 0.9) * duration)
        assert tree_bytes(workdir / "fac-adapter", ADAPTER_FILES) == reference
        in_child(_pretrain, config, "fac", True)
        resumed += killed
        identical += tree_bytes(workdir / "fac-adapter", ADAPTER_FILES) == reference
    assert identical == 2 and temporaries(workdir) == []
    print(f"\npretraining: {resumed} killed and resumed, {identical} bit-identical")
    # no pickle anywhere in what the checkpoints hold: safetensors and JSON only
    files = list(workdir.rglob("checkpoints/step-*/*"))
    assert files and {p.suffix for p in files} <= {".safetensors", ".json"}
    assert not [p for p in files if p.read_bytes().startswith(b"\x80")]


def test_killed_lama_evaluation_keeps_the_previous_results(repo_root, workdir):
    if not (workdir / "fac-adapter/adapter_config.json").exists():
        pytest.skip("needs the fac adapter of the pretraining kill test")
    config = load_config(repo_root / "configs/sample.yaml", [
        "--fac_adapter", str(workdir / "fac-adapter"), "--output_dir", str(workdir / "lama"),
        "--subsets", "[trex, google_re]", "--variants", "[encoder, fac]",
        "--train_mlm_head", "false"], default_section="lama")
    kill_repeatedly(_lama, (config,), workdir / "lama",
                    ("results.json", "trex/dropped.jsonl", "trex/fac/predictions.jsonl",
                     OUTPUT_MARKER), 2, random.Random(SEED + 2), workdir)
