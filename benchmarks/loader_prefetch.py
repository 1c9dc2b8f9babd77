"""Training-loop throughput with batches collated ahead in a background thread against
collation inside the step (``prefetch_batches`` 2 vs 0), same data, seed and model.

    python benchmarks/loader_prefetch.py [--examples 2048] [--batch-size 64] [--rounds 2]

The loop is ``kadapter.training.train`` with the sample preset's tiny RoBERTa as the
frozen encoder and a small trained head over synthetic token ids (lengths 8-64); the two
settings take turns (``--rounds`` each) so a busy machine slows both alike. Prints real
tokens/s of each, the ratio, the collate share of a step, and whether both reach the same
weights; writes ``runs/bench/loader_prefetch.json``. On a CPU the step's compute dwarfs
collation (see the collate share), so the ratio there is mostly the machine's noise; the
gain this is for is on a GPU, where the host would otherwise collate and copy between
kernel launches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kadapter.io import atomic_write_json, versions  # noqa: E402
from kadapter.modeling import load_encoder  # noqa: E402
from kadapter.tiny import ensure_tiny_model  # noqa: E402
from kadapter.training import FeatureTable, PadCollator, TrainingConfig, train  # noqa: E402


class Head(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.out = nn.Linear(hidden, 8)

    def forward(self, states, mask):
        mask = mask.unsqueeze(-1).to(states.dtype)
        return self.out((states * mask).sum(1) / mask.sum(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    encoder = load_encoder(str(ensure_tiny_model()))
    rng = np.random.default_rng(0)
    vocab = encoder.config.vocab_size
    rows = [{"input_ids": rng.integers(4, vocab, size=int(rng.integers(8, 65))).tolist(),
             "label": int(rng.integers(0, 8))} for _ in range(args.examples)]
    table = FeatureTable.from_rows(rows, ragged=["input_ids"])
    collate = PadCollator({"input_ids": encoder.config.pad_token_id})

    started = time.perf_counter()
    for start in range(0, len(table), args.batch_size):
        collate([table[i] for i in range(start, min(start + args.batch_size, len(table)))])
    collate_s = (time.perf_counter() - started) / -(-len(table) // args.batch_size)

    def run(prefetch: int) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        config = TrainingConfig(batch_size=args.batch_size, epochs=1, log_every=10**9,
                                save_every=0, prefetch_batches=prefetch, learning_rate=1e-3)
        with tempfile.TemporaryDirectory() as out:
            result = train(
                config, model=Head(encoder.config.hidden_size), train_data=table,
                collate=collate, output_dir=out, seed=0, frozen=encoder,
                frozen_forward=lambda enc, b: enc(input_ids=b["input_ids"],
                                                  attention_mask=b["attention_mask"]).last_hidden_state,
                loss_fn=lambda m, b, s: nn.functional.cross_entropy(m(s, b["attention_mask"]),
                                                                   b["label"]))
        return result.tokens_per_s, result.model.state_dict()

    rates: dict[int, list[float]] = {0: [], 2: []}
    final = {}
    for _ in range(args.rounds):
        for prefetch in (0, 2):
            rate, final[prefetch] = run(prefetch)
            rates[prefetch].append(rate)
    inline, ahead = float(np.median(rates[0])), float(np.median(rates[2]))
    step_s = int(table.lengths.sum()) / inline / (len(table) // args.batch_size)  # inline s/step
    same = all(torch.equal(final[0][k], final[2][k]) for k in final[0])
    report = {
        "examples": args.examples, "batch_size": args.batch_size, "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "tokens_per_s_inline": round(inline, 1), "tokens_per_s_prefetch": round(ahead, 1),
        "ratio_prefetch_vs_inline": round(ahead / inline, 3),
        "collate_ms_per_batch": round(1e3 * collate_s, 3),
        "collate_share_of_inline_step": round(collate_s / step_s, 6),
        "same_weights": same, "versions": versions(),
    }
    out = Path("runs/bench/loader_prefetch.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"tokens/s inline {inline:,.0f}, prefetch {ahead:,.0f}: ratio {ahead / inline:.3f} "
          f"(collate {1e3 * collate_s:.2f} ms/batch = {collate_s / step_s:.3%} of an inline step; "
          f"same weights: {same}) -> {out}")


if __name__ == "__main__":
    main()
