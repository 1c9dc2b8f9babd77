"""Pretrain a knowledge adapter: factual (T-REx relation classification) or linguistic
(dependency head prediction), on a frozen encoder, through Accelerate.

    accelerate launch -m pipelines.pretrain --config configs/sample.yaml --task fac
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml \\
        -m pipelines.pretrain --config configs/paper.yaml --task lin --resume true
    torchrun --nproc_per_node 2 -m pipelines.pretrain --task fac     # 2 CPU processes (gloo)

--task fac|lin  picks the section (pretrain_fac / pretrain_lin); --kind serial pretrains serial
(Houlsby) adapters inside the encoder instead of a K-Adapter (shape and output directory:
section serial_adapter; the same data, heads and schedule); --resume true continues
from the latest checkpoint in the run directory (default false). Other --key value pairs override that section
(--max_steps 20) or any other (--model.name_or_path /models/roberta-large).
What it does, step by step, and the output layout: kadapter/pretrain.py.
"""

from __future__ import annotations

import argparse
import sys

from kadapter.config import parse_bool

from .common import run_stage


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kadapter pretrain", add_help=False, allow_abbrev=False)
    parser.add_argument("--task", choices=("fac", "lin"))
    parser.add_argument("--kind", choices=("kadapter", "serial"), default="kadapter")
    # true / false, like every boolean key; a bare --resume is an error (one syntax)
    parser.add_argument("--resume", nargs="?", const=None, default="false")
    known, rest = parser.parse_known_args(argv)
    if known.resume is None:
        print("error: command line: --resume needs a value: true or false", file=sys.stderr)
        raise SystemExit(2)
    if known.task is None:
        if any(a in ("-h", "--help") for a in rest):
            print(__doc__ + "\nKeys of a section: --task fac --help")
            raise SystemExit(0)
        print("error: --task fac|lin is required", file=sys.stderr)
        raise SystemExit(2)

    def stage(config) -> None:
        from kadapter.pretrain import run_pretraining

        run_pretraining(config, known.task, resume=parse_bool(known.resume, "command line: --resume"),
                        kind=known.kind)

    run_stage("pipelines.pretrain", f"pretrain_{known.task}", stage, rest)


if __name__ == "__main__":
    main()
