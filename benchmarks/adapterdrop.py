"""AdapterDrop throughput: inference examples/s of a +F+L K-Adapter model, full against
its adapter layers at the lowest positions dropped, measured in the same run.

    python benchmarks/adapterdrop.py                          # tiny and RoBERTa-large shapes, CPU
    python benchmarks/adapterdrop.py --shapes large --batch-size 32 --length 128   # a GPU
    python benchmarks/adapterdrop.py --tasks sample           # per task, the tiny shape, CPU
    python benchmarks/adapterdrop.py --tasks paper --shapes large --batch-size 8   # per task, a GPU

The model is the fine-tuning model's forward up to the combined features: the encoder,
two adapters (fac, lin: 3 adapter layers each at positions 0, 11, 23; 2 transformer
layers per adapter layer) and the concat combiner, in eval mode under ``no_grad``, with
random weights (no hub here). Shapes: ``tiny`` is the sample preset's (the tiny
24-layer 64-wide RoBERTa and 64-wide adapters); ``large`` is RoBERTa-large with the
paper's adapters (768 wide), at a batch and length a CPU runs in seconds.

Each repetition runs every setting once (full, drop 0, drop 0,11; the order rotates from
one repetition to the next), so a machine shared with other work slows them alike; examples/s = batch / the median time of a
forward over ``--reps`` repetitions (after ``--warmup``). The ratio column is against
the full model of the same run. K-Adapter's adapters sit beside the encoder, not inside
it: dropping an adapter layer removes only that layer's compute (the encoder still runs
every layer), so the ceiling is set by the adapters' share of the forward FLOPs, printed
beside the measured ratio ("expected" = full FLOPs / FLOPs left, matmuls only). Results
are merged into ``runs/bench/adapterdrop.json`` (a run of the same device and shape is
replaced).

``--tasks PRESET``: one run per fine-tuning task of the preset, at the task's own input
shape: its ``max_length`` and sequences per example (CommonsenseQA 5 choices, CosmosQA 4,
the others 1); examples/s then counts task examples (a multiple-choice example is all
its choices), ``--batch-size`` examples a forward (default 16; on a CPU the paper
preset's lengths at the large shape take minutes a setting: run that on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kadapter.io import atomic_write_json, read_json, versions  # noqa: E402
from kadapter.modeling import (  # noqa: E402
    AdapterConfig,
    Combiner,
    KAdapterModel,
    KnowledgeAdapter,
    adapter_flops_per_token,
    encoder_flops_per_token,
)

SHAPES = {
    "tiny": {"encoder": "tiny", "adapter_size": 64, "batch": 16, "length": 64},
    "large": {"encoder": {"hidden": 1024, "layers": 24, "heads": 16, "ffn": 4096},
              "adapter_size": 768, "batch": 2, "length": 64},
}
POSITIONS = [0, 11, 23]
DROPS = [[], [0], [0, 11]]
SEQUENCES_PER_EXAMPLE = {"csqa": 5, "cosmosqa": 4}  # multiple choice: one sequence per choice
OUTPUT = Path("runs/bench/adapterdrop.json")


def build_encoder(spec):
    from transformers import RobertaConfig, RobertaModel

    if spec == "tiny":
        from kadapter.tiny import ensure_tiny_model

        directory = ensure_tiny_model("data/models/tiny-roberta", "data/sample")
        config = RobertaConfig.from_pretrained(str(directory))
    else:
        config = RobertaConfig(vocab_size=50265, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                               num_attention_heads=spec["heads"], intermediate_size=spec["ffn"],
                               max_position_embeddings=514, type_vocab_size=1)
    return RobertaModel(config, add_pooling_layer=False)


def forward(model: KAdapterModel, combiner: Combiner, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(batch["input_ids"], batch["attention_mask"])
    return combiner(out.last_hidden_state, out.adapter_outputs)


def task_shapes(preset: str) -> list[dict]:
    """(task, tokens per sequence, sequences per example) of the preset's fine-tuning tasks."""
    from kadapter.config import load_config, resolve_preset

    finetune = load_config(resolve_preset(preset)).finetune
    return [{"task": task, "length": getattr(finetune, task).max_length,
             "sequences": SEQUENCES_PER_EXAMPLE.get(task, 1)} for task in finetune.tasks]


