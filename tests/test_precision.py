"""Precision on CPU: bf16 auto|true|false, a bf16 frozen encoder, Accelerate's own setting.

bf16 autocast on this CPU is ~20x slower than fp32, so the sample runs here take two or
three optimizer steps: enough to go through every code path (training step, evaluation,
saving, LAMA scoring) in the precision under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from workspace import copy_sample_splits, save_random_adapters

from kadapter.config import ConfigError, load_config
from kadapter.modeling import Combiner
from kadapter.precision import ENV, resolve_precision
from kadapter.training import TrainingConfig, make_accelerator

BF16_ENCODER = ("--model.encoder_dtype", "bfloat16")


@pytest.fixture(autouse=True)
def isolated_run(monkeypatch):
    """Tiny shapes gain nothing from intra-op threads; Accelerate's setting starts unset,
    and no test leaves its process-wide precision behind."""
    from accelerate.state import AcceleratorState

    monkeypatch.delenv(ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state()


# ----------------------------------------------------------------- which precision wins


@pytest.mark.parametrize("bf16, device, native, env, expected, reason", [
    ("auto", "cpu", False, None, "no", "no CUDA device"),
    ("auto", "cuda", True, None, "bf16", "native bf16"),
    ("auto", "cuda", False, None, "fp16", "loss scaling"),
    (True, "cpu", False, None, "bf16", "bf16: true"),
    (False, "cuda", True, None, "no", "bf16: false"),
    # Accelerate's own setting wins under auto, and only there
    ("auto", "cuda", True, "fp16", "fp16", "ACCELERATE_MIXED_PRECISION=fp16"),
    ("auto", "cpu", False, "bf16", "bf16", "ACCELERATE_MIXED_PRECISION=bf16"),
    ("auto", "cuda", True, " BF16 ", "bf16", "Accelerate's setting"),
    (False, "cuda", True, "bf16", "no", "bf16: false"),
    (True, "cuda", True, "fp16", "bf16", "bf16: true"),
    # a bare `accelerate launch` exports "no": it does not switch bf16 off on a GPU
    ("auto", "cuda", True, "no", "bf16", "=no ignored"),
    ("auto", "cpu", False, "no", "no", "no CUDA device"),
])
def test_resolution(bf16, device, native, env, expected, reason):
    environ = {} if env is None else {ENV: env}
    precision = resolve_precision(bf16, device_type=device, bf16_native=native, environ=environ)
    assert precision.mixed_precision == expected
    assert reason in precision.decided_by
    assert precision.accelerate_setting == env


@pytest.mark.parametrize("bf16, env, message", [
    ("auto", "fp16", "needs a CUDA GPU"),
    ("auto", "fp8", "not one of"),
    ("auto", "half", "not one of"),
    (1, None, "bf16 must be auto, true or false"),
    ("yes", None, "bf16 must be auto, true or false"),
])
def test_resolution_errors(bf16, env, message):
    with pytest.raises(ValueError, match=message):
        resolve_precision(bf16, device_type="cpu", environ={} if env is None else {ENV: env})


def test_config_keys_take_auto_true_false_only():
    for value, expected in (("auto", "auto"), ("true", True), ("false", False)):
        config = load_config("configs/sample.yaml", ["--bf16", value], default_section="pretrain_fac")
        assert config.pretrain_fac.bf16 == expected
    assert load_config("configs/sample.yaml").pretrain_fac.bf16 == "auto"  # CPU: fp32
    for key in ("--pretrain_lin.bf16", "--finetune.bf16", "--finetune.tacred.bf16",
                "--lama.mlm_head.bf16"):
        with pytest.raises(ConfigError, match="bf16"):
            load_config("configs/sample.yaml", [key, "1"])


def test_make_accelerator_follows_the_environment_and_the_config(monkeypatch):
    monkeypatch.setenv(ENV, "bf16")  # what `accelerate launch --mixed_precision bf16` exports
    assert make_accelerator(TrainingConfig(bf16="auto")).mixed_precision == "bf16"
    # one process, another precision: Accelerate's process-wide state is reset, not refused
    assert make_accelerator(TrainingConfig(bf16=False)).mixed_precision == "no"
    monkeypatch.delenv(ENV)
    assert make_accelerator(TrainingConfig(bf16="auto")).mixed_precision == "no"
    accelerator = make_accelerator(TrainingConfig(bf16=True))
    with accelerator.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.bfloat16


# ------------------------------------------------------- defect 2: Combiner dtype flow


@pytest.mark.parametrize("mode", ["concat", "add"])
def test_combiner_takes_a_bf16_encoder_state_beside_fp32_layers(mode):
    torch.manual_seed(0)
    combiner = Combiner(["fac", "lin"], 8, mode=mode)
    last = torch.randn(2, 3, 8).to(torch.bfloat16)
    adapters = {"fac": torch.randn(2, 3, 8), "lin": torch.randn(2, 3, 8)}
    out = combiner(last, adapters)  # no autocast: bf16: false with a bf16 encoder
    assert out.dtype == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert combiner(last, adapters).shape == (2, 3, 8)


# ------------------------------------------------------------------ pretraining (sample)


@pytest.fixture(scope="module")
def sample_dirs(tmp_path_factory, tiny_model_dir):
    from kadapter.deps import build_deps
    from kadapter.trex import build_trex_rc

    root = tmp_path_factory.mktemp("precision")
    config = load_config("configs/sample.yaml")
    build_trex_rc(config.data_trex, seed=config.seed, output_dir=root / "trex_rc")
    build_deps(dataclasses.replace(config.data_deps, output_dir=str(root / "deps")),
               seed=config.seed)
    return root


def pretrain(sample_dirs: Path, task: str, run: str, *overrides: str) -> dict:
    from kadapter.pretrain import run_pretraining

    args = ["--data_dir", str(sample_dirs / ("trex_rc" if task == "fac" else "deps")),
            "--output_dir", str(sample_dirs / run), "--cache_dir", str(sample_dirs / "cache"),
            "--max_steps", "2", "--batch_size", "8", "--log_every", "1", "--save_every", "0",
            *BF16_ENCODER, *overrides]
    return run_pretraining(load_config("configs/sample.yaml", args,
                                       default_section=f"pretrain_{task}"), task)


@pytest.mark.parametrize("task", ["fac", "lin"])
@pytest.mark.parametrize("bf16, expected", [("false", "no"), ("true", "bf16")])
def test_pretraining_with_a_bf16_encoder(sample_dirs, task, bf16, expected):
    manifest = pretrain(sample_dirs, task, f"{task}-{bf16}", "--bf16", bf16)
    training = manifest["training"]
    assert training["mixed_precision"] == expected
    assert training["precision"]["decided_by"] == f"config: bf16: {bf16}"
    assert training["encoder_dtype"] == "torch.bfloat16"
    assert training["steps"] == 2
    assert all(math.isfinite(v) for v in manifest["dev_metrics"].values())
    records = [json.loads(line) for line in (sample_dirs / f"{task}-{bf16}" / "metrics.jsonl")
               .read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")


def test_accelerate_config_file_decides_under_auto(sample_dirs, tmp_path):
    """`accelerate launch --config_file` (what `accelerate config` writes) with bf16: the
    preset's bf16 is auto, so Accelerate's choice wins and the manifest says so."""
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(yaml.safe_dump({
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "mixed_precision": "bf16",
        "num_machines": 1, "num_processes": 1, "use_cpu": True, "dynamo_config": {}}))
    launcher = Path(sys.executable).with_name("accelerate")
    done = subprocess.run(
        [str(launcher), "launch", "--config_file", str(accelerate_config), "-m", "pipelines.pretrain",
         "--config", "configs/sample.yaml", "--task", "fac", "--max_steps", "1", "--save_every", "0",
         "--data_dir", str(sample_dirs / "trex_rc"), "--output_dir", str(tmp_path / "run"),
         "--cache_dir", str(sample_dirs / "cache")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((tmp_path / "run" / "manifest.json").read_text())["training"]
    assert training["mixed_precision"] == "bf16"
    assert training["precision"] == {
        "mixed_precision": "bf16", "accelerate_setting": "bf16",
        "decided_by": "Accelerate's setting: ACCELERATE_MIXED_PRECISION=bf16 (bf16: auto)"}


# ---------------------------------------------------------------- fine-tuning (sample)


FINETUNE_RUNS = [("typing", "fac,lin", "fac+lin"), ("csqa", "lin", "lin"), ("tacred", "fac", "fac")]
SAMPLE_DIRS = {"typing": "openentity", "csqa": "csqa", "tacred": "tacred"}


@pytest.fixture(scope="module")
def finetune_workspace(tmp_path_factory, repo_root, tiny_model_dir):
    """Small copies of the sample files of one task of each kind, two random adapters."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("precision-finetune")
    copy_sample_splits(root, repo_root, SAMPLE_DIRS, (16, 6, 6))
    save_random_adapters(root, AutoConfig.from_pretrained(str(tiny_model_dir)))
    settings = {"max_length": 48, "batch_size": 8, "learning_rate": 1e-3, "max_steps": 2,
                "log_every": 1, "save_every": 0}
    preset = {
        "preset": "test", "seed": 7,
        "model": {"name_or_path": "tiny", "tiny_dir": str(tiny_model_dir),
                  "tiny_corpus": str(repo_root / "data/sample")},
        "finetune": {"fac_adapter": str(root / "fac-adapter"), "lin_adapter": str(root / "lin-adapter"),
                     "output_dir": str(root / "runs"), "results": str(root / "results.md"),
                     "cache_dir": str(root / "features"),
                     **{task: {"data_dir": str(root / "data" / directory), **settings}
                        for task, directory in SAMPLE_DIRS.items()}},
    }
    (root / "test.yaml").write_text(yaml.safe_dump(preset))
    return root


