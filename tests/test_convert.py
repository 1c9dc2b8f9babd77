"""Converting the original release's checkpoints (microsoft/K-Adapter).

The fixtures are written here from the original's key layout (KADAPTER.md section 8) with
random weights; the expected outputs come from an independent computation of the
original architecture written below from its definition (fac-adapter.py's Adapter /
AdapterModel over pytorch_transformers' BertEncoder), never from our modules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat

import pytest
import torch
import torch.nn.functional as F

from kadapter.convert import ConversionError, convert_checkpoint, original_relations
from kadapter.modeling import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_adapter
from kadapter.pretrain import build_head
from pipelines import convert_original

ORIGINAL_HEADS = 12


# ------------------------------------------------------------------ fixture writer


def original_state(task: str, hidden: int, adapter: int, ffn: int, n_adapters: int,
                   n_transformer: int, seed: int, classes: int = 64) -> dict[str, torch.Tensor]:
    """A random state dict in the original's key layout."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.05, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    state = {}

    def linear(name, out, inp):  # outputs of order 1 at any width, as in a trained model
        state[f"{name}.weight"] = normal(out, inp, std=1 / math.sqrt(inp))
        state[f"{name}.bias"] = normal(out, std=0.02)

    def norm(name, size):
        state[f"{name}.weight"] = normal(size, std=0.1, mean=1.0)
        state[f"{name}.bias"] = normal(size, std=0.1)

    for i in range(n_adapters):
        linear(f"adapter.{i}.down_project", adapter, hidden)
        for j in range(n_transformer):
            p = f"adapter.{i}.encoder.layer.{j}"
            for name in ("query", "key", "value"):
                linear(f"{p}.attention.self.{name}", adapter, adapter)
            linear(f"{p}.attention.output.dense", adapter, adapter)
            norm(f"{p}.attention.output.LayerNorm", adapter)
            linear(f"{p}.intermediate.dense", ffn, adapter)
            linear(f"{p}.output.dense", adapter, ffn)
            norm(f"{p}.output.LayerNorm", adapter)
        linear(f"adapter.{i}.up_project", hidden, adapter)
    linear("com_dense", hidden, 2 * hidden)
    if task == "fac":
        linear("dense", hidden, 2 * hidden)
        linear("out_proj", len(original_relations()), hidden)
    else:
        for name in ("query", "key", "value"):
            linear(f"self_attention.self.{name}", hidden, hidden)
        linear("self_attention.output.dense", hidden, hidden)
        norm("self_attention.output.LayerNorm", hidden)
        linear("dense", hidden, hidden)
        linear("out_proj", classes, hidden)
    return state


def write_original(directory, state, positions=None, skip_layers=0, prefix="", adapter_size=None,
                   transformer_layers=2):
    """pytorch_model.bin (+ training_args.bin, an argparse Namespace, unless positions is None)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + k: v for k, v in state.items()}, directory / "pytorch_model.bin")
    if positions is not None:
        args = argparse.Namespace(adapter_list=list(positions), adapter_size=adapter_size,
                                  adapter_skip_layers=skip_layers,
                                  adapter_transformer_layers=transformer_layers,
                                  model_name="roberta-large", max_seq_length=64)
        torch.save(args, directory / "training_args.bin")
    return directory


def encoder_dir(tmp_path, hidden: int, layers: int = 24):
    """A base-model directory (config.json only) of the given shape."""
    from transformers import RobertaConfig

    path = tmp_path / f"encoder-{hidden}"
    RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, vocab_size=50).save_pretrained(path)
    return path


# ------------------------------------------------------ the original, from its definition


def gelu_erf(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bert_layer(x, sd, p, heads):
    """pytorch_transformers BertLayer (eval): self-attention with the additive mask the
    original builds from an all-ones mask, residual + LayerNorm, GELU FFN, residual + LayerNorm."""
    batch, length, size = x.shape
    head_dim = size // heads

    def lin(t, name):
        return t @ sd[f"{p}.{name}.weight"].T + sd[f"{p}.{name}.bias"]

    def split(t):
        return t.view(batch, length, heads, head_dim).permute(0, 2, 1, 3)

    q, k, v = (split(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores + (1.0 - torch.ones(batch, 1, 1, length)) * -10000.0
    context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, length, size)
    ln = f"{p}.attention.output.LayerNorm"
    attention = F.layer_norm(lin(context, "attention.output.dense") + x, (size,),
                             sd[f"{ln}.weight"], sd[f"{ln}.bias"], 1e-5)
    inner = gelu_erf(lin(attention, "intermediate.dense"))
    ln = f"{p}.output.LayerNorm"
    return F.layer_norm(lin(inner, "output.dense") + attention, (size,),
                        sd[f"{ln}.weight"], sd[f"{ln}.bias"], 1e-5)


def original_adapter_output(sd, hidden_states, positions, transformer_layers):
    """AdapterModel.forward up to hidden_states_last (adapter_skip_layers 0)."""
    last = torch.zeros_like(hidden_states[-1])
    for i, position in enumerate(positions):
        fusion = hidden_states[position] + last
        down = fusion @ sd[f"adapter.{i}.down_project.weight"].T + sd[f"adapter.{i}.down_project.bias"]
        for j in range(transformer_layers):
            down = bert_layer(down, sd, f"adapter.{i}.encoder.layer.{j}", ORIGINAL_HEADS)
        last = fusion + down @ sd[f"adapter.{i}.up_project.weight"].T + sd[f"adapter.{i}.up_project.bias"]
    return last


def original_fac_logits(sd, sequence_output, adapter_out, subj_marker, obj_marker):
    """com_dense -> the @ and # marker states -> dense -> (dropout: eval) -> out_proj."""
    com = torch.cat([sequence_output, adapter_out], 2) @ sd["com_dense.weight"].T + sd["com_dense.bias"]
    rows = torch.arange(com.shape[0])
    pair = torch.cat([com[rows, subj_marker], com[rows, obj_marker]], 1)
    dense = pair @ sd["dense.weight"].T + sd["dense.bias"]
    return dense @ sd["out_proj.weight"].T + sd["out_proj.bias"]


