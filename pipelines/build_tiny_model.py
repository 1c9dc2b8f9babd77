"""Build (or confirm up to date) the tiny offline RoBERTa of the sample preset.

    python -m pipelines.build_tiny_model --config configs/sample.yaml

Writes a Hugging Face model directory at ``model.tiny_dir`` (see kadapter/tiny.py).
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from transformers import AutoTokenizer

    from kadapter.tiny import STAMP_FILE, ensure_tiny_model

    model = config.model
    if model.name_or_path != "tiny":
        print(f"model is {model.name_or_path!r}, not 'tiny': nothing to build")
        return
    out = ensure_tiny_model(model.tiny_dir, model.tiny_corpus)
    # Refresh the stamp's mtime so make sees the target as newer than its sources even
    # when the build was already current (a sample file touched but unchanged).
    (out / STAMP_FILE).touch()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    print(f"tiny model ready at {out} (vocabulary {len(tokenizer)} tokens)")


if __name__ == "__main__":
    run_stage("pipelines.build_tiny_model", "model", main)
