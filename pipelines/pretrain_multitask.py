"""RoBERTa + multitask: train the encoder itself jointly on the factual (relation
classification) and linguistic (dependency head prediction) tasks, two heads, batches of
both tasks mixed in proportion, through Accelerate.

    accelerate launch -m pipelines.pretrain_multitask --config configs/sample.yaml
    accelerate launch -m pipelines.pretrain_multitask --config configs/paper.yaml --resume true

--resume true continues from the latest checkpoint in the run's hidden .partial
directory (default false). Other --key value pairs override section pretrain_multitask
(--fac_share 3 --lin_share 1, --max_steps 20) or any other (--pretrain_fac.max_length 64).
What it does and the output layout: kadapter/multitask.py.
"""

from __future__ import annotations

import argparse
import sys

from kadapter.config import parse_bool

from .common import run_stage


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kadapter pretrain-multitask", add_help=False,
                                     allow_abbrev=False)
    # true / false, like every boolean key; a bare --resume is an error (one syntax)
    parser.add_argument("--resume", nargs="?", const=None, default="false")
    known, rest = parser.parse_known_args(argv)
    if known.resume is None:
        print("error: command line: --resume needs a value: true or false", file=sys.stderr)
        raise SystemExit(2)

    def stage(config) -> None:
        from kadapter.multitask import run_multitask

        run_multitask(config, resume=parse_bool(known.resume, "command line: --resume"))

    run_stage("pipelines.pretrain_multitask", "pretrain_multitask", stage, rest)


if __name__ == "__main__":
    main()
