"""RoBERTa + multitask on the tiny model: the task mix, the joint training, resume, the
fine-tuning variant, bad configs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kadapter.modeling as modeling
import kadapter.multitask as multitask
from kadapter.config import ConfigError, load_config
from kadapter.features import pretrain_features
from kadapter.finetune import run_finetune, run_fingerprint
from kadapter.io import atomic_write_json, read_json
from kadapter.modeling import load_encoder, load_tokenizer
from kadapter.multitask import (
    MixedTable,
    MultitaskModel,
    build_multitask_head,
    load_heads,
    mixed_loss,
    mixed_steps,
    run_multitask,
    step_counts,
)
from kadapter.pretrain import head_settings
from kadapter.training import PadCollator
from tests.workspace import save_random_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sample_dirs(tmp_path_factory, tiny_model_dir):
    """The sample preset's T-REx-rc and dependency data, built into a temporary directory."""
    from kadapter.deps import build_deps
    from kadapter.trex import build_trex_rc

    root = tmp_path_factory.mktemp("multitask")
    config = load_config("configs/sample.yaml")
    build_trex_rc(config.data_trex, seed=config.seed, output_dir=root / "trex_rc")
    build_deps(dataclasses.replace(config.data_deps, output_dir=str(root / "deps")), seed=config.seed)
    return root


def sample_config(root, run: str, *overrides: str):
    args = ["--pretrain_fac.data_dir", str(root / "trex_rc"), "--pretrain_lin.data_dir",
            str(root / "deps"), "--pretrain_fac.cache_dir", str(root / "cache"),
            "--pretrain_lin.cache_dir", str(root / "cache"),
            "--pretrain_fac.output_dir", str(root / "fac-adapter"),
            "--pretrain_lin.output_dir", str(root / "lin-adapter"),
            "--output_dir", str(root / run), *overrides]
    return load_config("configs/sample.yaml", args, default_section="pretrain_multitask")


# ------------------------------------------------------------------ the mix


def test_every_step_holds_the_configured_mix_deterministically():
    rng = np.random.default_rng(0)
    lengths = {"fac": rng.integers(3, 40, 53), "lin": rng.integers(3, 90, 31)}
    counts = {"fac": 5, "lin": 3}
    epochs = [mixed_steps(lengths, counts, seed=7, epoch=e) for e in range(3)]
    for steps in epochs:
        assert len(steps) == min(53 // 5, 31 // 3)  # the scarcer task ends the epoch
        for step in steps:
            assert (step < 53).sum() == 5 and (step >= 53).sum() == 3
            assert (step[:5] < 53).all()  # fac first
        taken = np.concatenate(steps)
        assert len(np.unique(taken)) == len(taken)  # no example twice in an epoch
    # same bytes for the same seed; another epoch or seed, another order
    assert np.concatenate(mixed_steps(lengths, counts, seed=7, epoch=1)).tobytes() == \
        np.concatenate(epochs[1]).tobytes()
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))
    assert not np.array_equal(np.concatenate(mixed_steps(lengths, counts, seed=8, epoch=0)),
                              np.concatenate(epochs[0]))
    # one task alone: its share 0 means none of its examples
    only_fac = mixed_steps(lengths, {"fac": 8, "lin": 0}, seed=7, epoch=0)
    assert len(only_fac) == 53 // 8 and all((s < 53).all() for s in only_fac)


@pytest.mark.parametrize("fac,lin,batch,expected", [
    (0.6, 0.4, 16, {"fac": 10, "lin": 6}), (1, 1, 16, {"fac": 8, "lin": 8}),
    (27.5, 10, 256, {"fac": 188, "lin": 68}), (1, 0, 16, {"fac": 16, "lin": 0}),
    (1, 2, 10, {"fac": 3, "lin": 7})])
def test_step_counts_round_the_shares(fac, lin, batch, expected):
    section = multitask.MultitaskConfig(fac_share=fac, lin_share=lin, batch_size=batch)
    assert step_counts(section) == expected


@pytest.mark.parametrize("overrides,message", [
    (["--fac_share", "-1"], "fac_share -1.0: a task's share must be >= 0"),
    (["--fac_share", "0", "--lin_share", "0"], "both 0"),
    (["--fac_share", "0.01"], "rounds to 0 fac examples a step"),
])
def test_bad_shares_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("configs/sample.yaml", overrides, default_section="pretrain_multitask")
    assert "\n" not in str(err.value) and "pretrain_multitask" in str(err.value)


def test_missing_features_are_a_one_line_error(tmp_path, capsys, tiny_model_dir):
    from pipelines.pretrain_multitask import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "configs/sample.yaml", "--pretrain_fac.data_dir", str(tmp_path / "none"),
              "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert str(tmp_path / "none" / "train.parquet") in err and "make data-trex" in err


