"""Throughput of the factual adapter's pretraining step: our path against the original's.

    python benchmarks/pretrain_throughput.py                       # CPU, RoBERTa-base shape
    python benchmarks/pretrain_throughput.py --shape large --steps 30 --batch-size 128  # GPU

Both paths train the same adapter (3 adapter layers, 768 wide, 2 transformer layers
each) and relation head, from the same initial weights, on the same examples (the sample
T-REx-rc sentences with @/# markers), for the same number of optimizer steps, beside a
frozen encoder of RoBERTa shape with random weights (no hub here):

- ours: the encoder in eval mode under ``no_grad`` (bf16 weights on CUDA); the adapter
  and head in fp32 under bf16 autocast on CUDA; batches of similar lengths (length
  grouping) padded only to their longest example (to a multiple of 8 on CUDA);
- original: the encoder in fp32, in train mode (dropout on) and run with autograd
  enabled (its weights frozen); the adapter and head in fp32; random batches, every
  one padded to max_length (64).

Throughput counts real (non-pad) tokens per second of wall time over the timed steps
(after ``--warmup`` untimed ones); the two paths take turns step by step, so a machine
shared with other work slows both alike. Achieved GFLOP/s = real tokens/s x model FLOPs
per token (encoder forward + 3 x adapter forward, attention included; padding is not
useful work). Two yardsticks: this machine's own matrix-multiply rate, measured in the
same run (best of repeated (batch x max_length, hidden) @ (hidden, ffn) products in the
dtype ours computes in: fp32 on CPU, bf16 on CUDA; the better of a measurement before
and one after the steps), and MFU against the device's
datasheet peak (H100 SXM / H200: 989 TFLOP/s dense bf16, H100 PCIe 756; null for other
devices unless ``--peak-tflops``). On CUDA the peak memory allocated is reported too:
over the whole run, and per path the most a training step adds above what was
allocated before it. Before timing, both paths compute the loss of one batch with dropout
off; "first_step_losses_agree" says whether they matched (padding and precision must not
change the result). Results are merged into ``runs/bench/pretrain_throughput.json`` (a
list of runs; a run of the same device and shape is replaced).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kadapter.config import load_config  # noqa: E402
from kadapter.io import atomic_write_json, read_json, versions  # noqa: E402
from kadapter.modeling import (  # noqa: E402
    AdapterConfig,
    KnowledgeAdapter,
    adapter_flops_per_token,
    encoder_flops_per_token,
    load_tokenizer,
    resolve_model_path,
)
from kadapter.pretrain import PretrainModel, RelationHead, encode_hidden_states, fac_features  # noqa: E402
from kadapter.training import PadCollator, batch_order, optimizer_groups  # noqa: E402

SHAPES = {  # RoBERTa shapes; adapter positions: embeddings, middle, last-but-one layer
    "base": {"hidden": 768, "layers": 12, "heads": 12, "ffn": 3072, "positions": [0, 6, 11]},
    "large": {"hidden": 1024, "layers": 24, "heads": 16, "ffn": 4096, "positions": [0, 11, 23]},
}
VOCAB = 50265
MAX_LENGTH = 64
# dense bf16 datasheet peaks, most specific name first
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}


def sample_features(workdir: Path):
    """The sample preset's T-REx-rc train split, marked and tokenized (tiny tokenizer)."""
    from kadapter.trex import build_trex_rc

    config = load_config("configs/sample.yaml")
    build_trex_rc(config.data_trex, seed=config.seed, output_dir=workdir / "trex_rc")
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    labels = read_json(workdir / "trex_rc" / "relations.json")
    table, _ = fac_features(workdir / "trex_rc" / "train.parquet", tokenizer, MAX_LENGTH, labels)
    return table, len(labels), tokenizer.pad_token_id


def random_encoder(shape: dict, pad_id: int):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"],
                           num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                           intermediate_size=shape["ffn"], max_position_embeddings=MAX_LENGTH + 2,
                           type_vocab_size=1, pad_token_id=pad_id)
    return RobertaModel(config, add_pooling_layer=False)


def trainable_part(shape: dict, num_labels: int) -> PretrainModel:
    torch.manual_seed(1)
    adapter = KnowledgeAdapter(AdapterConfig(positions=shape["positions"]), shape["hidden"],
                               shape["layers"])
    return PretrainModel(adapter, RelationHead(shape["hidden"], num_labels, pooling="entity"))


def batches(table, batch_size: int, count: int, grouped: bool) -> list[np.ndarray]:
    """``count`` batches over as many epochs as needed (same examples for both paths)."""
    out, epoch = [], 0
    while len(out) < count:
        order = batch_order(table.lengths, batch_size, seed=0, epoch=epoch, group_by_length=grouped)
        out += [b for b in order if len(b) == batch_size]
        epoch += 1
    return out[:count]