def run_shape(name: str, args, device: torch.device, task: dict | None = None) -> dict:
    """One shape's three settings; with ``task``, batches of that task's examples."""
    shape = SHAPES[name]
    if task is None:
        examples = batch_size = args.batch_size or shape["batch"]
        length = args.length or shape["length"]
    else:
        examples, length = args.batch_size or 16, task["length"]
        batch_size = examples * task["sequences"]
    torch.manual_seed(0)
    encoder = build_encoder(shape["encoder"])
    hidden, layers = encoder.config.hidden_size, encoder.config.num_hidden_layers
    adapter_config = AdapterConfig(positions=POSITIONS, adapter_size=shape["adapter_size"],
                                   num_transformer_layers=2)
    adapters = {n: KnowledgeAdapter(adapter_config, hidden, layers) for n in ("fac", "lin")}
    model = KAdapterModel(encoder, adapters).to(device).eval()
    combiner = Combiner(list(adapters), hidden, mode="concat").to(device).eval()
    batch = {"input_ids": torch.randint(4, encoder.config.vocab_size, (batch_size, length), device=device),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long, device=device)}
    times: dict[str, list[float]] = {",".join(map(str, d)) or "full": [] for d in DROPS}
    with torch.no_grad():
        for repetition in range(args.warmup + args.reps):
            turn = repetition % len(DROPS)  # each setting takes each place in the order in turn
            for drop, label in list(zip(DROPS, times))[turn:] + list(zip(DROPS, times))[:turn]:
                for adapter in adapters.values():
                    adapter.drop_positions(drop)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward(model, combiner, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repetition >= args.warmup:
                    times[label].append(time.perf_counter() - start)
    # forward FLOPs per token: the encoder, each adapter layer, the combiner
    encoder_flops = encoder_flops_per_token(hidden, layers, encoder.config.intermediate_size, length)
    layer_flops = adapter_flops_per_token(adapter_config, hidden, length) / len(POSITIONS)
    combiner_flops = 3 * 2 * (2 * hidden) * hidden  # two per-adapter 2H -> H layers and out
    full_flops = encoder_flops + 2 * len(POSITIONS) * layer_flops + combiner_flops
    settings = {}
    for drop, (label, measured) in zip(DROPS, times.items()):
        flops = full_flops - 2 * len(drop) * layer_flops
        settings[label] = {"dropped_positions": drop, "median_s": statistics.median(measured),
                           "examples_per_s": examples / statistics.median(measured),
                           "expected_speedup": full_flops / flops}
    full = settings["full"]["examples_per_s"]
    for entry in settings.values():
        entry["speedup"] = entry["examples_per_s"] / full
    return {"shape": name, "device": str(device), **({"task": task["task"], "examples": examples,
                                                      "sequences_per_example": task["sequences"]}
                                                     if task else {}),
            "batch_size": batch_size, "length": length,
            "hidden": hidden, "encoder_layers": layers, "adapter_size": shape["adapter_size"],
            "adapters": 2, "positions": POSITIONS, "reps": args.reps,
            "threads": torch.get_num_threads(),
            "adapter_flops_share": 2 * len(POSITIONS) * layer_flops / full_flops,
            "settings": settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,large", help="comma-separated: tiny, large")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per shape (tiny 16, large 2)")
    parser.add_argument("--length", type=int, default=None, help="tokens per example (default 64)")
    parser.add_argument("--tasks", default=None, metavar="PRESET",
                        help="one run per fine-tuning task of this preset (sample, paper or a path), "
                             "at the task's length and choices; default --shapes tiny")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.shapes_given = any(a == "--shapes" or a.startswith("--shapes=") for a in sys.argv[1:])
    device = torch.device(args.device)
    shapes = args.shapes if args.tasks is None or args.shapes_given else "tiny"
    jobs = [(name.strip(), task) for name in shapes.split(",")
            for task in (task_shapes(args.tasks) if args.tasks else [None])]
    runs = []
    for name, task in jobs:
        result = run_shape(name, args, device, task)
        runs.append(result)
        what = f"{task['task']}, " if task else ""
        print(f"{what}{name} shape on {device} (hidden {result['hidden']}, {result['encoder_layers']} layers, "
              f"2 adapters x 3 layers {result['adapter_size']} wide; batch {result['batch_size']} x "
              f"{result['length']} tokens; adapters {100 * result['adapter_flops_share']:.1f}% of the "
              f"forward FLOPs; {result['threads']} threads, median of {result['reps']})")
        print(f"  {'setting':<10} {'examples/s':>11} {'vs full':>8} {'expected':>9}")
        for label, entry in result["settings"].items():
            print(f"  {('drop ' + label) if label != 'full' else label:<10} {entry['examples_per_s']:>11.2f} "
                  f"{entry['speedup']:>7.3f}x {entry['expected_speedup']:>8.3f}x")
    previous = read_json(OUTPUT).get("runs", []) if OUTPUT.is_file() else []
    def key(run: dict) -> tuple:
        return run["device"], run["shape"], run.get("task")

    kept = [r for r in previous if key(r) not in {key(n) for n in runs}]
    atomic_write_json(OUTPUT, {"runs": kept + runs, "versions": versions()})
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
