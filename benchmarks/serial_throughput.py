"""Pretraining throughput of serial (Houlsby) adapters against a K-Adapter, same run.

    python benchmarks/serial_throughput.py                 # tiny model, sample T-REx-rc, CPU
    python benchmarks/serial_throughput.py --steps 40 --rounds 3

Both kinds pretrain the factual task through ``run_pretraining`` on the sample preset
(the tiny 24-layer encoder, the sample T-REx-rc features, the same batches) for
``--steps`` optimizer steps, taking turns for ``--rounds`` rounds so that a machine
shared with other work slows both alike. A K-Adapter step runs the encoder forward
under ``no_grad``; a serial step back-propagates through every encoder layer to the
adapters inside it. Printed: the best real-token throughput of each kind over the
rounds, the ratio serial / K-Adapter, and the trainable parameters of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kadapter.config import load_config  # noqa: E402
from kadapter.pretrain import run_pretraining  # noqa: E402
from kadapter.trex import build_trex_rc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="serial-bench-"))
    sample = load_config("configs/sample.yaml")
    build_trex_rc(sample.data_trex, seed=sample.seed, output_dir=root / "trex_rc")

    def config():
        return load_config("configs/sample.yaml", [
            "--data_dir", str(root / "trex_rc"), "--output_dir", str(root / "fac"),
            "--cache_dir", str(root / "cache"), "--serial_adapter.fac_output_dir", str(root / "serial"),
            "--max_steps", str(args.steps), "--eval_every", "0", "--save_every", "0"],
            default_section="pretrain_fac")

    rates: dict[str, list[float]] = {"kadapter": [], "serial": []}
    parameters = {}
    for _ in range(args.rounds):
        for kind in rates:
            manifest = run_pretraining(config(), "fac", kind=kind)
            rates[kind].append(manifest["training"]["tokens_per_s"])
            parameters[kind] = manifest["parameters"]
    for kind, values in rates.items():
        print(f"{kind:>8}: best {max(values):,.0f} tokens/s over {args.rounds} rounds of {args.steps} "
              f"steps ({', '.join(f'{v:,.0f}' for v in values)}); parameters trained "
              f"{parameters[kind]['trainable']:,} of {parameters[kind]['total']:,}")
    print(f"serial / K-Adapter tokens/s: {max(rates['serial']) / max(rates['kadapter']):.2f}")


if __name__ == "__main__":
    main()
