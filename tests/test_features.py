"""The feature stage (kadapter.features): the cache equals the one-example-at-a-time
reference features exactly, is built once and reused, rebuilt when an input changes,
written atomically, memory-mapped; bad input and bad spans are errors naming the record."""

from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import kadapter.features as features
from kadapter.features import (
    Chunk,
    MappedFeatures,
    check_spans,
    finetune_features,
    open_cache,
    pretrain_features,
)
from kadapter.io import InputError, atomic_write_json
from kadapter.modeling import load_tokenizer
from kadapter.pretrain import fac_features, lin_features
from kadapter.tasks import TASKS, collate

RELATIONS = ["P17", "P19", "P47"]
SAMPLE = {"typing": "data/sample/openentity", "figer": "data/sample/figer", "csqa": "data/sample/csqa",
          "cosmosqa": "data/sample/cosmosqa", "tacred": "data/sample/tacred"}
# subject, object: unicode, split bytes, subject after object, mentions at both ends
FAC_CASES = [
    ("Paris is the capital of France.", "Paris", "France"),
    ("The river flows (from Zürich) into Lake Constance.", "Zürich", "Lake Constance"),
    ("Ulm, where Albert Einstein was born, lies on the Danube.", "Albert Einstein", "Ulm"),
    ("São Tomé and Príncipe is in Africa", "São Tomé and Príncipe", "Africa"),
    ("東京 is the capital of 日本 😀 since 1869", "日本 😀", "東京"),
    ("1879-03-14: born in Ulm", "Ulm", "1879"),
    ("A long sentence " + "with many words " * 12 + "ends in Berlin near Potsdam", "Berlin", "Potsdam"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def fac_rows(cases=FAC_CASES) -> list[dict]:
    rows = []
    for i, (sentence, subject, obj) in enumerate(cases):
        s, o = sentence.index(subject), sentence.index(obj)
        relation = RELATIONS[i % len(RELATIONS)]
        rows.append({"sentence": sentence, "subj_start": s, "subj_end": s + len(subject),
                     "obj_start": o, "obj_end": o + len(obj), "relation": relation,
                     "label": RELATIONS.index(relation)})
    return rows


def write_fac(directory: Path, rows: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        pd.DataFrame(rows).to_parquet(directory / f"{split}.parquet")
    atomic_write_json(directory / "relations.json", RELATIONS)
    return directory


def assert_same_table(mapped: MappedFeatures, reference) -> None:
    assert len(mapped) == len(reference)
    for name, (values, offsets) in reference.ragged.items():
        assert np.array_equal(np.asarray(mapped.ragged[name][0]), values), name
        assert np.array_equal(np.asarray(mapped.ragged[name][1]), offsets), name
    assert set(mapped.scalar) == set(reference.scalar)
    for name, column in reference.scalar.items():
        assert np.array_equal(np.asarray(mapped.scalar[name]), column), name


@pytest.mark.parametrize("max_length", [64, 14])  # 14 cuts mentions away: skipped, counted
def test_fac_cache_equals_reference(tmp_path, tokenizer, max_length):
    data = write_fac(tmp_path / "data", fac_rows() * 3)
    reference, counts = fac_features(data / "train.parquet", tokenizer, max_length, RELATIONS)
    built = pretrain_features("fac", data, tmp_path / "cache", tokenizer, max_length, workers=1)
    assert_same_table(built["train"], reference)
    assert built["counts"]["train"]["examples"] == counts["examples"]
    assert built["counts"]["train"]["skipped_truncated"] == counts.get("skipped_truncated", 0)
    if max_length == 14:
        assert counts["skipped_truncated"] > 0


def test_lin_cache_equals_reference(tmp_path, tokenizer):
    rows = [{"text": "The cat sat on the mat.", "word_starts": [0, 4, 8, 12, 15, 19, 22],
             "word_ends": [3, 7, 11, 14, 18, 22, 23], "heads": [2, 3, 0, 3, 6, 4, 3]},
            {"text": "Dogs bark loudly", "word_starts": [0, 5, 10], "word_ends": [4, 9, 16],
             "heads": [2, 0, 2]}] * 5
    for split in ("train", "dev"):
        pd.DataFrame(rows).to_parquet(tmp_path / f"{split}.parquet")
    reference, _ = lin_features(tmp_path / "train.parquet", tokenizer, 6)
    built = pretrain_features("lin", tmp_path, tmp_path / "cache", tokenizer, 6, workers=1)
    assert_same_table(built["train"], reference)


def sample_files(task, repo_root: Path) -> dict[str, Path]:
    return {split: repo_root / SAMPLE[task.name] / name
            for split, name in zip(("train", "dev", "test"), task.files)}


def settings_for(task, files: dict[str, Path], max_length: int = 64):
    """The task's settings; FIGER's type vocabulary (required) is the files' own types."""
    from kadapter.finetune import TaskConfig

    labels = None
    if task.name == "figer":
        labels = sorted({label for path in files.values() for record in json.loads(path.read_text())
                         for label in record["labels"]})
    return TaskConfig(data_dir=str(next(iter(files.values())).parent), max_length=max_length,
                      labels=labels)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("max_length", [64, 20])  # 20: some examples too long / truncated
def test_finetune_cache_equals_task_encode(tmp_path, tokenizer, repo_root, name, max_length):
    task = TASKS[name]
    files = sample_files(task, repo_root)
    settings = settings_for(task, files, max_length)
    built = finetune_features(task, settings, files, tokenizer, tmp_path, workers=1)
    configured = settings.labels if settings.labels is not None else task.default_labels
    examples = {split: task.reader(path, configured) for split, path in files.items()}
    labels = task.label_space([e for split in examples.values() for e in split], configured)
    assert built.labels == labels
    for split, split_examples in examples.items():
        encoded = task.encode(split_examples, tokenizer, labels, max_length)
        mapped = built.splits[split]
        assert len(mapped) == len(encoded.features)
        assert built.counts[split]["too_long"] == len(encoded.too_long)
        if split != "train":  # counted from the chunks' encodings, as count_longer counts
            longer = task.count_longer(split_examples, tokenizer, max_length)
            assert built.counts[split]["truncated"] == longer - len(encoded.too_long)
        positions = {id(e): i for i, e in enumerate(split_examples)}
        assert built.kept[split].tolist() == [positions[id(e)] for e in encoded.examples]
        pad = tokenizer.pad_token_id
        ours = collate([mapped[i] for i in range(len(mapped))], pad, len(labels))
        theirs = collate(encoded.features, pad)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), (split, key)


def test_pool_builds_the_same_bytes(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(features, "CHUNK_ROWS", 4)  # several chunks over 2 workers
    data = write_fac(tmp_path / "data", fac_rows() * 3)
    one = pretrain_features("fac", data, tmp_path / "one", tokenizer, 64, workers=1)["cache"]
    two = pretrain_features("fac", data, tmp_path / "two", tokenizer, 64, workers=2)["cache"]
    for path in sorted(Path(one).rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (Path(two) / path.relative_to(one)).read_bytes(), path.name


def test_cache_is_built_once_shared_and_rebuilt_on_change(tmp_path, tokenizer, repo_root, monkeypatch):
    task = TASKS["figer"]
    directory = tmp_path / "figer"
    directory.mkdir()
    for path in sample_files(task, repo_root).values():
        (directory / path.name).write_bytes(path.read_bytes())
    files = {split: directory / path.name for split, path in sample_files(task, repo_root).items()}
    settings = settings_for(task, files)
    first = finetune_features(task, settings, files, tokenizer, tmp_path / "cache", workers=1)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("features rebuilt although cached")

    monkeypatch.setattr(features, "mention_chunk", no_tokenizing)
    again = finetune_features(task, settings, files, tokenizer, tmp_path / "cache", workers=1)
    assert again.cache == first.cache  # every variant and process maps this one copy
    assert isinstance(again.splits["train"].ragged["input_ids"][0], np.memmap)
    records = json.loads(files["train"].read_text())
    records[0]["sent"] += " Changed."
    files["train"].write_text(json.dumps(records))
    with pytest.raises(AssertionError, match="rebuilt"):  # another input, another key
        finetune_features(task, settings, files, tokenizer, tmp_path / "cache", workers=1)


def test_bad_input_names_file_and_record_and_leaves_no_cache(tmp_path, tokenizer):
    rows = fac_rows()
    rows[4]["label"] = 0  # relation P19 with label 0 (P17)
    data = write_fac(tmp_path / "data", rows)
    with pytest.raises(InputError, match=r"train\.parquet, record 4: label 0 does not match"):
        pretrain_features("fac", data, tmp_path / "cache", tokenizer, 64, workers=1)
    rows = fac_rows()
    rows[2]["obj_end"] = 999
    data = write_fac(tmp_path / "data", rows)
    with pytest.raises(InputError, match=r"record 2: bad subject/object offsets"):
        pretrain_features("fac", data, tmp_path / "cache", tokenizer, 64, workers=1)
    rows = fac_rows()
    rows[1]["sentence"] = None
    data = write_fac(tmp_path / "data", rows)
    with pytest.raises(InputError, match=r"record 1: bad subject/object offsets"):
        pretrain_features("fac", data, tmp_path / "cache", tokenizer, 64, workers=1)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_out_of_range_span_is_an_error_at_build_naming_the_record(tmp_path):
    lengths = np.array([5, 4])
    chunk = Chunk({"input_ids": (np.arange(9, dtype=np.int32), lengths)},
                  {"span_start": np.array([[1], [2]]), "span_end": np.array([[3], [6]]),
                   "marker": np.array([[0], [1]])}, np.array([10, 11]), Counter())
    with pytest.raises(InputError, match=r"x\.json, record 11: token span.*outside the example's 4 tokens"):
        check_spans(tmp_path / "x.json", chunk)
    chunk.scalar["span_end"][1, 0] = 4
    check_spans(tmp_path / "x.json", chunk)


def test_typing_labels_are_ids_multi_hot_per_batch(tmp_path, tokenizer, repo_root):
    task = TASKS["figer"]
    files = sample_files(task, repo_root)
    built = finetune_features(task, settings_for(task, files), files, tokenizer, tmp_path, workers=1)
    train = built.splits["train"]
    assert "labels" not in train.scalar and train.ragged["label_ids"][0].dtype == np.int32
    item = train[0]
    batch = collate([item], tokenizer.pad_token_id, len(built.labels))
    assert batch["labels"].shape == (1, len(built.labels))
    assert batch["labels"][0].nonzero().flatten().tolist() == sorted(item["label_ids"].tolist())
    assert open_cache(built.cache)["train"].lengths.dtype == np.int32


def test_process_group_timeout_comes_from_the_config():
    from kadapter.training import TrainingConfig, make_accelerator

    assert TrainingConfig().process_group_timeout_s == 7200
    accelerator = make_accelerator(TrainingConfig(process_group_timeout_s=3600))
    assert accelerator.init_handler.timeout == timedelta(seconds=3600)


@pytest.mark.parametrize("max_length", [64, 24])  # 24 truncates most of the real sentences
def test_fac_cache_equals_reference_on_the_real_trex_sample(tmp_path, tokenizer, shared_real,
                                                            monkeypatch, max_length):
    """The T-REx stage's rows from the real T-REx sample (several entity pairs per
    sentence, markers beside brackets, IPA, semicolons, at the sentence start): the word
    path's cache equals the reference, in one process or in chunks over a pool."""
    from kadapter.trex import TrexConfig, build_trex_rc

    config = TrexConfig(input=str(shared_real / "trex-sample-output.json"), min_entity_count=1,
                        min_relation_pairs=1, dev_fraction=0.0)
    data = tmp_path / "rc"
    build_trex_rc(config, seed=0, output_dir=data)
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(data / "train.parquet"), data / "dev.parquet")
    relations = json.loads((data / "relations.json").read_text())
    reference, counts = fac_features(data / "train.parquet", tokenizer, max_length, relations)
    assert counts["rows"] == 70
    one = pretrain_features("fac", data, tmp_path / "one", tokenizer, max_length, workers=1)
    assert_same_table(one["train"], reference)
    assert one["counts"]["train"]["skipped_truncated"] == counts.get("skipped_truncated", 0)
    monkeypatch.setattr(features, "CHUNK_ROWS", 16)
    two = pretrain_features("fac", data, tmp_path / "two", tokenizer, max_length, workers=2)
    for path in sorted(Path(one["cache"]).rglob("*")):
        if path.is_file() and path.name != "features.json":
            assert path.read_bytes() == (Path(two["cache"]) / path.relative_to(one["cache"])).read_bytes()