# --------------------------------------------------------------------------- helpers


def check_against_original(out_dir, sd, hidden, layers, positions, transformer_layers, task="fac"):
    from types import SimpleNamespace

    encoder_config = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers)
    loaded = load_adapter(out_dir, encoder_config)
    g = torch.Generator().manual_seed(7)
    hidden_states = tuple(torch.randn(2, 7, hidden, generator=g) for _ in range(layers + 1))
    mask = torch.ones(2, 7, dtype=torch.long)  # no padding: the original's all-ones mask agrees
    with torch.no_grad():
        ours = loaded.adapter.eval()(hidden_states, mask)
        theirs = original_adapter_output(sd, hidden_states, positions, transformer_layers)
    assert (ours - theirs).abs().max().item() < 1e-5
    if task != "fac":
        return loaded
    head = build_head(loaded.config["task"]["head"])
    head.load_state_dict(loaded.head_state)
    subj, obj = torch.tensor([1, 2]), torch.tensor([4, 6])
    with torch.no_grad():
        our_logits = head.eval()(hidden_states[-1], ours,
                                 {"subj_marker": subj, "obj_marker": obj})
        their_logits = original_fac_logits(sd, hidden_states[-1], theirs, subj, obj)
    order = original_relations()
    labels = loaded.config["task"]["labels"]
    assert labels == sorted(order) and labels != order  # really permuted
    column = torch.tensor([order.index(label) for label in labels])
    assert (our_logits - their_logits[:, column]).abs().max().item() < 1e-5
    return loaded


# ----------------------------------------------------------------------------- tests


def test_small_fac_checkpoint_reproduces_the_original(tmp_path):
    hidden, positions = 48, [0, 11, 22]
    sd = original_state("fac", hidden, 24, 48, 3, 2, seed=1)
    ckpt = write_original(tmp_path / "ckpt", sd, positions=positions, adapter_size=24, prefix="module.")
    out = convert_checkpoint(ckpt, "fac", tmp_path / "out", base_model=str(encoder_dir(tmp_path, hidden)))
    loaded = check_against_original(out, sd, hidden, 24, positions, 2)
    config = loaded.config
    assert config["converted_from"]["sha256"] == __import__("hashlib").sha256(
        (ckpt / "pytorch_model.bin").read_bytes()).hexdigest()
    assert config["task"]["head"]["pooling"] == "marker"
    assert config["adapter"]["positions"] == positions
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: kadapter" in card and "license: cc-by-sa-4.0" in card
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, "README.md"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~_umask()


def test_roberta_large_shape_one_adapter_layer(tmp_path):
    """roberta-large's widths (1024 -> 768, FFN 3072, 12 heads, 410 relations), one adapter
    layer to keep the fixture at ~80 MB; the shape comes from the known base model."""
    sd = original_state("fac", 1024, 768, 3072, 1, 2, seed=2)
    ckpt = write_original(tmp_path / "large", sd, positions=[11], adapter_size=768)
    out = convert_checkpoint(ckpt / "pytorch_model.bin", "fac", tmp_path / "out", base_model="roberta-large")
    assert json.loads((out / ADAPTER_CONFIG_FILE).read_text())["encoder"]["num_hidden_layers"] == 24
    check_against_original(out, sd, 1024, 24, [11], 2)


