"""Serial (Houlsby) bottleneck adapters on the tiny model: the exact identity at start,
what trains, the files, loading onto another encoder, pretraining and the fine-tuning
variants."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from workspace import copy_sample_splits

from kadapter.config import ConfigError, load_config
from kadapter.io import read_json
from kadapter.modeling import AdapterLoadError, load_adapter, load_encoder
from kadapter.pretrain import HeadPositionHead, RelationHead, SerialPretrainModel
from kadapter.serial import (
    SerialAdapterConfig,
    attached,
    insert_serial_adapters,
    load_serial_adapter,
    save_serial_adapter,
    serial_parameters,
)

SHAPE = SerialAdapterConfig(bottleneck_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    ids[1, 8:] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 8, (3, 12),
                                                                            generator=generator)}


def encode(encoder, batch):
    return encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True, return_dict=True)


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_fresh_adapters_reproduce_the_encoder_exactly(tiny_model_dir, batch, dtype, autocast):
    encoder = load_encoder(str(tiny_model_dir), dtype=dtype).eval()
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), context:
        plain = encode(encoder, batch)
        adapters = insert_serial_adapters(encoder, SHAPE)
        adapted = encode(encoder, batch)
    assert adapters.layers[0].attention.down.weight.dtype == torch.float32  # fp32 beside bf16
    assert torch.equal(adapted.last_hidden_state, plain.last_hidden_state)
    assert len(adapted.hidden_states) == len(plain.hidden_states) == 25
    assert all(torch.equal(a, b) for a, b in zip(adapted.hidden_states, plain.hidden_states))
    layers = encoder.config.num_hidden_layers
    assert sum(p.numel() for p in adapters.parameters()) == serial_parameters(SHAPE, 64, layers)
    assert len(adapters.layers) == layers


def test_adapters_sit_after_both_output_projections(tiny_model_dir, batch):
    """A non-zero adapter in layer 5's attention block changes layer 5's output and not
    layer 4's; removing the adapters gives the plain encoder back."""
    encoder = load_encoder(str(tiny_model_dir)).eval()
    with torch.no_grad():
        plain = encode(encoder, batch).hidden_states
        adapters = insert_serial_adapters(encoder, SHAPE)
        adapters.layers[4].attention.up.bias.fill_(0.5)  # hidden_states[5] = layer index 4's output
        changed = encode(encoder, batch).hidden_states
        assert torch.equal(changed[4], plain[4]) and not torch.equal(changed[5], plain[5])
        adapters.layers[4].attention.up.bias.zero_()
        adapters.layers[4].output.up.bias.fill_(0.5)
        assert not torch.equal(encode(encoder, batch).hidden_states[5], plain[5])
        adapters.detach(encoder)
        assert attached(encoder) is None
        assert torch.equal(encode(encoder, batch).hidden_states[-1], plain[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_moves_adapters_and_head_only(tiny_model_dir, batch, dtype):
    encoder = load_encoder(str(tiny_model_dir), dtype=dtype)
    with torch.no_grad():
        plain = encode(encoder.eval(), batch).last_hidden_state
    frozen = state_of(encoder)
    torch.manual_seed(0)
    insert_serial_adapters(encoder, SHAPE)
    model = SerialPretrainModel(encoder, HeadPositionHead(64, adapter_name=None))
    model.train()
    assert not encoder.training and model.head.training and model.adapter.training
    adapter_before, head_before = state_of(model.adapter), state_of(model.head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in [*model.adapter.parameters(),
                                                          *model.head.parameters()]}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        logits = model(None, batch).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        if step:  # the up-projections start at zero: the down ones get gradients from step 2
            for i, layer in enumerate(model.adapter.layers):
                for place in ("attention", "output"):
                    for name, param in getattr(layer, place).named_parameters():
                        assert param.grad is not None and param.grad.abs().sum() > 0, (i, place, name)
        optimizer.step()
    assert all(p.grad is None for p in encoder.parameters() if not p.requires_grad)
    after = state_of(encoder)
    encoder_keys = [k for k in frozen if not k.startswith("serial_adapters.")]
    assert all(torch.equal(after[k], frozen[k]) for k in encoder_keys)  # bit-identical
    assert any(not torch.equal(v, adapter_before[k]) for k, v in state_of(model.adapter).items())
    assert any(not torch.equal(v, head_before[k]) for k, v in state_of(model.head).items())
    with torch.no_grad():
        assert not torch.equal(encode(encoder.eval(), batch).last_hidden_state, plain)


def trained_adapters(encoder, seed=3):
    torch.manual_seed(seed)
    adapters = insert_serial_adapters(encoder, SHAPE)
    with torch.no_grad():
        for param in adapters.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return adapters


def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_model_dir, batch):
    encoder = load_encoder(str(tiny_model_dir)).eval()
    adapters = trained_adapters(encoder)
    head = RelationHead(64, 3, adapter_name=None)
    save_serial_adapter(tmp_path / "serial", adapters, base_model="tiny",
                        encoder_config=encoder.config, task={"name": "fac"},
                        head_state=head.state_dict())
    config = read_json(tmp_path / "serial/adapter_config.json")
    assert config["kind"] == "serial" and config["serial"]["bottleneck_size"] == 8
    assert config["parameters"] == serial_parameters(SHAPE, 64, 24)
    fresh = load_encoder(str(tiny_model_dir)).eval()
    loaded = load_serial_adapter(tmp_path / "serial", fresh)
    assert attached(fresh) is loaded.adapters
    assert loaded.head_state.keys() == head.state_dict().keys()
    with torch.no_grad():
        expected, got = encode(encoder, batch), encode(fresh, batch)
    assert all(torch.equal(a, b) for a, b in zip(expected.hidden_states, got.hidden_states))
    # the K-Adapter loader refuses the serial kind, and the serial one a K-Adapter
    with pytest.raises(AdapterLoadError, match="not a K-Adapter"):
        load_adapter(tmp_path / "serial", encoder.config)
    from workspace import save_random_adapters

    save_random_adapters(tmp_path, encoder.config)
    with pytest.raises(AdapterLoadError, match="not a serial adapter"):
        load_serial_adapter(tmp_path / "fac-adapter", load_encoder(str(tiny_model_dir)))


def test_loading_onto_another_encoder_shape_is_a_one_line_error(tmp_path, tiny_model_dir):
    from transformers import RobertaConfig, RobertaModel

    encoder = load_encoder(str(tiny_model_dir))
    save_serial_adapter(tmp_path / "serial", trained_adapters(encoder), base_model="tiny",
                        encoder_config=encoder.config, task={"name": "lin"})
    other = RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64),
                         add_pooling_layer=False)
    with pytest.raises(AdapterLoadError) as caught:
        load_serial_adapter(tmp_path / "serial", other)
    message = str(caught.value)
    assert "\n" not in message and "hidden_size: adapter built for 64, encoder has 32" in message
    assert "num_hidden_layers: adapter built for 24, encoder has 2" in message
    assert attached(other) is None