# ------------------------------------------------------------------ the model


def test_encoder_and_both_heads_learn_on_a_fixed_batch(sample_dirs, tiny_model_dir):
    config = sample_config(sample_dirs, "unused")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tables, heads = {}, {}
    encoder = load_encoder(str(tiny_model_dir))
    torch.manual_seed(0)
    for task in ("fac", "lin"):
        section = getattr(config, f"pretrain_{task}")
        features = pretrain_features(task, sample_dirs / ("trex_rc" if task == "fac" else "deps"),
                                     sample_dirs / "cache", tokenizer, section.max_length, 1)
        tables[task] = features["train"]
        heads[task] = build_multitask_head(head_settings(task, section, encoder.config.hidden_size,
                                                         features["labels"]))
    mixed = MixedTable(tables)
    rows = [*range(8), *range(len(tables["fac"]), len(tables["fac"]) + 8)]  # 8 fac + 8 lin
    batch = PadCollator({"input_ids": tokenizer.pad_token_id, "labels": -100})([mixed[i] for i in rows])
    model = MultitaskModel(encoder, heads)
    model.eval()  # no dropout: the losses compare like with like
    before = {name: p.detach().clone() for name, p in model.encoder.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def task_losses() -> dict[str, float]:
        with torch.no_grad():
            return {task: float(mixed_loss(model, {k: v[part] for k, v in batch.items()}, None))
                    for task, part in (("fac", slice(0, 8)), ("lin", slice(8, 16)))}

    start = task_losses()
    for _ in range(12):
        optimizer.zero_grad()
        mixed_loss(model, batch, None).backward()
        optimizer.step()
    end = task_losses()
    print(f"\nfixed-batch loss: fac {start['fac']:.3f} -> {end['fac']:.3f}, "
          f"lin {start['lin']:.3f} -> {end['lin']:.3f}")
    assert end["fac"] < 0.7 * start["fac"] and end["lin"] < 0.7 * start["lin"]
    changed = [name for name, p in model.encoder.named_parameters()
               if not torch.equal(p, before[name])]
    assert any("layer.0." in name for name in changed) and any("embeddings" in name for name in changed)


def test_a_batch_without_one_task_still_involves_its_head(sample_dirs, tiny_model_dir):
    """DDP needs every trainable parameter in the graph: an absent task's head gets a
    zero gradient, not none."""
    config = sample_config(sample_dirs, "unused")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    section = config.pretrain_lin
    features = pretrain_features("lin", sample_dirs / "deps", sample_dirs / "cache", tokenizer,
                                 section.max_length, 1)
    fac_features = pretrain_features("fac", sample_dirs / "trex_rc", sample_dirs / "cache", tokenizer,
                                     config.pretrain_fac.max_length, 1)
    encoder = load_encoder(str(tiny_model_dir))
    heads = {task: build_multitask_head(head_settings(
        task, getattr(config, f"pretrain_{task}"), encoder.config.hidden_size, fac_features["labels"]))
        for task in ("fac", "lin")}
    mixed = MixedTable({"fac": fac_features["train"], "lin": features["train"]})
    start = len(fac_features["train"])
    batch = PadCollator({"input_ids": tokenizer.pad_token_id, "labels": -100})(
        [mixed[i] for i in range(start, start + 4)])
    model = MultitaskModel(encoder, heads)
    mixed_loss(model, batch, None).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.heads["fac"].parameters())
    assert any(p.grad.any() for p in model.heads["lin"].parameters())


# ------------------------------------------------------------------ the run


