"""The tiny offline RoBERTa: the sample preset's and the tests' encoder.

No model hub is reachable here, so the sample preset builds its own model, fully
deterministically:
- a byte-level BPE tokenizer trained with ``tokenizers`` on the shipped sample text
  (the lines of every .txt file and the string values of every .json/.jsonl file
  under ``data/sample``, in sorted order);
- a RoBERTa-architecture masked LM with 24 narrow layers (hidden 64, 4 heads,
  FFN 256), so adapter positions 0/11/23 mean what they mean for roberta-large,
  with weights drawn from a fixed seed.
It is saved as an ordinary Hugging Face model directory (config.json,
model.safetensors, vocab.json, merges.txt, tokenizer.json, ...) and loads with
``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoTokenizer`` from that path.
A ``kadapter_tiny.json`` beside it records the fingerprint of the corpus and the
spec; the model is rebuilt only when that fingerprint changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from kadapter.io import (
    atomic_output_dir,
    atomic_write_json,
    fingerprint_of,
    mark_output_dir,
    ordinary_permissions,
    read_json,
)

TINY_SPEC = {
    "vocab_size": 6000,
    "hidden_size": 64,
    "num_hidden_layers": 24,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 258,  # 256 tokens + RoBERTa's padding offset of 2
    "seed": 1234,
    "builder": 3,  # bump when the build changes in a way the fields above do not show
}
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
CORPUS_SUFFIXES = (".txt", ".json", ".jsonl")
STAMP_FILE = "kadapter_tiny.json"


def corpus_files(corpus_dir: str | Path) -> list[Path]:
    root = Path(corpus_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"tiny model corpus directory {str(root)!r} not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"tiny model corpus {str(root)!r} has no .txt/.json/.jsonl files")
    return files


def corpus_fingerprint(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_model(out_dir: str | Path = "data/models/tiny-roberta",
                      corpus_dir: str | Path = "data/sample") -> Path:
    """Build the tiny model into ``out_dir`` unless an up-to-date build is already there."""
    out_dir, corpus_dir = Path(out_dir), Path(corpus_dir)
    files = corpus_files(corpus_dir)
    stamp = {"spec": TINY_SPEC, "corpus": corpus_fingerprint(files, corpus_dir)}
    stamp["fingerprint"] = fingerprint_of(stamp)
    if _is_current(out_dir, stamp):
        return out_dir
    with _lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not _is_current(out_dir, stamp):  # another process may have built it meanwhile
            if (out_dir / STAMP_FILE).is_file():  # built before outputs were marked
                mark_output_dir(out_dir, "tiny_model")
            with atomic_output_dir(out_dir, stage="tiny_model") as tmp:
                build_tiny_model(tmp, files)
                atomic_write_json(tmp / STAMP_FILE, stamp)
    return out_dir


def _is_current(out_dir: Path, stamp: dict) -> bool:
    try:
        return read_json(out_dir / STAMP_FILE).get("fingerprint") == stamp["fingerprint"]
    except (FileNotFoundError, ValueError):
        return False


def _json_texts(value):
    """The text-like string values of a JSON document (no keys, numbers or URIs)."""
    if isinstance(value, str):
        if value.strip() and not value.startswith(("http://", "https://")):
            yield value
    elif isinstance(value, list):
        for item in value:
            yield from _json_texts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_texts(item)


def _corpus_lines(files: list[Path]):
    """Lines of the .txt files and the string values of the .json/.jsonl files: the tokenizer
    should spend its merges on words, not on JSON keys and character offsets."""
    for path in files:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            yield from _json_texts(json.loads(text))
        elif path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    yield from _json_texts(json.loads(line))
        else:
            yield from (line for line in text.splitlines() if line.strip())


def build_tiny_model(out_dir: str | Path, files: list[Path]) -> None:
    """Train the tokenizer and write a randomly initialised (seeded) RoBERTa MLM."""
    import torch
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus_lines(files),
        vocab_size=TINY_SPEC["vocab_size"],
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    bpe.save_model(str(out_dir))  # vocab.json + merges.txt
    # from_pretrained on the directory, not RobertaTokenizerFast(vocab_file=...): with
    # transformers 5 the latter was seen to build a 5-token vocabulary silently.
    # <mask> absorbs the space before it, as in roberta-large ("in <mask>" -> "Ġin", "<mask>").
    tokenizer = RobertaTokenizerFast.from_pretrained(
        str(out_dir), model_max_length=256, mask_token=AddedToken("<mask>", lstrip=True)
    )
    if len(tokenizer) != bpe.get_vocab_size():
        raise RuntimeError(
            f"tiny tokenizer has {len(tokenizer)} tokens, BPE training produced {bpe.get_vocab_size()}"
        )
    tokenizer.save_pretrained(str(out_dir))

    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_SPEC["hidden_size"],
        num_hidden_layers=TINY_SPEC["num_hidden_layers"],
        num_attention_heads=TINY_SPEC["num_attention_heads"],
        intermediate_size=TINY_SPEC["intermediate_size"],
        max_position_embeddings=TINY_SPEC["max_position_embeddings"],
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SPEC["seed"])
        model = RobertaForMaskedLM(config)
    model.save_pretrained(str(out_dir))
    for path in out_dir.iterdir():  # transformers' safetensors are written 0600
        if path.is_file():
            ordinary_permissions(path)