# ------------------------------------------------------------------ pretraining


@pytest.fixture(scope="module")
def trex_dir(tmp_path_factory):
    from kadapter.trex import build_trex_rc

    root = tmp_path_factory.mktemp("serial-sample")
    config = load_config("configs/sample.yaml")
    build_trex_rc(config.data_trex, seed=config.seed, output_dir=root / "trex_rc")
    return root


def pretrain_config(root, *overrides):
    return load_config("configs/sample.yaml", [
        "--data_dir", str(root / "trex_rc"), "--output_dir", str(root / "fac"),
        "--cache_dir", str(root / "cache"), "--serial_adapter.fac_output_dir", str(root / "serial"),
        *overrides], default_section="pretrain_fac")


def test_serial_pretraining_writes_a_loadable_adapter(trex_dir, tiny_model_dir):
    from kadapter.pretrain import build_head, run_pretraining

    def head_size(run):
        head = build_head(read_json(run / "adapter_config.json")["task"]["head"])
        return sum(p.numel() for p in head.parameters())

    config = pretrain_config(trex_dir, "--serial_adapter.epochs", "3")
    manifest = run_pretraining(config, "fac", kind="serial")
    out = trex_dir / "serial"
    assert not (trex_dir / "fac").exists()  # the K-Adapter's run directory is not touched
    for name in ("adapter_config.json", "adapter.safetensors", "manifest.json", "curves.png"):
        assert (out / name).is_file(), name
    assert manifest["kind"] == "serial"
    adapters = serial_parameters(config.serial_adapter, 64, 24)
    encoder = load_encoder(str(tiny_model_dir))
    encoder_size = sum(p.numel() for p in encoder.parameters())
    trainable = adapters + head_size(out)
    assert manifest["parameters"] == {"trainable": trainable, "total": encoder_size + trainable}
    accuracy, majority = manifest["dev_metrics"]["accuracy"], manifest["majority_baseline"]["accuracy"]
    print(f"\nserial fac dev accuracy {accuracy:.4f} vs majority {majority:.4f}, "
          f"{manifest['training']['tokens_per_s']:.0f} tokens/s")
    assert accuracy > majority + 0.1
    # one call puts it onto a fresh encoder; the head rebuilds from the config, without combiner
    loaded = load_serial_adapter(out, encoder)
    head = build_head(loaded.config["task"]["head"])
    head.load_state_dict(loaded.head_state, strict=True)
    assert loaded.config["task"]["combiner"] is None and not list(head.combiner.parameters())

    # the K-Adapter run's manifest counts its parameters too
    kadapter = run_pretraining(pretrain_config(trex_dir, "--max_steps", "2"), "fac")
    trainable = read_json(trex_dir / "fac/adapter_config.json")["parameters"] + head_size(trex_dir / "fac")
    assert kadapter["parameters"] == {"trainable": trainable, "total": encoder_size + trainable}


