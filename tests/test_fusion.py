"""AdapterFusion (Pfeiffer et al., 2021) as the Combiner's ``fusion`` mode and the
fine-tuning variant ``fusion``: one-hot attention reproduces an adapter's ``add`` model,
the start is the average of the candidates, dtypes, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune import config_for, workspace  # noqa: F401  (the module's fixture)

from kadapter.finetune import (
    FinetuneModel,
    adapter_sources,
    canonical_variant,
    run_finetune,
    run_fingerprint,
    variant_combine,
)
from kadapter.modeling import Combiner, load_adapter, load_encoder


def _one_hot(index: int):
    """A stand-in for Combiner.fusion_weights putting all weight on candidate ``index``
    (0 = the encoder state, 1 + i = the i-th adapter in sorted order)."""
    def weights(encoder_last, candidates):
        out = torch.zeros(candidates.shape[:-1])
        out[..., index] = 1.0
        return out
    return weights


def _identity_value(combiner: Combiner) -> None:
    with torch.no_grad():
        combiner.value.weight.copy_(torch.eye(combiner.value.weight.shape[0]))


@pytest.mark.parametrize("index, adapter", [(1, "fac"), (2, "lin")])
def test_one_hot_fusion_equals_that_adapters_add_combiner(index, adapter):
    torch.manual_seed(0)
    fusion = Combiner(["lin", "fac"], 16, mode="fusion")
    _identity_value(fusion)
    fusion.fusion_weights = _one_hot(index)
    last = torch.randn(2, 5, 16)
    outputs = {"fac": torch.randn(2, 5, 16), "lin": torch.randn(2, 5, 16)}
    added = Combiner([adapter], 16, mode="add")(last, {adapter: outputs[adapter]})
    assert torch.equal(fusion(last, outputs), added)
    fusion.fusion_weights = _one_hot(0)  # all on the encoder state: the encoder-alone row
    assert torch.equal(fusion(last, outputs), last)


def test_fusion_starts_from_the_average_of_the_candidates():
    torch.manual_seed(0)
    fusion = Combiner(["fac", "lin"], 16, mode="fusion").eval()
    value = fusion.value.weight
    assert torch.equal(value.diagonal(), torch.ones(16))
    assert torch.equal(value - torch.diag(value.diagonal()), torch.full((16, 16), 1e-6).fill_diagonal_(0))
    last = torch.randn(2, 5, 16)
    outputs = {"fac": torch.randn(2, 5, 16), "lin": torch.randn(2, 5, 16)}
    average = last + (outputs["fac"] + outputs["lin"]) / 3
    weights = fusion.fusion_weights(last, fusion.fusion_candidates(last, outputs))
    assert weights.shape == (2, 5, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert weights.min() > 0.25 and weights.max() < 0.45  # N(0, 0.02) query and key: near uniform
    with torch.no_grad():
        fusion.query.weight.zero_()  # a zero query: exactly uniform weights
    torch.testing.assert_close(fusion(last, outputs), fusion.value(average), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fusion(last, outputs), average, rtol=0, atol=1e-3)


def test_fusion_dtypes_follow_the_other_modes():
    torch.manual_seed(0)
    fusion = Combiner(["fac", "lin"], 8, mode="fusion")
    last = torch.randn(2, 3, 8).to(torch.bfloat16)  # a bf16 frozen encoder
    outputs = {"fac": torch.randn(2, 3, 8), "lin": torch.randn(2, 3, 8)}
    assert fusion(last, outputs).dtype == torch.float32  # fp32 weights, no autocast
    with torch.autocast("cpu", torch.bfloat16):
        out = fusion(last, outputs)
        assert out.shape == (2, 3, 8)
        assert torch.isfinite(out.float()).all()
    assert all(p.dtype == torch.float32 for p in fusion.parameters())
    out.float().sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())


def test_fusion_model_with_one_hot_attention_equals_the_add_model(workspace, tiny_model_dir):  # noqa: F811
    """End to end on the tiny encoder and two real adapters: the fused +F+L model with its
    attention one-hot on fac gives the +F ``add`` model's logits exactly."""
    from kadapter.tasks import TASKS

    task = TASKS["typing"]
    encoder = load_encoder(str(tiny_model_dir))
    adapters = {name: load_adapter(workspace / f"{name}-adapter", encoder.config).adapter
                for name in ("fac", "lin")}
    torch.manual_seed(0)
    head = task.head(encoder.config.hidden_size, 9, 0.1, "entity", "linear")
    fused = FinetuneModel(encoder, adapters, head, "fusion").eval()
    added = FinetuneModel(encoder, {"fac": adapters["fac"]}, head, "add").eval()
    _identity_value(fused.combiner)
    fused.combiner.fusion_weights = _one_hot(1)
    batch = {"input_ids": torch.tensor([[0, 100, 200, 300, 2, 1], [0, 50, 60, 70, 80, 2]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]),
             "span_start": torch.tensor([[1], [2]]), "span_end": torch.tensor([[2], [3]]),
             "marker": torch.tensor([[1], [2]])}
    with torch.no_grad():
        assert torch.equal(fused(batch), added(batch))
    # trainable: encoder, fusion, head; the adapters stay frozen
    names = {n.split(".")[0] + "." + n.split(".")[1] for n, p in fused.named_parameters() if p.requires_grad}
    assert {"combiner.query", "combiner.key", "combiner.value"} <= names
    assert not any(p.requires_grad for p in fused.kadapter.adapters.parameters())


