"""The K-Adapter model: near-identity init, frozen encoder, real attention mask, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from kadapter.modeling import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterConfig,
    AdapterLoadError,
    Combiner,
    KAdapterModel,
    KnowledgeAdapter,
    ModelConfig,
    ModelNotAvailable,
    count_parameters,
    load_adapter,
    load_encoder,
    max_sequence_length,
    resolve_model_path,
    save_adapter,
)

HIDDEN, LAYERS, VOCAB = 32, 24, 120


def tiny_encoder(kind: str, hidden: int = HIDDEN, layers: int = LAYERS) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=80)
    if kind == "roberta":
        return RobertaModel(RobertaConfig(pad_token_id=1, type_vocab_size=1, **common),
                            add_pooling_layer=False)
    return BertModel(BertConfig(pad_token_id=0, **common), add_pooling_layer=False)


def batch(kind: str, lengths=(9, 6), pad_to: int | None = None):
    pad = 1 if kind == "roberta" else 0
    width = pad_to or max(lengths)
    generator = torch.Generator().manual_seed(1)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(5, VOCAB, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def make_model(kind: str = "roberta", **adapter_kwargs) -> KAdapterModel:
    encoder = tiny_encoder(kind)
    torch.manual_seed(2)
    config = AdapterConfig(adapter_size=16, **adapter_kwargs)
    return KAdapterModel(encoder, {"fac": KnowledgeAdapter(config, HIDDEN, LAYERS)})


@pytest.mark.parametrize("kind", ["roberta", "bert"])
@pytest.mark.parametrize("input_mode", ["sum", "concat"])
def test_fresh_adapter_is_near_identity(kind, input_mode):
    """Init implies: every adapter layer ~ identity, so the output ~ sum of the states at its positions."""
    model = make_model(kind, input_mode=input_mode)
    ids, mask = batch(kind)
    out = model(ids, mask)
    expected = sum(out.hidden_states[p] for p in model.adapters["fac"].config.positions)
    deviation = (out.adapter_outputs["fac"] - expected).abs().max().item()
    assert deviation < 0.01 * expected.abs().mean().item(), deviation
    # ... and the init is not *exactly* the identity: the adapter really runs.
    assert deviation > 0


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_encoder_outputs_identical_with_adapters_before_and_after_training(kind):
    model = make_model(kind)
    head = torch.nn.Linear(HIDDEN, 3)
    ids, mask = batch(kind)
    bare = tiny_encoder(kind).eval()  # same seed -> same weights as model.encoder
    with torch.no_grad():
        reference = bare(input_ids=ids, attention_mask=mask).last_hidden_state
    encoder_weights = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    model.train()
    assert not model.encoder.training, "a frozen encoder must stay in eval mode (no dropout)"
    out = model(ids, mask)
    assert torch.equal(out.last_hidden_state, reference)
    assert not out.last_hidden_state.requires_grad, "no autograd graph for a frozen encoder"

    optimizer = torch.optim.AdamW([*model.trainable_parameters(), *head.parameters()], lr=1e-2)
    combined = Combiner(["fac"], HIDDEN, "add")(out.last_hidden_state, out.adapter_outputs)
    loss = torch.nn.functional.cross_entropy(head(combined[:, 0]), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.adapters.parameters())
    optimizer.step()

    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, encoder_weights[key]), key
    after = model(ids, mask)
    assert torch.equal(after.last_hidden_state, reference)
    assert not torch.equal(after.adapter_outputs["fac"], out.adapter_outputs["fac"])


def test_only_adapter_parameters_are_trainable():
    model = make_model()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.adapters.parameters()}
    assert count_parameters(model.adapters) == sum(p.numel() for p in model.trainable_parameters())


def test_frozen_adapters_pass_gradients_to_a_trainable_encoder():
    """Fine-tuning: encoder trains, pretrained adapters stay frozen and in eval mode."""
    encoder = tiny_encoder("roberta")
    adapter = KnowledgeAdapter(AdapterConfig(adapter_size=16), HIDDEN, LAYERS)
    model = KAdapterModel(encoder, {"fac": adapter}, freeze_encoder=False, frozen_adapters=["fac"])
    model.train()
    assert model.encoder.training and not model.adapters["fac"].training
    ids, mask = batch("roberta")
    model(ids, mask).adapter_outputs["fac"].sum().backward()
    assert all(p.grad is None for p in adapter.parameters())
    assert model.encoder.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_padding_does_not_change_adapter_outputs_at_real_tokens(kind):
    # Large projection weights (like a trained adapter), so the attention's effect is visible.
    model = make_model(kind, init_std=0.1)
    lengths = (9, 6)
    ids, mask = batch(kind, lengths)
    padded_ids, padded_mask = batch(kind, lengths, pad_to=20)
    out = model(ids, mask).adapter_outputs["fac"]
    padded = model(padded_ids, padded_mask).adapter_outputs["fac"]
    for row, length in enumerate(lengths):
        torch.testing.assert_close(padded[row, :length], out[row, :length], atol=1e-5, rtol=1e-5)

    # The original's all-ones adapter mask lets real tokens attend to padding: outputs move.
    adapter = model.adapters["fac"]
    hidden = model(padded_ids, padded_mask).hidden_states
    all_ones = adapter(hidden, torch.ones_like(padded_mask))
    assert not torch.allclose(all_ones[1, :6], out[1, :6], atol=1e-5)


def test_adapter_positions_must_exist_in_the_encoder():
    with pytest.raises(ValueError, match="out of range"):
        KnowledgeAdapter(AdapterConfig(positions=[0, 11, 25], adapter_size=16), HIDDEN, LAYERS)


def test_paper_shape_parameter_count():
    """3 adapter layers x ~15.75M at RoBERTa-large shape (hidden 1024 -> 768, 2 layers, FFN 3072)."""
    adapter = KnowledgeAdapter(AdapterConfig(), 1024, 24)
    per_layer = count_parameters(adapter.layers[0])
    assert per_layer == 15_750_400
    assert count_parameters(adapter) == 3 * per_layer == 47_251_200


@pytest.mark.parametrize("mode", ["concat", "add"])
@pytest.mark.parametrize("names", [[], ["fac"], ["lin"], ["fac", "lin"]])
def test_combiner_handles_any_subset(mode, names):
    torch.manual_seed(0)
    last = torch.randn(2, 5, HIDDEN)
    outputs = {n: torch.randn(2, 5, HIDDEN) for n in ("fac", "lin")}
    combined = Combiner(names, HIDDEN, mode)(last, outputs)
    assert combined.shape == last.shape
    if not names:
        assert torch.equal(combined, last)
    elif mode == "add":
        torch.testing.assert_close(combined, last + sum(outputs[n] for n in names))


def test_combiner_names_missing_adapter_output():
    with pytest.raises(KeyError, match="lin"):
        Combiner(["fac", "lin"], HIDDEN)(torch.zeros(1, 2, HIDDEN), {"fac": torch.zeros(1, 2, HIDDEN)})


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_model(input_mode="concat")
    head = {"weight": torch.randn(3, 2 * HIDDEN), "bias": torch.randn(3)}
    task = {"name": "relation_classification", "labels": ["P17", "P19", "P27"]}
    save_adapter(tmp_path / "fac", model.adapters["fac"], base_model="tiny",
                 encoder_config=model.encoder.config, task=task, head_state=head)
    config = json.loads((tmp_path / "fac" / ADAPTER_CONFIG_FILE).read_text())
    assert config["adapter"]["positions"] == [0, 11, 23]
    assert config["task"] == task and "hidden_states" in config["positions_convention"]

    loaded = load_adapter(tmp_path / "fac", model.encoder.config)
    for key, value in head.items():
        assert torch.equal(loaded.head_state[key], value)
    reloaded = KAdapterModel(model.encoder, {"fac": loaded.adapter})
    ids, mask = batch("roberta")
    assert torch.equal(reloaded(ids, mask).adapter_outputs["fac"],
                       model(ids, mask).adapter_outputs["fac"])


def test_loading_onto_a_mismatched_encoder_fails_clearly(tmp_path):
    model = make_model()
    save_adapter(tmp_path / "fac", model.adapters["fac"], base_model="tiny",
                 encoder_config=model.encoder.config, task={"name": "x"})
    other = tiny_encoder("roberta", hidden=48, layers=12).config
    with pytest.raises(AdapterLoadError, match="hidden_size: adapter built for 32, encoder has 48"):
        load_adapter(tmp_path / "fac", other)


@pytest.mark.parametrize("damage", ["missing_config", "missing_weights", "corrupt_weights",
                                    "corrupt_config", "wrong_tensor_shape"])
def test_damaged_adapter_directory_fails_clearly(tmp_path, damage):
    model = make_model()
    directory = tmp_path / "fac"
    save_adapter(directory, model.adapters["fac"], base_model="tiny",
                 encoder_config=model.encoder.config, task={"name": "x"})
    if damage == "missing_config":
        (directory / ADAPTER_CONFIG_FILE).unlink()
    elif damage == "missing_weights":
        (directory / ADAPTER_WEIGHTS_FILE).unlink()
    elif damage == "corrupt_weights":
        (directory / ADAPTER_WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    elif damage == "corrupt_config":
        (directory / ADAPTER_CONFIG_FILE).write_text("{not json")
    else:
        config = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
        config["adapter"]["adapter_size"] = 8
        (directory / ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=str(directory)):
        load_adapter(directory, model.encoder.config)


def test_unavailable_model_names_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached copy either
    with pytest.raises(ModelNotAvailable, match="--model.name_or_path") as err:
        load_encoder("roberta-large")
    assert "PRESET=sample" in str(err.value)
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        load_encoder(str(tmp_path / "no" / "such-model"))


def test_tiny_model_loads_with_auto_classes(tiny_model_dir):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    path = resolve_model_path(ModelConfig(tiny_dir=str(tiny_model_dir)))
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = json.loads((tiny_model_dir / "vocab.json").read_text())
    assert len(tokenizer) == len(vocab) > 1000, "the tokenizer must carry the trained vocabulary"
    for word in (" the", " and", " was", " of", " in"):
        assert len(tokenizer.tokenize(word)) == 1, word
    encoder = AutoModel.from_pretrained(path)
    assert encoder.config.num_hidden_layers == 24
    assert encoder.config.vocab_size == len(tokenizer)
    mlm = AutoModelForMaskedLM.from_pretrained(path)
    ids = tokenizer(["The river was long."], return_tensors="pt")
    assert mlm(**ids).logits.shape[-1] == len(tokenizer)


def test_tiny_model_build_is_deterministic(tmp_path, repo_root):
    from kadapter.tiny import build_tiny_model, corpus_files

    files = corpus_files(repo_root / "data/sample")
    for name in ("a", "b"):
        build_tiny_model(tmp_path / name, files)
    for name in ("model.safetensors", "vocab.json", "merges.txt", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("kind, tokenizer_max, expected", [
    ("roberta", None, 78),   # 80 positions; ids start after pad id 1, so 2 are never used
    ("bert", None, 80),      # absolute positions from 0
    ("roberta", 64, 64),     # the tokenizer's model_max_length caps it
    ("bert", 10**30, 80),    # an unset model_max_length (transformers' 1e30) does not
])
def test_max_sequence_length(kind, tokenizer_max, expected):
    encoder = tiny_encoder(kind)
    tokenizer = None if tokenizer_max is None else type("T", (), {"model_max_length": tokenizer_max})()
    assert max_sequence_length(encoder, tokenizer) == expected