# ------------------------------------------------------------------ fine-tuning


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, repo_root, tiny_model_dir):
    root = tmp_path_factory.mktemp("serial-finetune")
    copy_sample_splits(root, repo_root, {"typing": "openentity"}, (24, 10, 10))
    encoder = load_encoder(str(tiny_model_dir))
    save_serial_adapter(root / "serial-fac-adapter", trained_adapters(encoder), base_model="tiny",
                        encoder_config=encoder.config, task={"name": "fac"})
    preset = {
        "preset": "test", "seed": 7,
        "model": {"name_or_path": "tiny", "tiny_dir": str(tiny_model_dir),
                  "tiny_corpus": str(repo_root / "data/sample")},
        "finetune": {
            "serial_fac_adapter": str(root / "serial-fac-adapter"),
            "serial_lin_adapter": str(root / "missing-adapter"),
            "output_dir": str(root / "runs"), "results": str(root / "results.md"),
            "cache_dir": str(root / "features"),
            "typing": {"data_dir": str(root / "data/openentity"), "max_length": 48, "batch_size": 8,
                       "learning_rate": 1e-3, "max_steps": 4, "eval_every": 2, "log_every": 1,
                       "save_every": 0},
        },
    }
    (root / "test.yaml").write_text(yaml.safe_dump(preset))
    return root


def test_serial_variant_fine_tunes_with_frozen_adapters(workspace, tiny_model_dir):
    from kadapter.finetune import canonical_variant, run_finetune, run_fingerprint
    from kadapter.inference import load_finetuned

    assert canonical_variant("serial-fac") == "serial-fac"
    config = load_config(workspace / "test.yaml")
    run_finetune(config, "typing", "serial-fac")
    out = workspace / "runs/typing/serial-fac"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == run_fingerprint(config, "typing", "serial-fac")
    assert set(manifest["inputs"]["adapters"]) == {"serial-fac"}
    encoder = load_encoder(str(tiny_model_dir))
    encoder_size = sum(p.numel() for p in encoder.parameters())
    head = manifest["trainable_parameters"] - encoder_size
    assert 0 < head < 64 * 20  # encoder + a linear head over 9 types: no adapter weight
    trained = load_file(str(out / "best/model.safetensors"))
    saved = load_file(str(workspace / "serial-fac-adapter/adapter.safetensors"))
    for key, value in saved.items():  # the adapters stayed as pretrained
        assert torch.equal(trained[f"kadapter.encoder.serial_adapters.{key[len('adapter.'):]}"], value)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert not torch.equal(trained["kadapter.encoder.encoder.layer.23.output.dense.weight"],
                           original["roberta.encoder.layer.23.output.dense.weight"])
    # the run's model directory loads back with its serial adapters inside the encoder
    model = load_finetuned(out / "model")
    inserted = attached(model.model.kadapter.encoder)
    assert inserted is not None and not any(p.requires_grad for p in inserted.parameters())
    rows = [json.loads(line) for line in (out / "dev_predictions.jsonl").read_text().splitlines()]
    source = workspace / "data/openentity/dev.json"
    from kadapter.inference import predict

    inputs = json.loads(source.read_text())
    assert predict(model, inputs) == [r["predicted"] for r in rows]


def test_missing_serial_adapter_names_its_make_target(workspace):
    from kadapter.finetune import run_finetune

    with pytest.raises(ConfigError, match=r"make pretrain-serial-lin.*--finetune.serial_lin_adapter"):
        run_finetune(load_config(workspace / "test.yaml"), "typing", "serial-lin")