def test_run_resumes_to_the_same_encoder_and_feeds_fine_tuning(sample_dirs, tiny_model_dir,
                                                               monkeypatch):
    # a K-Adapter fac run beside it, manifest without parameters: counted from its file
    encoder = load_encoder(str(tiny_model_dir))
    save_random_adapters(sample_dirs, encoder.config)
    atomic_write_json(sample_dirs / "fac-adapter" / "manifest.json",
                      {"stage": "pretrain", "training": {"tokens_per_s": 123.4}})
    short = ("--max_steps", "6", "--save_every", "2", "--eval_every", "3")
    manifest = run_multitask(sample_config(sample_dirs, "straight", *short))
    straight = sample_dirs / "straight"

    # the mix, as trained: 10 fac + 6 lin a step; the replayed tokens are the loop's
    seen = manifest["mix"]["seen"]
    assert {task: seen[task]["examples"] for task in seen} == {"fac": 60, "lin": 36}
    assert seen["fac"]["tokens"] + seen["lin"]["tokens"] == manifest["training"]["tokens"]
    assert set(manifest["dev_metrics"]) == {"fac_accuracy", "fac_micro_f1", "fac_macro_f1", "lin_uas"}
    assert manifest["parameters"]["trainable"] == manifest["parameters"]["total"] > \
        manifest["encoder_parameters"]
    assert manifest["training"]["tokens_per_s"] > 0
    fac_cost = manifest["kadapter_cost"]["fac"]
    adapter_size = sum(t.numel() for t in load_file(sample_dirs / "fac-adapter" / "adapter.safetensors").values())
    assert fac_cost["parameters"]["trainable"] == adapter_size and fac_cost["tokens_per_s"] == 123.4
    assert manifest["kadapter_cost"]["lin"] is None  # its run has no manifest
    assert not (straight / "checkpoints").exists()

    # the encoder loads as any encoder; the heads rebuild
    loaded = load_encoder(str(straight))
    assert not torch.equal(loaded.embeddings.word_embeddings.weight,
                           encoder.embeddings.word_embeddings.weight)
    assert set(load_heads(straight)) == {"fac", "lin"}

    # interrupted at step 5 (after the step-4 checkpoint), resumed: the same bytes
    original = multitask.mixed_loss
    calls = {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        return original(*args)

    monkeypatch.setattr(multitask, "mixed_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_multitask(sample_config(sample_dirs, "resumed", *short))
    assert not (sample_dirs / "resumed").exists()
    monkeypatch.setattr(multitask, "mixed_loss", original)
    resumed = run_multitask(sample_config(sample_dirs, "resumed", *short), resume=True)
    assert resumed["training"]["resumed_from"] == 4
    weights = (straight / "model.safetensors").read_bytes()
    assert (sample_dirs / "resumed" / "model.safetensors").read_bytes() == weights
    assert (sample_dirs / "resumed" / "heads.safetensors").read_bytes() == \
        (straight / "heads.safetensors").read_bytes()
    # a fresh rerun: the same bytes again
    run_multitask(sample_config(sample_dirs, "straight", *short))
    assert (straight / "model.safetensors").read_bytes() == weights

    # fine-tuning variant multitask starts from this encoder, with no adapters
    paths = []

    def recording_load_encoder(path, **kwargs):
        paths.append(path)
        return load_encoder(path, **kwargs)

    monkeypatch.setattr(modeling, "load_encoder", recording_load_encoder)
    config = load_config("configs/sample.yaml", [
        "--finetune.multitask_encoder", str(straight), "--finetune.output_dir", str(sample_dirs / "ft"),
        "--finetune.cache_dir", str(sample_dirs / "cache"), "--finetune.typing.max_steps", "3",
        "--finetune.typing.eval_every", "3"])
    summary = run_finetune(config, "typing", "multitask")
    assert paths == [str(straight)]
    run = sample_dirs / "ft" / "typing" / "multitask"
    assert summary["variant"] == "multitask" and (run / "metrics.json").is_file()
    run_manifest = read_json(run / "manifest.json")
    fingerprint = run_manifest["fingerprint"]
    assert fingerprint == run_fingerprint(config, "typing", "multitask")
    # the results table counts the encoder's multitask training as its knowledge stage
    from pipelines.finetune_all import knowledge_parameters
    assert knowledge_parameters(run_manifest) == manifest["parameters"]["trainable"]
    (straight / "heads.json").write_text("{}")  # any file of the encoder's run counts
    assert run_fingerprint(config, "typing", "multitask") != fingerprint


def test_fine_tuning_without_a_multitask_run_names_the_make_target(tmp_path):
    config = load_config("configs/sample.yaml", [
        "--finetune.multitask_encoder", str(tmp_path / "absent"),
        "--finetune.output_dir", str(tmp_path / "ft")])
    with pytest.raises(ConfigError, match="make pretrain-multitask") as err:
        run_finetune(config, "typing", "multitask")
    assert "\n" not in str(err.value) and str(tmp_path / "absent") in str(err.value)


def test_multitask_training_under_bf16_autocast(sample_dirs):
    """The CUDA precision path (bf16 autocast, fp32 master weights) on CPU: it trains and scores."""
    manifest = run_multitask(sample_config(sample_dirs, "bf16", "--bf16", "true", "--max_steps", "2",
                                           "--batch_size", "8", "--log_every", "1", "--save_every", "0"))
    training = manifest["training"]
    assert training["mixed_precision"] == "bf16"
    assert training["precision"]["decided_by"] == "config: bf16: true"
    assert training["steps"] == 2
    assert set(manifest["dev_metrics"]) == {"fac_accuracy", "fac_micro_f1", "fac_macro_f1", "lin_uas"}
    assert all(math.isfinite(v) for v in manifest["dev_metrics"].values())
    weights = load_file(sample_dirs / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32