@pytest.mark.parametrize("task, adapters, variant_dir", FINETUNE_RUNS)
def test_finetuning_one_task_of_each_kind_in_bf16(finetune_workspace, task, adapters, variant_dir):
    from kadapter.finetune import run_finetune

    config = load_config(finetune_workspace / "test.yaml", [*BF16_ENCODER, "--bf16", "true"],
                         default_section="finetune")
    summary = run_finetune(config, task, adapters)
    manifest = json.loads((finetune_workspace / "runs" / task / variant_dir / "manifest.json")
                          .read_text())
    assert manifest["parameters"]["precision"]["mixed_precision"] == "bf16"
    assert summary["steps"] == 2 and summary["dev"]["examples"] == 6


def test_a_task_setting_overrides_the_finetune_section(finetune_workspace):
    from kadapter.finetune import variant_settings

    config = load_config(finetune_workspace / "test.yaml",
                         ["--bf16", "true", "--finetune.csqa.bf16", "false"], default_section="finetune")
    assert variant_settings(config, "typing", "none").bf16 is True
    assert variant_settings(config, "csqa", "none").bf16 is False


# ------------------------------------------------------------ defect 1: LAMA (sample)


def test_lama_every_variant_with_a_bf16_encoder(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from kadapter.lama import run_lama

    save_random_adapters(tmp_path, AutoConfig.from_pretrained(str(tiny_model_dir)))
    config = load_config("configs/sample.yaml", [
        *BF16_ENCODER, "--lama.mlm_head.bf16", "true", "--lama.mlm_head.max_steps", "2",
        "--lama.mlm_head.log_every", "1", "--lama.fac_adapter", str(tmp_path / "fac-adapter"),
        "--lama.lin_adapter", str(tmp_path / "lin-adapter"),
        "--lama.output_dir", str(tmp_path / "lama")], default_section="lama")
    assert config.lama.variants == ["encoder", "fac", "lin", "fac+lin"]
    results = run_lama(config)
    for subset in config.lama.subsets:
        for variant in config.lama.variants:
            assert math.isfinite(results["subsets"][subset][variant]["p@1"])
    assert results["mlm_head"]["trained"] and results["mlm_head"]["steps"] == 2
    assert all(math.isfinite(v) for v in results["mlm_head"]["dev_mlm_loss"].values())
    manifest = json.loads((tmp_path / "lama" / "manifest.json").read_text())
    assert manifest["parameters"]["precision"]["mixed_precision"] == "bf16"


def test_lm_head_in_bf16_takes_the_fp32_mix_outside_autocast():
    """Scoring: after training, the mixes' forward returns fp32 (Accelerate's wrapper);
    the bf16 LM head gets its input in its own dtype."""
    from kadapter import lama

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(8, 11).to(torch.bfloat16)
    mixes = lama.VariantMixes(["encoder", "fac", "fac+lin"], 8)
    last = torch.randn(3, 8)
    adapters = {"fac": torch.randn(3, 8), "lin": torch.randn(3, 8)}
    logits = lama.variant_logits(lm_head, mixes, ["encoder", "fac", "fac+lin"], last, adapters)
    assert {v: t.shape for v, t in logits.items()} == {v: (3, 11) for v in ("encoder", "fac", "fac+lin")}
    # the untrained mix is [identity, zero]: every variant scores like the encoder
    assert torch.equal(logits["fac"], logits["encoder"])


def test_lama_mlm_head_training_under_cuda_style_autocast(tmp_path, tiny_model_dir, monkeypatch):
    """The CUDA setup emulated on CPU: bf16 encoder and LM head, bf16 autocast from
    Accelerate, the LM head called by the loss beside the prepared mixes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoConfig

    from kadapter import lama

    made = []

    def cuda_style_accelerator(config):
        AcceleratorState._reset_state()
        made.append(Accelerator(mixed_precision="bf16", cpu=True))
        return made[-1]

    monkeypatch.setattr(lama, "make_accelerator", cuda_style_accelerator)
    save_random_adapters(tmp_path, AutoConfig.from_pretrained(str(tiny_model_dir)))
    results = lama.run_lama(load_config("configs/sample.yaml", [
        *BF16_ENCODER, "--lama.mlm_head.max_steps", "1", "--lama.variants", "[encoder, fac]",
        "--lama.subsets", "[trex]", "--lama.fac_adapter", str(tmp_path / "fac-adapter"),
        "--lama.output_dir", str(tmp_path / "lama")], default_section="lama"))
    assert len(made) == 1, "the stage ran with another accelerator than the emulated one"
    assert results["mlm_head"]["trained"]
    assert math.isfinite(results["subsets"]["trex"]["fac"]["p@1"])