class TrainingStep:
    """One way of running the step: how the encoder runs and how batches are padded."""

    def __init__(self, name: str, encoder, model, device, ours: bool, pad_id: int):
        self.name, self.ours, self.device = name, ours, device
        cuda = device.type == "cuda"
        self.encoder = encoder.to(device=device,
                                  dtype=torch.bfloat16 if ours and cuda else torch.float32)
        self.encoder.requires_grad_(False)
        self.model = model.to(device)
        self.autocast = ours and cuda
        self.collate = PadCollator({"input_ids": pad_id},
                                   pad_to_multiple_of=8 if ours and cuda else None,
                                   pad_to=None if ours else MAX_LENGTH)
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, 0.01), lr=2e-5,
                                           fused=True)  # the same optimizer in both paths

    def loss(self, batch, train: bool) -> torch.Tensor:
        self.encoder.train(train and not self.ours)  # the original left dropout on
        self.model.train(train)
        grad = torch.no_grad() if self.ours else torch.enable_grad()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            with grad:
                states = encode_hidden_states(self.encoder, batch)
            logits = self.model(states, batch)
        return F.cross_entropy(logits.float(), batch["label"])

    def step(self, table, index) -> tuple[int, int]:
        batch = {k: v.to(self.device, non_blocking=True)
                 for k, v in self.collate([table[int(i)] for i in index]).items()}
        self.loss(batch, train=True).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device, dtype, rows: int, inner: int, cols: int, seconds: float = 1.0) -> float:
    """Best rate of ``(rows, inner) @ (inner, cols)`` products on ``device`` over ~``seconds``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, inner, generator=generator).to(device, dtype)
    b = torch.randn(inner, cols, generator=generator).to(device, dtype)
    flops = 2.0 * rows * inner * cols
    repeats = 1
    best = math.inf
    deadline = time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up: kernels chosen, memory allocated
    while time.perf_counter() < deadline or best == math.inf:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        synchronize(device)
        elapsed = (time.perf_counter() - started) / repeats
        best = min(best, elapsed)
        repeats = max(1, min(1000, int(0.05 / max(elapsed, 1e-9))))  # ~50 ms per timing
    return flops / best / 1e9


def run(args) -> dict:
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as workdir:
        table, num_labels, pad_id = sample_features(Path(workdir))
    print(f"{len(table)} sample examples, mean length {table.lengths.mean():.1f} tokens "
          f"(max_length {MAX_LENGTH}); {args.shape} shape on {device}")

    paths = {
        "ours": TrainingStep("ours", random_encoder(shape, pad_id), trainable_part(shape, num_labels),
                      device, ours=True, pad_id=pad_id),
        "baseline": TrainingStep("baseline", random_encoder(shape, pad_id),
                          trainable_part(shape, num_labels), device, ours=False, pad_id=pad_id),
    }
    # the same loss on the same batch, dropout off: padding and precision do not change it
    probe = [table[i] for i in range(args.batch_size)]
    first = {}
    for name, path in paths.items():
        batch = {k: v.to(device) for k, v in path.collate(probe).items()}
        with torch.no_grad():
            first[name] = path.loss(batch, train=False).item()
    tolerance = 2e-2 if device.type == "cuda" else 1e-4
    agree = math.isclose(first["ours"], first["baseline"], rel_tol=tolerance)

    # steps alternate between the paths, so load from other processes hits both alike
    plans = {name: batches(table, args.batch_size, args.warmup + args.steps, name == "ours")
             for name in paths}
    measured = {name: {"seconds": 0.0, "real_tokens": 0, "padded_tokens": 0} for name in paths}
    step_extra_bytes = dict.fromkeys(paths, 0)  # CUDA: most a step allocates above its start
    cuda = device.type == "cuda"
    # the machine's matmul rate, before and after the steps (the better of the two counts)
    matmul_dtype = torch.bfloat16 if cuda else torch.float32
    matmul_shape = (args.batch_size * MAX_LENGTH, shape["hidden"], shape["ffn"])
    matmul_before = matmul_gflops(device, matmul_dtype, *matmul_shape)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    run_peak = 0
    for step in range(args.warmup + args.steps):
        for name, path in paths.items():
            synchronize(device)
            if cuda:
                before = torch.cuda.memory_allocated(device)
                run_peak = max(run_peak, torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            real, padded = path.step(table, plans[name][step])
            synchronize(device)
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                run_peak = max(run_peak, peak)
                step_extra_bytes[name] = max(step_extra_bytes[name], peak - before)
            if step >= args.warmup:
                totals = measured[name]
                totals["seconds"] += time.perf_counter() - started
                totals["real_tokens"] += real
                totals["padded_tokens"] += padded
    for name, totals in measured.items():
        totals["tokens_per_s"] = totals["real_tokens"] / totals["seconds"]
        print(f"{name:>8}: {totals['tokens_per_s']:10,.0f} real tokens/s  "
              f"({totals['real_tokens']:,} real of {totals['padded_tokens']:,} positions, "
              f"{totals['seconds']:.1f}s for {args.steps} steps)")

    mean_length = float(table.lengths.mean())
    flops_per_token = encoder_flops_per_token(shape["hidden"], shape["layers"], shape["ffn"],
                                              int(mean_length))
    flops_per_token += 3 * adapter_flops_per_token(AdapterConfig(positions=shape["positions"]),
                                                   shape["hidden"], int(mean_length))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    matmul = max(matmul_before, matmul_gflops(device, matmul_dtype, *matmul_shape))
    print(f"matrix multiply ({args.batch_size * MAX_LENGTH} x {shape['hidden']} @ "
          f"{shape['hidden']} x {shape['ffn']}, {str(matmul_dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads): {matmul:,.1f} GFLOP/s")

    def mfu(tokens_per_s: float) -> float | None:
        return None if peak is None else tokens_per_s * flops_per_token / (peak * 1e12)

    def gflops(tokens_per_s: float) -> float:
        return tokens_per_s * flops_per_token / 1e9

    for name, totals in measured.items():
        rate = gflops(totals["tokens_per_s"])
        print(f"{name:>8}: {rate:10,.1f} GFLOP/s achieved = {rate / matmul:.1%} of the measured "
              "matrix-multiply rate")
    ratio = measured["ours"]["tokens_per_s"] / measured["baseline"]["tokens_per_s"]
    result = {
        "device": device_name, "shape": args.shape, "steps": args.steps, "warmup": args.warmup,
        "batch_size": args.batch_size, "max_length": MAX_LENGTH,
        "mean_real_length": round(mean_length, 2),
        "ours_tokens_per_s": round(measured["ours"]["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(measured["baseline"]["tokens_per_s"], 1),
        "ratio": round(ratio, 3),
        "mfu": mfu(measured["ours"]["tokens_per_s"]),
        "baseline_mfu": mfu(measured["baseline"]["tokens_per_s"]),
        "peak_tflops": peak, "model_flops_per_token": flops_per_token,
        "ours_gflops": round(gflops(measured["ours"]["tokens_per_s"]), 2),
        "baseline_gflops": round(gflops(measured["baseline"]["tokens_per_s"]), 2),
        "matmul_gflops": round(matmul, 2),
        "matmul": {"rows": args.batch_size * MAX_LENGTH, "inner": shape["hidden"],
                   "cols": shape["ffn"], "dtype": str(matmul_dtype).removeprefix("torch.")},
        "ours_fraction_of_matmul": round(gflops(measured["ours"]["tokens_per_s"]) / matmul, 4),
        "baseline_fraction_of_matmul": round(
            gflops(measured["baseline"]["tokens_per_s"]) / matmul, 4),
        "peak_gpu_memory_gb": round(run_peak / 1e9, 3) if cuda else None,
        "step_peak_extra_gpu_memory_gb": (
            {k: round(v / 1e9, 3) for k, v in step_extra_bytes.items()} if cuda else None),
        "first_step_losses_agree": agree,
        "first_step_loss": {k: round(v, 6) for k, v in first.items()},
        "padding_share": {k: round(1 - v["real_tokens"] / v["padded_tokens"], 3)
                          for k, v in measured.items()},
        "torch_threads": torch.get_num_threads(), "versions": versions(),
    }
    mfu_text = "n/a (no known peak)" if result["mfu"] is None else f"{result['mfu']:.1%}"
    print(f"ratio ours/baseline {ratio:.2f}x; MFU {mfu_text}; first-step losses "
          f"{first['ours']:.6f} vs {first['baseline']:.6f} ({'agree' if agree else 'DIFFER'})")
    if cuda:
        print(f"peak GPU memory {result['peak_gpu_memory_gb']:.2f} GB; per step above its start: "
              + ", ".join(f"{k} {v:.2f} GB" for k, v in result["step_peak_extra_gpu_memory_gb"].items()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimizer steps (default 4 on CPU, 30 on GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per step (default 32 on CPU, 128 on GPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: known GPUs only)")
    parser.add_argument("--out", default="runs/bench/pretrain_throughput.json")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (30 if gpu else 4)
    args.batch_size = args.batch_size or (128 if gpu else 32)

    result = run(args)
    out = Path(args.out)
    runs = read_json(out) if out.is_file() else []
    runs = [r for r in runs if (r["device"], r["shape"]) != (result["device"], result["shape"])]
    atomic_write_json(out, [*runs, result])
    print(f"-> {out}")


if __name__ == "__main__":
    main()