def test_linguistic_adapter_only_and_positions_fallback(tmp_path, capsys):
    hidden = 48
    sd = original_state("lin", hidden, 24, 48, 3, 2, seed=3)
    base = str(encoder_dir(tmp_path, hidden))
    ckpt = write_original(tmp_path / "lin", sd)  # no training_args.bin
    out = convert_checkpoint(ckpt, "lin", tmp_path / "out", base_model=base)
    assert "positions 0,11,22: the shipped default" in capsys.readouterr().out
    loaded = check_against_original(out, sd, hidden, 24, [0, 11, 22], 2, task="lin")
    assert loaded.head_state == {} and loaded.config["task"]["head"] is None
    assert "not converted" in loaded.config["task"]["note"]
    out2 = convert_checkpoint(ckpt, "lin", tmp_path / "out2", base_model=base, positions=[1, 5, 9])
    assert "positions 1,5,9: --positions" in capsys.readouterr().out
    check_against_original(out2, sd, hidden, 24, [1, 5, 9], 2, task="lin")


def test_command_line(tmp_path, capsys):
    hidden = 48
    sd = original_state("fac", hidden, 24, 48, 3, 2, seed=4)
    ckpt = write_original(tmp_path / "ckpt", sd, positions=[0, 11, 22], adapter_size=24)
    convert_original.main(["--checkpoint", str(ckpt), "--task", "fac", "--output_dir",
                           str(tmp_path / "out"), "--base_model", str(encoder_dir(tmp_path, hidden))])
    assert "adapter_list read from" in capsys.readouterr().out
    check_against_original(tmp_path / "out", sd, hidden, 24, [0, 11, 22], 2)
    with pytest.raises(SystemExit):
        convert_original.main(["--checkpoint", str(tmp_path / "nowhere"), "--task", "fac",
                               "--output_dir", str(tmp_path / "x")])
    assert "error: " in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("adapter.1.encoder.layer.0.attention.self.key.bias"),
     "missing tensor adapter.1.encoder.layer.0.attention.self.key.bias"),
    (lambda sd: sd.__setitem__("adapter.0.extra.weight", torch.zeros(2)), "unexpected tensor adapter.0.extra.weight"),
    (lambda sd: sd.__setitem__("out_proj.weight", torch.zeros(409, 48)),
     "tensor out_proj.weight has shape (409, 48), expected (410, 48)"),
    (lambda sd: sd.__setitem__("adapter.2.up_project.bias", torch.zeros(47)),
     "tensor adapter.2.up_project.bias has shape (47,), expected (48,)"),
])
def test_bad_tensors_are_refused_naming_file_and_key(tmp_path, damage, message):
    sd = original_state("fac", 48, 24, 48, 3, 2, seed=5)
    damage(sd)
    ckpt = write_original(tmp_path / "ckpt", sd, positions=[0, 11, 22], adapter_size=24)
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(ckpt, "fac", tmp_path / "out", base_model=str(encoder_dir(tmp_path, 48)))
    text = str(err.value)
    assert message in text and str(ckpt / "pytorch_model.bin") in text and "\n" not in text
    assert not (tmp_path / "out").exists()


def test_skip_connections_are_refused(tmp_path):
    sd = original_state("fac", 48, 24, 48, 3, 2, seed=6)
    ckpt = write_original(tmp_path / "ckpt", sd, positions=[0, 11, 22], adapter_size=24, skip_layers=6)
    with pytest.raises(ConversionError, match=r"training_args.bin: adapter_skip_layers 6 >= 1"):
        convert_checkpoint(ckpt, "fac", tmp_path / "out", base_model=str(encoder_dir(tmp_path, 48)))
    assert not (tmp_path / "out").exists()


class _Creates:
    """Unpickling this calls open(path, 'w'): code run by the loader would create the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_carrying_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    sd = original_state("fac", 48, 24, 48, 3, 2, seed=8)
    ckpt = write_original(tmp_path / "ckpt", sd, positions=[0, 11, 22], adapter_size=24)
    # training_args.bin carrying code: refused (treated as unreadable), never run
    torch.save({"args": _Creates(marker)}, ckpt / "training_args.bin")
    out = convert_checkpoint(ckpt, "fac", tmp_path / "out", base_model=str(encoder_dir(tmp_path, 48)))
    assert not marker.exists() and out.is_dir()
    assert "training_args.bin unreadable" in capsys.readouterr().out
    # pytorch_model.bin carrying code: the conversion is refused
    torch.save({**sd, "trap": _Creates(marker)}, ckpt / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refused"):
        convert_checkpoint(ckpt, "fac", tmp_path / "out2", base_model=str(encoder_dir(tmp_path, 48)))
    assert not marker.exists() and not (tmp_path / "out2").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
