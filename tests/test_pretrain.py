"""Adapter pretraining on the tiny model: features, heads, metrics, the sample runs."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import kadapter.features as features
import kadapter.pretrain as pretrain
from kadapter.config import load_config
from kadapter.features import open_cache, pretrain_features
from kadapter.io import InputError, atomic_write_json, read_json
from kadapter.modeling import KnowledgeAdapter, load_adapter, load_encoder, load_tokenizer
from kadapter.pretrain import (
    HeadPositionHead,
    RelationHead,
    build_head,
    classification_metrics,
    fac_features,
    lin_features,
    majority_baseline,
    run_pretraining,
)
from kadapter.training import PadCollator

RELATIONS = ["P17", "P19", "P47"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def fac_row(sentence: str, subject: str, obj: str, relation: str = "P47", nth_obj: int = 0) -> dict:
    s = sentence.index(subject)
    o = [i for i in range(len(sentence)) if sentence.startswith(obj, i)][nth_obj]
    return {"docid": "Q1", "sentence": sentence, "subj_start": s, "subj_end": s + len(subject),
            "obj_start": o, "obj_end": o + len(obj), "subj_uri": "Q1", "obj_uri": "Q2",
            "relation": relation, "label": RELATIONS.index(relation)}


def write_trex(directory, train_rows, dev_rows=None):
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("dev", dev_rows or train_rows)):
        pd.DataFrame(rows).to_parquet(directory / f"{split}.parquet")
    atomic_write_json(directory / "relations.json", RELATIONS)
    return directory


# ------------------------------------------------------------------ factual features

MENTION_CASES = [
    ("Paris is the capital of France.", "Paris", "France"),
    ("The river flows (from Zürich) into Lake Constance.", "Zürich", "Lake Constance"),
    ("Ulm, where Albert Einstein was born, lies on the Danube.", "Albert Einstein", "Ulm"),
    ("Poland borders Germany;Germany borders Poland.", "Germany", "Poland"),
    ("São Tomé and Príncipe is in Africa", "São Tomé and Príncipe", "Africa"),
    ("1879-03-14: born in Ulm", "Ulm", "1879"),
]


@pytest.mark.parametrize("sentence,subject,obj", MENTION_CASES)
@pytest.mark.parametrize("pooling", ["entity", "marker"])
def test_pooled_positions_decode_to_the_mentions(tmp_path, tokenizer, sentence, subject, obj, pooling):
    path = write_trex(tmp_path, [fac_row(sentence, subject, obj)]) / "train.parquet"
    table, counts = fac_features(path, tokenizer, 64, RELATIONS)
    assert counts == {"rows": 1, "examples": 1}
    item = table[0]
    ids = item["input_ids"]
    decode = tokenizer.decode
    assert decode(ids[item["subj_start"]:item["subj_end"]]).strip() == subject
    assert decode(ids[item["obj_start"]:item["obj_end"]]).strip() == obj
    assert decode(ids[item["subj_marker"]:item["subj_marker"] + 1]).strip().endswith("@")
    assert decode(ids[item["obj_marker"]:item["obj_marker"] + 1]).strip().endswith("#")
    # the head pools exactly these positions: feed position numbers as features
    batch = {k: torch.tensor([v]) for k, v in item.items() if k != "input_ids"}
    features = torch.arange(len(ids), dtype=torch.float32).view(1, -1, 1)
    pooled = RelationHead(1, len(RELATIONS), pooling=pooling).pool(features, batch)
    if pooling == "entity":
        expected = [np.mean(range(item["subj_start"], item["subj_end"])),
                    np.mean(range(item["obj_start"], item["obj_end"]))]
    else:
        expected = [item["subj_marker"], item["obj_marker"]]
    assert pooled.flatten().tolist() == pytest.approx(expected)


def test_mentions_cut_by_max_length_are_skipped_and_counted(tmp_path, tokenizer):
    long = "Paris is the capital of France" + ", and so on" * 30 + " near Lyon."
    rows = [fac_row(long, "Paris", "France"), fac_row(long, "Paris", "Lyon")]
    path = write_trex(tmp_path, rows) / "train.parquet"
    table, counts = fac_features(path, tokenizer, 32, RELATIONS)
    assert counts == {"rows": 2, "examples": 1, "skipped_truncated": 1}
    assert len(table) == 1 and len(table[0]["input_ids"]) <= 32


@pytest.mark.parametrize("change,record,message", [
    ({"label": 0}, 1, "does not match relation 'P47'"),
    ({"obj_end": 400}, 1, "bad subject/object offsets"),
    ({"obj_start": 2, "obj_end": 4}, 1, "overlap"),
])
def test_bad_trex_rows_name_the_file_and_record(tmp_path, tokenizer, change, record, message):
    rows = [fac_row("Paris is in France.", "Paris", "France"),
            {**fac_row("Paris is in France.", "Paris", "France"), **change}]
    path = write_trex(tmp_path, rows) / "train.parquet"
    with pytest.raises(InputError, match=message) as caught:
        fac_features(path, tokenizer, 64, RELATIONS)
    assert caught.value.path == str(path) and caught.value.record == record


def test_missing_column_is_an_input_error(tmp_path, tokenizer):
    path = tmp_path / "train.parquet"
    pd.DataFrame([{"sentence": "x"}]).to_parquet(path)
    with pytest.raises(InputError, match="missing column"):
        fac_features(path, tokenizer, 64, RELATIONS)


def test_corrupt_parquet_is_an_input_error(tmp_path, tokenizer):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        fac_features(path, tokenizer, 64, RELATIONS)


@pytest.mark.parametrize("argv,code,message", [
    ([], 2, "--task fac|lin is required"),
    (["--help"], 0, "--task fac|lin"),
    (["--task", "lin", "--help"], 0, "--max_length"),
    (["--task", "fac", "--bogus", "1"], 2, "unknown key(s) ['bogus']"),
    (["--task", "fac", "--pooling", "cls"], 2, "is not one of ['entity', 'marker']"),
    (["--task", "fac", "--data_dir", "MISSING"], 2, "train.parquet: not found"),
])
def test_command_line(tmp_path, capsys, tiny_model_dir, argv, code, message):
    from pipelines.pretrain import main

    argv = [str(tmp_path / a) if a == "MISSING" else a for a in argv]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == code
    out = capsys.readouterr()
    assert message in (out.out if code == 0 else out.err)


# ------------------------------------------------------------------ linguistic features


def deps_row(words: list[str], heads: list[int]) -> dict:
    text, starts, ends = "", [], []
    for word in words:
        text += (" " if text else "")
        starts.append(len(text))
        text += word
        ends.append(len(text))
    return {"text": text, "words": words, "word_starts": starts, "word_ends": ends,
            "heads": heads, "deprels": ["dep"] * len(words)}


def test_lin_features_label_head_positions(tmp_path, tokenizer):
    rows = [deps_row(["The", "keeper", "lit", "the", "lamp", "."], [2, 3, 0, 5, 3, 3])]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    table, counts = lin_features(tmp_path / "train.parquet", tokenizer, 64)
    assert counts["examples"] == 1 and counts["labelled"] == 6
    ids, labels = table[0]["input_ids"], table[0]["labels"]
    labelled = np.flatnonzero(labels != -100)
    words = [tokenizer.decode(ids[p:q]).strip()
             for p, q in zip(labelled, [*labelled[1:], len(ids) - 1])]
    assert words == ["The", "keeper", "lit", "the", "lamp", "."]
    heads = {words[k]: labels[p] for k, p in enumerate(labelled)}
    assert heads["lit"] == 0  # root -> <s>
    assert heads["keeper"] == labelled[2] and heads["lamp"] == labelled[2]


def test_bad_dependency_row_names_the_record(tmp_path, tokenizer):
    rows = [deps_row(["A", "b"], [0, 1]), deps_row(["A", "b"], [0, 5])]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(InputError, match="head 5") as caught:
        lin_features(tmp_path / "train.parquet", tokenizer, 64)
    assert caught.value.record == 1


# ------------------------------------------------------------------ cache, heads, metrics


def test_features_are_cached_and_keyed(tmp_path, tokenizer, monkeypatch):
    data = write_trex(tmp_path / "data", [fac_row(*case) for case in MENTION_CASES])
    first = pretrain_features("fac", data, tmp_path / "cache", tokenizer, 64, workers=1)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("features rebuilt although cached")

    monkeypatch.setattr(features, "fac_chunk", no_tokenizing)
    again = pretrain_features("fac", data, tmp_path / "cache", tokenizer, 64, workers=1)
    assert again["cache"] == first["cache"] and len(again["train"]) == len(MENTION_CASES)
    with pytest.raises(AssertionError, match="rebuilt"):  # another max_length, another key
        pretrain_features("fac", data, tmp_path / "cache", tokenizer, 48, workers=1)


def test_head_position_head_masks_padding():
    torch.manual_seed(0)
    head = HeadPositionHead(8).eval()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    states = torch.randn(2, 5, 8)
    logits = head(states, states, {"attention_mask": mask})
    assert logits.shape == (2, 5, 5)
    assert bool((logits[0, :, 3:] < -1e30).all()) and bool((logits[1] > -1e30).all())


@pytest.mark.parametrize("pred,gold,expected", [
    ([0, 1, 2, 2], [0, 1, 2, 2], {"accuracy": 1.0, "micro_f1": 1.0, "macro_f1": 1.0}),
    # class 0: P=1/2 R=1/2 F=1/2; class 1: P=1/2 R=1 F=2/3; class 2: never predicted F=0
    ([0, 1, 1, 0], [0, 0, 1, 2], {"accuracy": 0.5, "micro_f1": 0.5, "macro_f1": 7 / 18}),
])
def test_classification_metrics(pred, gold, expected):
    assert classification_metrics(np.array(pred), np.array(gold)) == pytest.approx(expected)


def test_majority_baseline():
    assert majority_baseline(np.array([2, 2, 1, 0, 2]), np.array([2, 1, 2, 2])) == {
        "label": 2, "accuracy": 0.75}


# ------------------------------------------------------------------ the sample runs


@pytest.fixture(scope="module")
def sample_dirs(tmp_path_factory, tiny_model_dir):
    """The sample preset's T-REx-rc and dependency data, built into a temporary directory."""
    from kadapter.deps import build_deps
    from kadapter.trex import build_trex_rc

    root = tmp_path_factory.mktemp("sample")
    config = load_config("configs/sample.yaml")
    build_trex_rc(config.data_trex, seed=config.seed, output_dir=root / "trex_rc")
    deps = dataclasses.replace(config.data_deps, output_dir=str(root / "deps"))
    build_deps(deps, seed=config.seed)
    return root


