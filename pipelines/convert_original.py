"""Convert a checkpoint of the original K-Adapter release into an adapter directory.

    python -m pipelines.convert_original --checkpoint DIR_OR_FILE --task fac|lin \\
        --output_dir OUT [--positions 0,11,22] [--base_model roberta-large]

Reads ``pytorch_model.bin`` (and ``training_args.bin`` beside it) without executing
anything in them; writes ``adapter_config.json`` + ``adapter.safetensors`` + ``README.md``
that ``kadapter.modeling.load_adapter`` loads (see kadapter/convert.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_positions(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"positions must be comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.convert_original",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the original's checkpoint directory or its pytorch_model.bin")
    parser.add_argument("--task", required=True, choices=("fac", "lin"),
                        help="fac = factual adapter (T-REx head converted), lin = linguistic (adapter only)")
    parser.add_argument("--output_dir", required=True, help="adapter directory to write")
    parser.add_argument("--positions", type=parse_positions, default=None,
                        help="adapter positions when training_args.bin is absent or unreadable "
                             "(default: the shipped 0,11,22)")
    parser.add_argument("--base_model", default="roberta-large",
                        help="encoder the adapter was trained on (hub name or local directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    from kadapter.convert import ConversionError, convert_checkpoint

    try:
        convert_checkpoint(args.checkpoint, args.task, args.output_dir, positions=args.positions,
                           base_model=args.base_model)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
