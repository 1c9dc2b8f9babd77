"""Thin command-line entry points, one per stage: ``python -m pipelines.<stage> --config ...``."""