def sample_config(sample_dirs, task: str, run: str, *overrides: str):
    args = ["--data_dir", str(sample_dirs / ("trex_rc" if task == "fac" else "deps")),
            "--output_dir", str(sample_dirs / run), "--cache_dir", str(sample_dirs / "cache"),
            *overrides]
    return load_config("configs/sample.yaml", args, default_section=f"pretrain_{task}")


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


def test_sample_fac_beats_majority_and_leaves_encoder_untouched(sample_dirs, tiny_model_dir,
                                                                monkeypatch):
    loaded = []

    def recording_load_encoder(*args, **kwargs):
        loaded.append(load_encoder(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(pretrain, "load_encoder", recording_load_encoder)
    manifest = run_pretraining(sample_config(sample_dirs, "fac", "fac"), "fac")
    accuracy = manifest["dev_metrics"]["accuracy"]
    majority = manifest["majority_baseline"]["accuracy"]
    print(f"\nfac dev accuracy {accuracy:.4f} vs majority-class baseline {majority:.4f}")
    assert accuracy > majority + 0.1
    assert set(manifest["dev_metrics"]) == {"accuracy", "micro_f1", "macro_f1"}
    # the trained encoder object is bit-identical to a fresh load of the same weights
    assert weights_digest(loaded[0]) == weights_digest(load_encoder(str(tiny_model_dir)))

    run_dir = sample_dirs / "fac"
    for name in ("adapter_config.json", "adapter.safetensors", "metrics.jsonl", "curves.png",
                 "manifest.json"):
        assert (run_dir / name).is_file(), name
    assert manifest["features"]["counts"]["train"]["examples"] > 500
    assert manifest["training"]["tokens_per_s"] > 0

    # the saved adapter + head rebuild and score the dev set as during training
    assert rescored_accuracy(run_dir, loaded[0], manifest) == pytest.approx(accuracy)
    saved = read_json(run_dir / "adapter_config.json")["task"]
    assert saved["labels"] == read_json(sample_dirs / "trex_rc" / "relations.json")


def rescored_accuracy(run_dir, encoder, manifest) -> float:
    """Dev accuracy of a saved fac adapter + head, recomputed in this process."""
    saved = load_adapter(run_dir, encoder.config)
    head = build_head(saved.config["task"]["head"])
    head.load_state_dict(saved.head_state, strict=True)
    model = pretrain.PretrainModel(saved.adapter, head).eval()
    dev = open_cache(manifest["features"]["cache"])["dev"]
    batch = PadCollator({"input_ids": 1})([dev[i] for i in range(len(dev))])
    with torch.no_grad():
        states = pretrain.encode_hidden_states(encoder.eval(), batch)
        pred = model(states, batch).argmax(-1)
    return float((pred == batch["label"]).double().mean())


def test_sample_lin_learns_head_positions(sample_dirs):
    manifest = run_pretraining(sample_config(sample_dirs, "lin", "lin"), "lin")
    dev = open_cache(manifest["features"]["cache"])["dev"]
    labels = np.concatenate([dev[i]["labels"] for i in range(len(dev))])
    root_share = float((labels[labels != -100] == 0).mean())  # always predicting <s>
    print(f"\nlin dev UAS {manifest['dev_metrics']['uas']:.4f} vs root-only {root_share:.4f}")
    assert manifest["dev_metrics"]["uas"] > 2 * root_share
    assert (sample_dirs / "lin" / "adapter_config.json").is_file()


def test_interrupted_pretraining_resumes_to_identical_adapter(sample_dirs, monkeypatch):
    short = ("--max_steps", "6", "--save_every", "2", "--eval_every", "3")
    run_pretraining(sample_config(sample_dirs, "fac", "straight", *short), "fac")

    original = pretrain.task_functions

    def crashing(task):
        pads, loss_fn, predict_fn, metrics_fn = original(task)
        calls = {"n": 0}

        def loss(*args):
            calls["n"] += 1
            if calls["n"] == 5:  # step 5, after the step-4 checkpoint
                raise KeyboardInterrupt("simulated interruption")
            return loss_fn(*args)

        return pads, loss, predict_fn, metrics_fn

    monkeypatch.setattr(pretrain, "task_functions", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(sample_config(sample_dirs, "fac", "resumed", *short), "fac")
    assert not (sample_dirs / "resumed" / "adapter_config.json").exists()
    monkeypatch.setattr(pretrain, "task_functions", original)
    manifest = run_pretraining(sample_config(sample_dirs, "fac", "resumed", *short), "fac",
                               resume=True)
    assert manifest["training"]["resumed_from"] == 4
    straight = (sample_dirs / "straight" / "adapter.safetensors").read_bytes()
    assert (sample_dirs / "resumed" / "adapter.safetensors").read_bytes() == straight


def test_two_process_cpu_run(sample_dirs, tiny_model_dir):
    """torchrun starts 2 CPU processes (gloo); the result has the 1-process run's shape."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["--data_dir", str(sample_dirs / "trex_rc"), "--output_dir", str(sample_dirs / "ddp"),
            "--cache_dir", str(sample_dirs / "cache"), "--max_steps", "4", "--save_every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "pipelines.pretrain",
                           "--config", "configs/sample.yaml", "--task", "fac", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_json(sample_dirs / "ddp" / "manifest.json")
    assert manifest["training"]["processes"] == 2 and manifest["training"]["steps"] == 4
    # batch_size 16 is examples per step: 8 on each process
    assert {k: manifest["training"]["batch"][k] for k in ("global_batch", "micro_batch")} == \
        {"global_batch": 16, "micro_batch": 8}
    assert set(manifest["dev_metrics"]) == {"accuracy", "micro_f1", "macro_f1"}
    encoder = load_encoder(str(tiny_model_dir))
    # dev predictions were split over the 2 processes and gathered: all of dev, in order
    assert rescored_accuracy(sample_dirs / "ddp", encoder, manifest) == pytest.approx(
        manifest["dev_metrics"]["accuracy"])
    encoder_config = encoder.config
    two = load_adapter(sample_dirs / "ddp", encoder_config)
    config = load_config("configs/sample.yaml")
    fresh = KnowledgeAdapter(config.adapter, encoder_config.hidden_size,
                             encoder_config.num_hidden_layers)
    assert {k: v.shape for k, v in two.adapter.state_dict().items()} == \
        {k: v.shape for k, v in fresh.state_dict().items()}
    assert not torch.equal(two.adapter.layers[0].up.weight, fresh.layers[0].up.weight)
    assert done.stdout.count("fac adapter ->") == 1  # only the main process prints
