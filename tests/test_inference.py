"""Inference: the run's model directory, load_finetuned / predict on new inputs, encode,
Hub round trips of fine-tuned models, and torch.export of KAdapterModel."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from workspace import copy_sample_splits, save_random_adapters

from kadapter.config import load_config
from kadapter.finetune import run_finetune
from kadapter.inference import ModelLoadError, encode, load_finetuned, predict
from kadapter.metrics import read_predictions
from kadapter.tasks import TASKS

SAMPLE_DIRS = {"typing": "openentity", "csqa": "csqa", "tacred": "tacred"}
SIZES = (16, 8, 8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, repo_root, tiny_model_dir):
    """Small copies of three sample tasks, two random adapters, a preset; one short TACRED run."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("inference")
    copy_sample_splits(root, repo_root, SAMPLE_DIRS, SIZES)
    save_random_adapters(root, AutoConfig.from_pretrained(str(tiny_model_dir)))
    settings = {"max_length": 48, "batch_size": 8, "learning_rate": 1e-3, "max_steps": 2,
                "eval_every": 2, "log_every": 1, "save_every": 0}
    preset = {
        "preset": "test", "seed": 7,
        "model": {"name_or_path": "tiny", "tiny_dir": str(tiny_model_dir),
                  "tiny_corpus": str(repo_root / "data/sample")},
        "finetune": {
            "fac_adapter": str(root / "fac-adapter"), "lin_adapter": str(root / "lin-adapter"),
            "output_dir": str(root / "runs"), "results": str(root / "results.md"),
            "cache_dir": str(root / "features"),
            **{task: {"data_dir": str(root / "data" / directory), **settings}
               for task, directory in SAMPLE_DIRS.items()},
        },
    }
    (root / "test.yaml").write_text(yaml.safe_dump(preset))
    config = load_config(root / "test.yaml", [], default_section="finetune")
    run_finetune(config, "tacred", "fac,lin")
    return root


def saved_model(workspace, task: str, adapters: list[str]):
    """A model of ``task`` with random weights, saved as a fine-tuned model directory (as
    a run saves it), and its in-memory original."""
    from kadapter.finetune import FinetuneModel, TaskConfig
    from kadapter.inference import finetuned_config, save_finetuned
    from kadapter.modeling import load_adapter, load_encoder, load_tokenizer

    tiny = load_config(workspace / "test.yaml", [], default_section="finetune").model.tiny_dir
    encoder, tokenizer = load_encoder(tiny), load_tokenizer(tiny)
    labels = TASKS[task].default_labels or []
    settings = TaskConfig(max_length=48)
    sources = {name: str(workspace / f"{name}-adapter") for name in adapters}
    torch.manual_seed(3)
    head = TASKS[task].head(64, len(labels), settings.dropout, settings.pooling)
    model = FinetuneModel(encoder, {n: load_adapter(s, encoder.config).adapter for n, s in sources.items()},
                          head, "concat").eval()
    config = finetuned_config(task=task, variant="test", labels=labels, settings=settings,
                              combine="concat", adapters=sources, base_model="tiny",
                              base_model_revision=None, tokenizer_name="tiny", metrics={},
                              data={}, parameters={"total": 1})
    return save_finetuned(workspace / "models" / task, model, tokenizer, config), model, tokenizer


def test_the_run_saves_a_model_directory_with_a_card(workspace):
    model_dir = workspace / "runs/tacred/fac+lin/model"
    config = json.loads((model_dir / "kadapter_model.json").read_text())
    assert config["task"] == "tacred" and config["labels"] == TASKS["tacred"].default_labels
    assert set(config["adapters"]) == {"fac", "lin"}
    assert config["adapters"]["fac"]["source"] == str(workspace / "fac-adapter")
    assert config["base_model_revision"].startswith("tiny build ")
    metrics = json.loads((workspace / "runs/tacred/fac+lin/metrics.json").read_text())
    assert config["metrics"]["dev"] == metrics["dev"]
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.library_name == "kadapter" and card.data.license == "other"
    for needle in ("`per:title`", "load_finetuned", "TACRED, LDC licence", "trainable",
                   config["data"]["train"]["sha256"], f"f1 {metrics['dev']['f1']:.4f}"):
        assert needle in card.text, needle
    from safetensors.torch import load_file

    saved = load_file(str(model_dir / "model.safetensors"))  # the selected weights, adapters left out
    best = load_file(str(workspace / "runs/tacred/fac+lin/best/model.safetensors"))
    assert saved.keys() == {k for k in best if not k.startswith("kadapter.adapters.")}
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    mask = os.umask(0)
    os.umask(mask)
    for path in [*model_dir.rglob("*"), workspace / "runs/tacred/fac+lin/best/model.safetensors"]:
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def raw_records(workspace, task, split=2):
    path = workspace / "data" / SAMPLE_DIRS[task] / TASKS[task].files[split]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def as_inputs(task, records):
    """Test records in the form predict() takes for new inputs."""
    if task == "csqa":
        return [{"question": r["question"]["stem"], "choices": [c["text"] for c in r["question"]["choices"]],
                 "labels": [c["label"] for c in r["question"]["choices"]]} for r in records]
    if task == "typing":
        return [{"sent": r["sent"], "start": r["start"], "end": r["end"]} for r in records]
    return [{k: r[k] for k in ("token", "subj_start", "subj_end", "obj_start", "obj_end")} for r in records]


