"""AdapterDrop (Rücklé et al., 2021) at inference: dropping nothing is the full model,
a dropped layer is skipped as specified, bad positions are one-line errors, and the
pipeline step re-predicts a fine-tuned run and adds its rows to the results table."""

from __future__ import annotations

import json

import pytest
import torch
from test_finetune import config_for, workspace  # noqa: F401  (the module's fixture)

from kadapter.adapterdrop import AdapterDropConfig
from kadapter.config import ConfigError
from kadapter.finetune import run_finetune
from kadapter.modeling import AdapterConfig, KnowledgeAdapter
from pipelines.adapterdrop import main

HIDDEN, LAYERS = 16, 24


def _adapter_and_states(input_mode: str = "sum"):
    torch.manual_seed(0)
    config = AdapterConfig(positions=[0, 11, 23], adapter_size=8, num_transformer_layers=1,
                           num_heads=2, input_mode=input_mode, init_std=0.2)
    adapter = KnowledgeAdapter(config, HIDDEN, LAYERS).eval()
    states = tuple(torch.randn(2, 5, HIDDEN) for _ in range(LAYERS + 1))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    return adapter, states, mask


@pytest.mark.parametrize("input_mode", ["sum", "concat"])
def test_dropping_nothing_is_the_full_adapter(input_mode):
    adapter, states, mask = _adapter_and_states(input_mode)
    with torch.no_grad():
        full = adapter(states, mask)
        adapter.drop_positions([0])
        dropped = adapter(states, mask)
        adapter.drop_positions([])
        assert torch.equal(adapter(states, mask), full)
    assert not torch.allclose(dropped, full)


def test_a_dropped_layer_is_skipped():
    """Drop 0: layer 11 gets its state + zeros; drop 0,11: layer 23 gets its state + zeros;
    drop 11: layer 23 gets its state + layer 0's output; drop all: zeros."""
    adapter, states, mask = _adapter_and_states()
    key_mask = mask.bool()[:, None, None, :]
    first, middle, last = adapter.layers
    with torch.no_grad():
        expected = {
            (0,): last(states[23] + middle(states[11], key_mask), key_mask),
            (0, 11): last(states[23], key_mask),
            (11,): last(states[23] + first(states[0], key_mask), key_mask),
            (0, 11, 23): torch.zeros(2, 5, HIDDEN),
        }
        for drop, output in expected.items():
            adapter.drop_positions(list(drop))
            assert torch.equal(adapter(states, mask), output), drop


def test_invalid_drops_are_one_line_errors(workspace):  # noqa: F811
    adapter, _, _ = _adapter_and_states()
    with pytest.raises(ValueError, match=r"cannot drop adapter positions \[5\]: this adapter's layers "
                                         r"sit at \[0, 11, 23\]") as err:
        adapter.drop_positions([0, 5])
    assert "\n" not in str(err.value)
    assert adapter.dropped_positions == frozenset()  # unchanged
    with pytest.raises(ValueError, match="non-empty position lists"):
        AdapterDropConfig(drops=[[]])
    with pytest.raises(ValueError, match="no adapter to drop"):
        AdapterDropConfig(variants=["none"])
    config = config_for(workspace, "--adapterdrop.tasks", "[typing]", "--adapterdrop.variants", "[fac]",
                        "--adapterdrop.drops", "[[12]]", "--adapterdrop.output_dir",
                        str(workspace / "drop-bad"))
    run_finetune(config, "typing", "fac")
    with pytest.raises(ConfigError, match=r"adapterdrop.drops \[12\]: fac adapter: cannot drop"):
        main(config)


def test_pipeline_scores_each_drop_and_adds_the_rows(workspace, capsys):  # noqa: F811
    config = config_for(workspace, "--adapterdrop.tasks", "[typing, tacred]",
                        "--adapterdrop.output_dir", str(workspace / "drop"))
    run_finetune(config, "typing", "fac,lin")  # tacred has no +F+L run: reported and skipped
    main(config)
    out = capsys.readouterr().out
    assert "adapterdrop tacred +F+L: no fine-tuned run at" in out
    result = json.loads((workspace / "drop/typing/fac+lin.json").read_text())
    assert set(result["scores"]) == {"none", "0", "0,11"}
    assert result["full_matches_run"] is True  # the reloaded full model scores as the run did
    run_metrics = json.loads((workspace / "runs/typing/fac+lin/metrics.json").read_text())
    assert result["scores"]["none"]["test"] == run_metrics["test"]
    summary = json.loads((workspace / "drop/results.json").read_text())
    assert summary["missing"][0]["task"] == "tacred" and len(summary["results"]) == 1
    table = (workspace / "results.md").read_text()
    for label in ("+F+L drop 0", "+F+L drop 0,11"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        f1 = 100 * result["scores"][label.split()[-1]]["test"]["f1"]
        assert f"| {f1:.2f} |" in row
    assert table.index("| +F+L |") < table.index("| +F+L drop 0 |") < table.index("| +F+L drop 0,11 |")
    main(config)
    assert "adapterdrop typing +F+L: up to date" in capsys.readouterr().out