def test_fusion_variant_runs_and_reloads(workspace, tiny_model_dir):  # noqa: F811
    config = config_for(workspace, "--finetune.combine", "add")
    assert canonical_variant("fusion") == "fusion"
    assert canonical_variant(" fusion ") == "fusion"
    assert sorted(adapter_sources(config, "fusion")) == ["fac", "lin"]
    assert variant_combine(config, "fusion") == "fusion"  # whatever finetune.combine says
    assert variant_combine(config, "fac,lin") == "add"
    assert run_fingerprint(config, "typing", "fusion") != run_fingerprint(config, "typing", "fac,lin")
    with pytest.raises(ValueError, match="named variant"):
        canonical_variant("fusion,fac")
    run_finetune(config, "typing", "fusion")
    out = workspace / "runs/typing/fac+lin-fusion"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variant"] == "fusion" and manifest["parameters"]["combine"] == "fusion"
    assert manifest["fingerprint"] == run_fingerprint(config, "typing", "fusion")
    assert set(manifest["inputs"]["adapters"]) == {"fac", "lin"}
    # Pfeiffer et al.: only the fusion layer and the head train, the encoder stays as loaded
    hidden = 64
    fusion_size = 2 * (hidden * hidden + hidden) + hidden * hidden
    head = manifest["trainable_parameters"] - fusion_size
    assert manifest["parameters"]["train_encoder"] is False and 0 < head < 10 * hidden * 9
    from safetensors.torch import load_file

    trained = load_file(str(out / "best/model.safetensors"))
    name = "kadapter.encoder.encoder.layer.23.output.dense.weight"
    assert torch.equal(trained[name], load_encoder(str(tiny_model_dir)).state_dict()[name[len("kadapter.encoder."):]])
    assert run_fingerprint(config_for(workspace, "--finetune.fusion_train_encoder", "true"), "typing",
                           "fusion") != run_fingerprint(config, "typing", "fusion")
    from kadapter.inference import load_finetuned

    model = load_finetuned(out / "model")
    assert model.config["combine"] == "fusion" and model.model.combiner.mode == "fusion"
    assert not torch.equal(model.model.combiner.value.weight.detach(),
                           torch.full_like(model.model.combiner.value.weight, 1e-6).fill_diagonal_(1.0))