def test_predict_on_new_inputs_matches_the_run(workspace):
    """The run's model directory, fed the test records as new inputs, predicts what the
    run predicted."""
    model = load_finetuned(workspace / "runs/tacred/fac+lin/model")
    expected = [row["predicted"] for row in read_predictions(workspace / "runs/tacred/fac+lin/predictions.jsonl")]
    assert predict(model, as_inputs("tacred", raw_records(workspace, "tacred")), batch_size=3) == expected


@pytest.mark.parametrize("task, adapters", [("typing", ["fac"]), ("csqa", [])])
def test_predict_after_a_save_and_load_matches_the_model(workspace, task, adapters):
    from kadapter.finetune import prediction_rows
    from kadapter.tasks import collate

    directory, original, tokenizer = saved_model(workspace, task, adapters)
    spec = TASKS[task]
    examples = spec.reader(workspace / "data" / SAMPLE_DIRS[task] / spec.files[2], spec.default_labels)
    labels = spec.default_labels or []
    encoded = spec.encode(examples, tokenizer, labels, 48)
    with torch.no_grad():
        logits = original(collate(encoded.features, tokenizer.pad_token_id)).numpy()
    expected = [row["predicted"] for row in prediction_rows(spec, labels, encoded, logits)]
    assert len(set(map(str, expected))) > 1  # not a constant prediction
    assert predict(load_finetuned(directory), as_inputs(task, raw_records(workspace, task)),
                   batch_size=3) == expected


def test_predict_reports_a_bad_input_by_index(workspace):
    model = load_finetuned(workspace / "runs/tacred/fac+lin/model")
    good = {"token": ["Ada", "was", "born", "in", "London"], "subj_start": 0, "subj_end": 0,
            "obj_start": 4, "obj_end": 4}
    with pytest.raises(ValueError, match=r"input 1: span \[4, 9\]"):
        predict(model, [good, {**good, "obj_end": 9}])
    with pytest.raises(ValueError, match="input 0: missing field 'subj_start'"):
        predict(model, [{"token": ["a"]}])


def test_changed_adapter_is_refused(workspace, tmp_path):
    changed = tmp_path / "fac-adapter"
    shutil.copytree(workspace / "fac-adapter", changed)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(changed / "adapter.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    save_file(weights, str(changed / "adapter.safetensors"))
    with pytest.raises(ModelLoadError, match="not the one this model was fine-tuned with"):
        load_finetuned(workspace / "runs/tacred/fac+lin/model", adapters={"fac": str(changed)})


def test_hub_round_trip_and_push_folder(workspace, tmp_path, monkeypatch):
    from tests.test_hub import COMMIT, FakeHub, populate_cache

    model = load_finetuned(saved_model(workspace, "typing", ["fac"])[0])
    fake = FakeHub().install(monkeypatch)
    model.push_to_hub("someone/typing-fac")
    assert len(fake.commits) == 1
    folder = fake.checkout(tmp_path / "uploaded")  # the folder less the output marker
    listed = json.loads((folder / "kadapter_model.json").read_text())["files"]
    assert sorted(listed) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                                    if p.is_file() and p.name != "kadapter_model.json")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    populate_cache(tmp_path / "cache", "someone/typing-fac", folder)
    from_hub = load_finetuned(f"someone/typing-fac@{COMMIT}")
    inputs = [{"sent": r["sent"], "start": r["start"], "end": r["end"]} for r in raw_records(workspace, "typing")]
    assert predict(from_hub, inputs) == predict(model, inputs)
    with pytest.raises(FileNotFoundError, match="hf download someone/elsewhere"):
        load_finetuned("someone/elsewhere")


def test_encode_gives_combined_features_per_text(workspace, tiny_model_dir):
    texts = ["Ada Lovelace was born in London .", "Paris ."]
    features = encode(texts, str(tiny_model_dir), adapters=[str(workspace / "fac-adapter")], batch_size=2)
    alone = encode(texts[1:], str(tiny_model_dir), adapters={"fac": str(workspace / "fac-adapter")})
    hidden = 64
    assert features[0].shape[1] == 2 * hidden and features[1].shape[0] < features[0].shape[0]
    torch.testing.assert_close(features[1], alone[0], rtol=1e-4, atol=1e-5)  # padding changes nothing
    bare = encode(texts[1:], str(tiny_model_dir))
    torch.testing.assert_close(features[1][:, :hidden], bare[0], rtol=1e-4, atol=1e-5)
    model = load_finetuned(workspace / "runs/tacred/fac+lin/model")
    combined = encode(texts, model)
    assert [f.shape for f in combined] == [(f.shape[0], hidden) for f in features]


def test_kadapter_model_exports():
    from transformers import RobertaConfig, RobertaModel

    from kadapter.modeling import AdapterConfig, KAdapterModel, KAdapterOutput, KnowledgeAdapter

    torch.manual_seed(0)
    encoder = RobertaModel(RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=40, pad_token_id=1),
                           add_pooling_layer=False)
    adapter = KnowledgeAdapter(AdapterConfig(positions=[0, 2], adapter_size=16, num_heads=2), 32, 2)
    model = KAdapterModel(encoder, {"fac": adapter}).eval()
    ids, mask = torch.randint(5, 60, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    eager = model(ids, mask)
    assert isinstance(eager, KAdapterOutput)
    exported = torch.export.export(model, (ids, mask)).module()(ids, mask)
    torch.testing.assert_close(exported.adapter_outputs["fac"], eager.adapter_outputs["fac"])
    torch.testing.assert_close(exported.last_hidden_state, eager.last_hidden_state)
