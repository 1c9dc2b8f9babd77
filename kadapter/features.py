"""The feature stage: tokenized features built once, in parallel, into a columnar cache
that every training process and every fine-tuning variant memory-maps.

    python -m pipelines.features --config configs/paper.yaml --task fac|lin|typing|figer|csqa|cosmosqa|tacred
    make features            # every task, before any (distributed) training launch

A cache is one directory ``<cache_dir>/<task>-<key>/``: ``features.json`` (key, counts,
labels, input fingerprints and each split's column layout), then per split one raw
little-endian file per column (int32 token ids, spans and labels; int64 offsets of the
ragged columns). ``key`` hashes the task, the feature code version, the tokenizer, the
input files' bytes and the settings that change features (max_length, label set, ...):
change any of them and a new cache is built beside the old one. The directory is
written under a temporary name and renamed into place whole, so a cache that exists is
complete; a build that dies leaves nothing a later run would trust.

Building: the rows are cut into chunks of ``CHUNK_ROWS``; a process pool of ``workers``
(each with its own copy of the fast tokenizer) turns chunks into columns, and the main
process appends them, in chunk order, to the column files (so memory stays that of a few
chunks and the bytes do not depend on the number of workers). Inside a chunk
``kadapter.bpe_words.WordEncoder`` gives the fast tokenizer's encodings of the whole batch
while running its BPE once per distinct word, and the character-to-token alignment runs
on numpy arrays (``token_spans``) instead of a Python loop per example. Every span is checked
against its sequence when it is built (``check_spans``): the training step no longer
checks anything on the device.

Reading: ``MappedFeatures.open`` maps the files (``np.memmap``, read-only): N processes
share one copy in the page cache; each holds only an int32 length per example.
Multi-hot typing labels are not stored: a typing example keeps its label ids (a ragged
column) and ``kadapter.tasks.collate`` builds the (B, num_labels) targets per batch.

``fac_features``/``lin_features`` in kadapter/pretrain.py and ``Task.encode`` in
kadapter/tasks.py are the one-example-at-a-time reference of the same features; the
tests check the cache equals them, and benchmarks/paper_scale.py times them as the
baseline.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kadapter.bpe_words import Encodings, WordEncoder, ranges
from kadapter.io import (
    InputError,
    atomic_output_dir,
    atomic_write_json,
    file_fingerprint,
    fingerprint_of,
    read_json,
)
from kadapter.progress import progress
from kadapter.spans import mark_spans, token_span
from kadapter.training import FeatureTable

FEATURES_VERSION = 2  # bump when the features change: old caches are then ignored
CHUNK_ROWS = 4096  # rows per pool task: big enough for batched tokenizing, small for memory
FEATURES_FILE = "features.json"
PRETRAIN_TASKS = ("fac", "lin")
FINETUNE_TASKS = ("typing", "figer", "csqa", "cosmosqa", "tacred")
FAC_COLUMNS = ("sentence", "subj_start", "subj_end", "obj_start", "obj_end", "relation", "label")
LIN_COLUMNS = ("text", "word_starts", "word_ends", "heads")
SUBJECT_MARKER, OBJECT_MARKER = "@", "#"
# span columns: (start, end) pairs and marker positions, checked against input_ids
SPAN_PAIRS = (("subj_start", "subj_end"), ("obj_start", "obj_end"), ("span_start", "span_end"))
POSITIONS = ("subj_marker", "obj_marker", "marker")


def resolve_workers(workers: int) -> int:
    """0 = every core this process may run on."""
    if workers < 0:
        raise ValueError(f"feature workers must be >= 0, got {workers}")
    if workers:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------- the cache


class MappedFeatures(FeatureTable):
    """A FeatureTable over memory-mapped columns.

    ``ragged`` columns are (values, offsets) pairs with their own offsets (token ids,
    per-token labels, typing label ids); ``scalar`` columns are (N,) or (N, k) arrays:
    ``item[name]`` is an int for (N,) and a length-k array for (N, k) (the k mentions'
    span starts, the choices' lengths). ``lengths`` are the input_ids lengths (int32).
    """

    def __init__(self, ragged: dict[str, tuple[np.ndarray, np.ndarray]],
                 scalar: dict[str, np.ndarray]):
        if "input_ids" not in ragged:
            raise ValueError("features need an input_ids column")
        self.ragged, self.scalar = ragged, scalar
        self.lengths = np.diff(ragged["input_ids"][1]).astype(np.int32)
        for name, (_, offsets) in ragged.items():
            if len(offsets) != len(self) + 1:
                raise ValueError(f"ragged column {name!r} has {len(offsets) - 1} rows, expected {len(self)}")
        for name, column in scalar.items():
            if len(column) != len(self):
                raise ValueError(f"column {name!r} has {len(column)} rows, expected {len(self)}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        for name, (values, offsets) in self.ragged.items():
            item[name] = values[offsets[index]:offsets[index + 1]]
        for name, column in self.scalar.items():
            item[name] = int(column[index]) if column.ndim == 1 else column[index]
        return item

    @classmethod
    def open(cls, directory: str | Path, layout: dict[str, Any]) -> MappedFeatures:
        """Map one split's column files (``layout`` from features.json)."""
        directory = Path(directory)
        rows = layout["rows"]

        def mapped(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
            if 0 in shape:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(directory / name, dtype=dtype, mode="r", shape=shape)

        ragged, scalar = {}, {}
        for name, spec in layout["columns"].items():
            if spec["kind"] == "ragged":
                offsets = mapped(f"{name}.offsets", "<i8", (rows + 1,))
                ragged[name] = (mapped(f"{name}.values", "<i4", (int(offsets[-1]),)), offsets)
            else:
                scalar[name] = mapped(name, "<i4", (rows, *spec["shape"]))
        if rows == 0:  # a split with no example has no column files
            ragged.setdefault("input_ids", (np.zeros(0, np.int32), np.zeros(1, np.int64)))
        return cls(ragged, scalar)


@dataclass
class Chunk:
    """One chunk's features: ragged columns as (values, lengths), scalar columns as arrays;
    ``source`` is each feature's row index in the input file."""

    ragged: dict[str, tuple[np.ndarray, np.ndarray]]
    scalar: dict[str, np.ndarray]
    source: np.ndarray
    counts: Counter


class ColumnWriter:
    """Appends chunks to one split's column files; ``layout()`` describes them."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.rows = 0
        self.columns: dict[str, dict[str, Any]] = {}
        self.totals: dict[str, int] = {}
        self.handles: dict[str, Any] = {}
        self.counts: Counter = Counter()

    def _write(self, name: str, array: np.ndarray, dtype: str) -> None:
        if name not in self.handles:
            self.handles[name] = open(self.directory / name, "wb")  # noqa: SIM115 (closed in close())
        self.handles[name].write(np.ascontiguousarray(array, dtype=dtype).tobytes())

    def append(self, chunk: Chunk) -> None:
        self.counts.update(chunk.counts)
        for name, (values, lengths) in chunk.ragged.items():
            if name not in self.totals:
                self.totals[name] = 0
                self.columns[name] = {"kind": "ragged"}
                self._write(f"{name}.offsets", np.zeros(1), "<i8")
            self._write(f"{name}.values", values, "<i4")
            self._write(f"{name}.offsets", self.totals[name] + np.cumsum(lengths), "<i8")
            self.totals[name] += int(np.sum(lengths))
        for name, column in chunk.scalar.items():
            self.columns.setdefault(name, {"kind": "scalar", "shape": list(column.shape[1:])})
            self._write(name, column, "<i4")
        self._write("source_index", chunk.source, "<i8")
        self.rows += len(chunk.source)

    def close(self) -> dict[str, Any]:
        for handle in self.handles.values():
            handle.close()
        return {"rows": self.rows, "columns": self.columns}


def open_cache(cache: str | Path) -> dict[str, MappedFeatures]:
    """Every split of a cache directory, mapped."""
    cache = Path(cache)
    info = read_json(cache / FEATURES_FILE)
    return {split: MappedFeatures.open(cache / split, layout) for split, layout in info["splits"].items()}


def source_index(directory: Path, rows: int) -> np.ndarray:
    """Each feature's record index in its split's input file (maps features to examples)."""
    if rows == 0:
        return np.zeros(0, dtype=np.int64)
    return np.memmap(directory / "source_index", dtype="<i8", mode="r", shape=(rows,))


# --------------------------------------------------------------------------- parallel map


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any) -> None:
    if _WORKER.get("tokenizer") is not tokenizer:  # a new tokenizer: a new word table
        _WORKER.clear()
        _WORKER["tokenizer"] = tokenizer


Job = tuple[Callable[..., Chunk], tuple]


def _call(job: Job) -> Chunk:
    function, args = job
    # A chunk makes ~10^5 short-lived objects and no cycle: with the collector on, they
    # trigger full collections over everything the process holds (torch, pyarrow...).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return function(_WORKER["tokenizer"], *args)
    finally:
        if enabled:
            gc.enable()


def ordered_map(jobs: Iterable[Job], tokenizer: Any, workers: int) -> Iterator[Chunk]:
    """``function(tokenizer, *args)`` for every (function, args) job, results in job order.
    One worker runs in this process; more run in a process pool, at most 2 jobs each in
    flight (so the input is read as fast as it is used, not all at once)."""
    if workers <= 1:
        _init_worker(tokenizer)
        for job in jobs:
            yield _call(job)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer,)) as pool:
        pending: list[Any] = []
        for job in jobs:
            pending.append(pool.submit(_call, job))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def word_encoder(tokenizer: Any) -> WordEncoder:
    """This process's ``WordEncoder`` over the fast tokenizer's Rust backend (its word
    table lives as long as the process: every chunk a worker encodes adds to it)."""
    if "encoder" not in _WORKER:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: offsets are needed")
        _WORKER["encoder"] = WordEncoder(tokenizer.backend_tokenizer)
    return _WORKER["encoder"]


def encode_flat(tokenizer: Any, texts: list[str], max_length: int | None,
                special: bool = False) -> Encodings:
    """``tokenizer(texts, truncation=True, max_length=max_length)`` (None = never truncate)
    with offsets (and, with ``special``, the special-tokens mask), as flat arrays."""
    return word_encoder(tokenizer).encode(texts, max_length, special)


def token_spans(enc: Encodings, rows: np.ndarray, start: np.ndarray, end: np.ndarray,
                usable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``kadapter.spans.token_span`` for many queries at once: query q asks, in row
    ``rows[q]``, for the tokens [first, last + 1) whose offsets overlap the characters
    [start[q], end[q]). Returns positions inside the row, -1 where no token does.

    Only non-empty tokens (and, with ``usable``, only those flagged) can match. Where a
    row's offsets increase, as fast tokenizers' do, a binary search finds both ends; a row
    whose offsets do not is answered by ``token_span`` itself, so the result is the same.
    """
    n_rows = len(enc.lengths)
    token_row = np.repeat(np.arange(n_rows), enc.lengths)
    real = enc.offsets[:, 1] > enc.offsets[:, 0]
    if usable is not None:
        real &= usable
    index = np.flatnonzero(real)
    row, s, e = token_row[index], enc.offsets[index, 0], enc.offsets[index, 1]
    scale = np.int64(1) << 32
    key_s, key_e = row * scale + s, row * scale + e
    q_base = rows.astype(np.int64) * scale
    first = np.searchsorted(key_e, q_base + start, side="right")
    last = np.searchsorted(key_s, q_base + end, side="left") - 1
    f, la = np.clip(first, 0, max(len(index) - 1, 0)), np.clip(last, 0, max(len(index) - 1, 0))
    found = (len(index) > 0) & (first < len(index)) & (last >= 0)
    if len(index):
        found &= (row[f] == rows) & (row[la] == rows) & (s[f] < end) & (e[la] > start)
    base = enc.starts[rows]
    out_first = np.where(found, index[f] - base if len(index) else -1, -1)
    out_last = np.where(found, index[la] - base + 1 if len(index) else -1, -1)
    same_row = row[1:] == row[:-1]
    unordered = np.unique(row[1:][same_row & ((s[1:] < s[:-1]) | (e[1:] < e[:-1]))])
    for bad in unordered:  # rare: answered exactly, one query at a time
        lo, n = int(enc.starts[bad]), int(enc.lengths[bad])
        offsets = [tuple(o) if ok else (0, 0) for o, ok in zip(enc.offsets[lo:lo + n].tolist(),
                                                              real[lo:lo + n])]
        for q in np.flatnonzero(rows == bad):
            hit = token_span(offsets, int(start[q]), int(end[q]))
            out_first[q], out_last[q] = hit if hit is not None else (-1, -1)
    return out_first, out_last


def check_spans(path: Path, chunk: Chunk) -> None:
    """Every span is a non-empty run of tokens inside its sequence, every marker a position
    in it: else an InputError naming the file and the record."""
    lengths = chunk.ragged["input_ids"][1]
    problems = np.zeros(len(lengths), dtype=bool)

    def per_row(bad: np.ndarray) -> np.ndarray:
        return bad if bad.ndim == 1 else bad.any(axis=tuple(range(1, bad.ndim)))

    for start, end in SPAN_PAIRS:
        if start in chunk.scalar:
            a, b = chunk.scalar[start], chunk.scalar[end]
            bound = lengths.reshape(-1, *([1] * (a.ndim - 1)))
            problems |= per_row((a < 0) | (b <= a) | (b > bound))
    for name in POSITIONS:
        if name in chunk.scalar:
            p = chunk.scalar[name]
            bound = lengths.reshape(-1, *([1] * (p.ndim - 1)))
            problems |= per_row((p < 0) | (p >= bound))
    if problems.any():
        i = int(np.flatnonzero(problems)[0])
        spans = {k: np.asarray(v[i]).tolist() for k, v in chunk.scalar.items()
                 if k in POSITIONS or any(k in pair for pair in SPAN_PAIRS)}
        raise InputError(path, int(chunk.source[i]), f"token span(s) {spans} fall outside "
                         f"the example's {int(lengths[i])} tokens")


# --------------------------------------------------------------------------- marking


def mark_batch(texts: list[str], starts: np.ndarray, ends: np.ndarray, markers: tuple[str, ...]
               ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``kadapter.spans.mark_spans`` for a batch of texts with k = 1 or 2 spans each (columns of
    ``starts``/``ends``, already checked): the marked texts, and the (N, k) character
    start of each opening marker and (N, k, 2) span of each mention in them."""
    n, k = starts.shape
    order = np.argsort(starts, axis=1, kind="stable")
    rank = np.argsort(order, axis=1)  # position of each span in text order
    widths = np.array([2 * len(m) + 2 for m in markers])  # "m " before, " m" after
    opening = np.array([len(m) + 1 for m in markers])
    sorted_widths = widths[order]
    before = np.cumsum(sorted_widths, axis=1) - sorted_widths  # added before each, text order
    shift = np.take_along_axis(before, rank, axis=1)
    marker_start = starts + shift
    mention = np.stack([starts + shift + opening, ends + shift + opening], axis=-1)
    s_sorted, e_sorted = np.take_along_axis(starts, order, 1), np.take_along_axis(ends, order, 1)
    m = np.asarray(markers, dtype=object)[order]
    a, b, x = s_sorted[:, 0].tolist(), e_sorted[:, 0].tolist(), m[:, 0].tolist()
    if k == 1:  # entity typing; one f-string a text
        marked = [f"{t[:s]}{p} {t[s:e]} {p}{t[e:]}" for t, s, e, p in zip(texts, a, b, x)]
    elif k == 2:  # fac, TACRED
        c, d, y = s_sorted[:, 1].tolist(), e_sorted[:, 1].tolist(), m[:, 1].tolist()
        marked = [f"{t[:s]}{p} {t[s:e]} {p}{t[e:s2]}{q} {t[s2:e2]} {q}{t[e2:]}"
                  for t, s, e, p, s2, e2, q in zip(texts, a, b, x, c, d, y)]
    else:
        raise ValueError(f"mark_batch marks 1 or 2 spans a text, not {k}")
    return marked, marker_start, mention


# --------------------------------------------------------------------------- pretraining


def filled(array: pa.Array, value: int = -1) -> np.ndarray:
    """An integer column as int64, nulls as ``value``. Read from the Arrow buffer:
    pyarrow's ``to_numpy`` imports pandas (~0.5 s of every worker's CPU)."""
    if array.null_count == 0 and pa.types.is_integer(array.type):
        kind = "i" if pa.types.is_signed_integer(array.type) else "u"
        data = np.frombuffer(array.buffers()[1], dtype=f"{kind}{array.type.bit_width // 8}")
        return data[array.offset:array.offset + len(array)].astype(np.int64)
    return np.asarray([value if v is None else v for v in array.to_pylist()]).astype(np.int64)


def nulls(array: pa.Array) -> np.ndarray:
    """Where ``array`` is null, as a bool array (see ``filled``)."""
    if array.null_count == 0:
        return np.zeros(len(array), dtype=bool)
    return np.asarray([v is None for v in array.to_pylist()], dtype=bool)


def fac_chunk(tokenizer: Any, path: Path, first: int, batch: pa.RecordBatch,
              relations: list[str], max_length: int) -> Chunk:
    """T-REx-rc rows -> the features of ``kadapter.pretrain.fac_features``."""
    n = batch.num_rows
    cols = {name: batch.column(name) for name in FAC_COLUMNS}
    label = cols["label"]
    label_values = filled(label)
    in_range = (label_values >= 0) & (label_values < len(relations))
    expected = np.asarray(relations, dtype=object)[np.where(in_range, label_values, 0)]
    relation = np.asarray(cols["relation"].to_pylist(), dtype=object)
    bad_label = ~in_range | (expected != relation)
    offsets = np.stack([filled(cols[c]) for c in ("subj_start", "subj_end", "obj_start", "obj_end")], axis=1)
    null_offsets = np.stack([nulls(cols[c]) for c in ("subj_start", "subj_end", "obj_start", "obj_end")], axis=1).any(1)
    chars = filled(pc.utf8_length(cols["sentence"]))
    starts, ends = offsets[:, [0, 2]], offsets[:, [1, 3]]
    outside = ((starts < 0) | (ends <= starts) | (ends > chars[:, None])).any(1)
    overlap = (starts[:, 0] < ends[:, 1]) & (starts[:, 1] < ends[:, 0])
    bad = bad_label | null_offsets | outside | overlap | nulls(cols["sentence"])
    sentences = cols["sentence"].to_pylist()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        if bad_label[i]:
            raise InputError(path, first + i, f"label {label[i].as_py()!r} does not match relation "
                             f"{relation[i]!r} in relations.json")
        row = [cols[c][i].as_py() for c in ("subj_start", "subj_end", "obj_start", "obj_end")]
        try:  # the reference marking names the problem
            mark_spans(sentences[i], [(row[0], row[1], SUBJECT_MARKER), (row[2], row[3], OBJECT_MARKER)])
        except (TypeError, ValueError) as err:
            raise InputError(path, first + i, f"bad subject/object offsets: {err}") from None
        raise InputError(path, first + i, f"bad subject/object offsets: {row}")
    texts, marker_start, mention = mark_batch(sentences, starts, ends, (SUBJECT_MARKER, OBJECT_MARKER))
    enc = encode_flat(tokenizer, texts, max_length)
    rows = np.repeat(np.arange(n), 4)
    q_start = np.stack([mention[:, 0, 0], mention[:, 1, 0], marker_start[:, 0], marker_start[:, 1]], 1)
    q_end = np.stack([mention[:, 0, 1], mention[:, 1, 1], marker_start[:, 0] + len(SUBJECT_MARKER),
                      marker_start[:, 1] + len(OBJECT_MARKER)], 1)
    span_first, span_last = token_spans(enc, rows, q_start.ravel(), q_end.ravel())
    span_first, span_last = span_first.reshape(n, 4), span_last.reshape(n, 4)
    keep = (span_first >= 0).all(1)
    # the mention must survive truncation whole: its last sub-word reaches its end
    for k in (0, 1):
        last_token = enc.starts + np.maximum(span_last[:, k], 1) - 1
        keep &= enc.offsets[last_token, 1] >= mention[:, k, 1]
    kept = np.flatnonzero(keep)
    counts = Counter(rows=n, skipped_truncated=int(n - len(kept)))
    scalar = {"label": label_values[kept],
              "subj_start": span_first[kept, 0], "subj_end": span_last[kept, 0],
              "obj_start": span_first[kept, 1], "obj_end": span_last[kept, 1],
              "subj_marker": span_first[kept, 2], "obj_marker": span_first[kept, 3]}
    lengths = enc.lengths[kept]
    chunk = Chunk({"input_ids": (enc.ids[ranges(enc.starts[kept], lengths)], lengths)}, scalar,
                  first + kept, counts)
    check_spans(path, chunk)
    return chunk


def lin_chunk(tokenizer: Any, path: Path, first: int, batch: pa.RecordBatch,
              max_length: int) -> Chunk:
    """Dependency rows -> the features of ``kadapter.pretrain.lin_features``."""
    from kadapter.deps import check_records, head_labels_batch

    rows = batch.to_pylist()
    check_records(path, first, rows)
    ids, labels, lengths, kept, counts = [], [], [], [], Counter()
    for offset, labelled in enumerate(head_labels_batch(rows, tokenizer, max_length)):
        counts["rows"] += 1
        counts.update(labelled.stats)
        if labelled.stats["labelled"] == 0:
            counts["skipped_no_labelled_word"] += 1
            continue
        ids += labelled.input_ids
        labels += labelled.labels
        lengths.append(len(labelled.input_ids))
        kept.append(first + offset)
    lengths = np.asarray(lengths, dtype=np.int64)
    return Chunk({"input_ids": (np.asarray(ids, dtype=np.int32), lengths),
                  "labels": (np.asarray(labels, dtype=np.int32), lengths)}, {},
                 np.asarray(kept, dtype=np.int64), counts)


def parquet_chunks(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row index, record batch) chunks of a Parquet file, checked for its columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the data stage first: make data)")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(path, None, f"not a readable Parquet file ({err})") from None
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise InputError(path, None, f"missing column(s) {missing}; have {parquet.schema_arrow.names}")
    first = 0
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=list(columns)):
        yield first, batch
        first += batch.num_rows


# --------------------------------------------------------------------------- fine-tuning


def mention_chunk(tokenizer: Any, path: Path, first: int, texts: list[str], starts: np.ndarray,
                  ends: np.ndarray, markers: tuple[str, ...], max_length: int,
                  targets: dict[str, tuple[np.ndarray, np.ndarray] | np.ndarray]) -> Chunk:
    """Marked-mention examples (typing, TACRED) -> the features of ``Task.encode``: the
    window of ``kadapter.tasks.encode_marked`` that keeps every marker, or too long."""
    n, k = starts.shape
    marked, marker_start, mention = mark_batch(texts, starts, ends, markers)
    enc = encode_flat(tokenizer, marked, None, special=True)
    token_row = np.repeat(np.arange(n), enc.lengths)
    content = np.flatnonzero(enc.special == 0)
    rows_with_content, first_content = np.unique(token_row[content], return_index=True)
    if len(rows_with_content) != n:
        missing = int(np.setdiff1d(np.arange(n), rows_with_content)[0])
        raise InputError(path, first + missing, "the text has no token besides the special ones")
    body_first = content[first_content] - enc.starts  # prefix length
    last_content = len(content) - 1 - np.unique(token_row[content][::-1], return_index=True)[1]
    body_end = content[last_content] - enc.starts + 1
    position = np.arange(len(enc.ids)) - enc.starts[token_row]
    in_body = (position >= body_first[token_row]) & (position < body_end[token_row])
    mark_len = np.array([len(m) for m in markers])
    q_rows = np.repeat(np.arange(n), 3 * k)
    q_start = np.concatenate([mention[:, :, 0], marker_start, mention[:, :, 1] + 1], 1)
    q_end = np.concatenate([mention[:, :, 1], marker_start + mark_len, mention[:, :, 1] + 1 + mark_len], 1)
    hit_first, hit_last = token_spans(enc, q_rows, q_start.ravel(), q_end.ravel(), usable=in_body)
    hit_first, hit_last = hit_first.reshape(n, 3 * k), hit_last.reshape(n, 3 * k)
    missed = (hit_first < 0).any(1)
    if missed.any():
        i = int(np.flatnonzero(missed)[0])
        q = int(np.flatnonzero(hit_first[i] < 0)[0])
        raise InputError(path, first + i, f"no token covers characters [{q_start[i, q]}, "
                         f"{q_end[i, q]}) of {marked[i]!r}")
    body_first_2d = body_first[:, None]
    mention_first, mention_end = hit_first[:, :k] - body_first_2d, hit_last[:, :k] - body_first_2d
    openings = hit_first[:, k:2 * k] - body_first_2d
    closings = hit_last[:, 2 * k:] - body_first_2d
    low, high = openings.min(1), closings.max(1)
    suffix = enc.lengths - body_end
    budget = max_length - body_first - suffix
    fits = high - low <= budget
    body_len = body_end - body_first
    window = low - (budget - (high - low)) // 2
    window = np.maximum(0, np.minimum(window, body_len - budget))
    shift = body_first - window
    kept = np.flatnonzero(fits)
    kept_body = np.minimum(budget, body_len - window)[kept]
    pieces = np.stack([enc.starts[kept], enc.starts[kept] + body_first[kept] + window[kept],
                       enc.starts[kept] + body_end[kept]], 1)
    piece_lengths = np.stack([body_first[kept], kept_body, suffix[kept]], 1)
    ids = enc.ids[ranges(pieces.ravel(), piece_lengths.ravel())]
    lengths = piece_lengths.sum(1)
    ragged: dict[str, tuple[np.ndarray, np.ndarray]] = {"input_ids": (ids, lengths)}
    scalar = {"span_start": (mention_first + shift[:, None])[kept],
              "span_end": (mention_end + shift[:, None])[kept],
              "marker": (openings + shift[:, None])[kept]}
    for name, target in targets.items():
        if isinstance(target, tuple):  # ragged: (values, lengths) over this chunk's rows
            values, target_lengths = target
            offsets = np.concatenate([[0], np.cumsum(target_lengths)])
            ragged[name] = (values[ranges(offsets[kept], target_lengths[kept])], target_lengths[kept])
        else:
            scalar[name] = target[kept]
    # longer: ``Task.count_longer``'s count (marked text over max_length, cut or too long)
    chunk = Chunk(ragged, scalar, first + kept, Counter(
        examples=n, too_long=int(n - len(kept)), longer=int((enc.lengths > max_length).sum())))
    check_spans(path, chunk)
    return chunk


def choice_chunk(tokenizer: Any, path: Path, first: int, task_name: str, examples: list,
                 max_length: int) -> Chunk:
    """Multiple-choice examples -> ``ChoiceTask.encode``'s features, as columns."""
    from kadapter.tasks import TASKS

    encoded = TASKS[task_name].encode(examples, tokenizer, [], max_length).features
    lengths = np.asarray([len(f["input_ids"]) for f in encoded], dtype=np.int64)
    ids = np.fromiter((t for f in encoded for t in f["input_ids"]), dtype=np.int32,
                      count=int(lengths.sum()))
    scalar = {"choice_lengths": np.asarray([f["choice_lengths"] for f in encoded], dtype=np.int32)
              .reshape(len(encoded), -1),
              "labels": np.asarray([f["labels"] for f in encoded], dtype=np.int32)}
    return Chunk({"input_ids": (ids, lengths)}, scalar, first + np.arange(len(encoded)),
                 Counter(examples=len(examples)))


def finetune_jobs(task: Any, path: Path, examples: list, labels: list[str], max_length: int
                  ) -> Iterator[Job]:
    """(chunk function, its arguments) per chunk of one split's examples."""
    from kadapter.tasks import relation_text

    index = {label: i for i, label in enumerate(labels)}
    for first in range(0, len(examples), CHUNK_ROWS):
        part = examples[first:first + CHUNK_ROWS]
        if task.kind == "choice":
            yield choice_chunk, (path, first, task.name, part, max_length)
            continue
        if task.kind == "typing":
            texts = [e.text for e in part]
            spans = np.asarray([[(e.start, e.end)] for e in part], dtype=np.int64).reshape(-1, 1, 2)
            ids = [index[label] for e in part for label in e.labels]
            targets: dict[str, Any] = {"label_ids": (
                np.asarray(ids, dtype=np.int32), np.asarray([len(e.labels) for e in part], np.int64))}
            markers: tuple[str, ...] = ("@",)
        else:
            texts, char_spans = zip(*(relation_text(e) for e in part))
            texts = list(texts)
            spans = np.asarray([[(s, e) for s, e, _ in row] for row in char_spans],
                               dtype=np.int64).reshape(-1, 2, 2)
            targets = {"labels": np.asarray([index[e.relation] for e in part], dtype=np.int32)}
            markers = ("@", "#")
        yield mention_chunk, (path, first, texts, spans[:, :, 0], spans[:, :, 1], markers,
                              max_length, targets)


# --------------------------------------------------------------------------- orchestration


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary, merges, normalizer and special tokens; the
    truncation/padding state (left behind by the last call) is not part of it."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return fingerprint_of({"backend": state, "class": type(tokenizer).__name__})


def cache_key(task: str, tokenizer: Any, files: list[Path], settings: dict[str, Any]
              ) -> tuple[str, list[dict[str, Any]]]:
    """(key, input fingerprints): everything the features depend on."""
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
    inputs = [file_fingerprint(p) for p in files]
    key = fingerprint_of({"task": task, "version": FEATURES_VERSION, "settings": settings,
                          "tokenizer": tokenizer_fingerprint(tokenizer),
                          "inputs": [i["sha256"] for i in inputs]})
    return key, inputs


def write_cache(cache: Path, key: str, splits: dict[str, tuple[Path, Iterable[Job]]],
                tokenizer: Any, workers: int, meta: dict[str, Any],
                finish: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Build a cache directory from ``{split: (input path, jobs)}``, atomically;
    ``finish`` may complete features.json's content (counts) before it is written."""
    with atomic_output_dir(cache, stage="features") as tmp:
        layouts, counts = {}, {}
        for split, (path, jobs) in splits.items():
            writer = ColumnWriter(tmp / split)
            try:
                with progress(desc=f"features {meta.get('task', '')} {split}".strip(),
                              unit="example") as bar:
                    for chunk in ordered_map(jobs, tokenizer, workers):
                        writer.append(chunk)
                        bar.update(len(chunk.source))
            finally:
                layouts[split] = writer.close()
            counts[split] = dict(writer.counts)
            if meta.get("require_examples", True) and split in ("train", "dev") and not writer.rows:
                raise InputError(path, None, f"no usable examples ({counts[split]})")
        info = {"key": key, "counts": counts, "splits": layouts,
                **{k: v for k, v in meta.items() if k != "require_examples"}}
        if finish is not None:
            finish(info)
        atomic_write_json(tmp / FEATURES_FILE, info)


def ensure_cache(cache: Path, build: Callable[[], Any], accelerator: Any = None) -> dict[str, Any]:
    """features.json of ``cache``, built first when missing. With several processes the
    main one builds while the others wait at a barrier, for as long as the process
    group's timeout allows (``TrainingConfig.process_group_timeout_s``, 2 h by default);
    run ``python -m pipelines.features`` before the launch to build it without them."""
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        if not (cache / FEATURES_FILE).is_file():
            build()
    return read_json(cache / FEATURES_FILE)


def pretrain_features(task: str, data_dir: Path, cache_dir: Path, tokenizer: Any, max_length: int,
                      workers: int = 0, accelerator: Any = None) -> dict[str, Any]:
    """Train/dev features of adapter pretraining (``fac`` or ``lin``), mapped from the
    cache (built first when missing). Returns ``{"train", "dev", "counts", "labels",
    "cache", "inputs"}``."""
    if task not in PRETRAIN_TASKS:
        raise ValueError(f"task must be one of {PRETRAIN_TASKS}, got {task!r}")
    files = [data_dir / "train.parquet", data_dir / "dev.parquet"]
    if task == "fac":
        files.append(data_dir / "relations.json")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run `make data-{'trex' if task == 'fac' else 'deps'}`)")
    key, inputs = cache_key(task, tokenizer, files, {"max_length": max_length})
    cache = cache_dir / f"{task}-{key}"
    labels = read_json(data_dir / "relations.json") if task == "fac" else None
    if task == "fac" and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise InputError(data_dir / "relations.json", None, "expected a JSON list of P-ids")

    def jobs(path: Path) -> Iterator[Job]:
        for first, batch in parquet_chunks(path, FAC_COLUMNS if task == "fac" else LIN_COLUMNS):
            if task == "fac":
                yield fac_chunk, (path, first, batch, labels, max_length)
            else:
                yield lin_chunk, (path, first, batch, max_length)

    def build() -> None:
        splits = {split: (data_dir / f"{split}.parquet", jobs(data_dir / f"{split}.parquet"))
                  for split in ("train", "dev")}
        def finish(info: dict[str, Any]) -> None:
            for split in ("train", "dev"):
                info["counts"][split]["examples"] = info["splits"][split]["rows"]

        write_cache(cache, key, splits, tokenizer, resolve_workers(workers),
                    {"task": task, "inputs": inputs}, finish)

    info = ensure_cache(cache, build, accelerator)
    return {split: MappedFeatures.open(cache / split, info["splits"][split]) for split in ("train", "dev")
            } | {"counts": info["counts"], "labels": labels, "cache": str(cache), "inputs": inputs}


@dataclass
class FinetuneFeatures:
    """A fine-tuning task's mapped features: ``splits[split]`` the features of the
    examples that fit, ``kept[split]`` their indices among the split's examples as
    ``finetune.read_splits`` reads them (bad records skipped under on_error: skip)."""

    labels: list[str]
    splits: dict[str, MappedFeatures]
    kept: dict[str, np.ndarray]
    counts: dict[str, dict[str, int]]
    skipped: dict[str, Any]
    """Bad records left out (``SkippedRecords.summary()``)."""
    labels_found: int
    """Distinct labels in the three files (0 for multiple choice)."""
    cache: str


def finetune_features(task: Any, settings: Any, files: dict[str, Path], tokenizer: Any,
                      cache_dir: Path, workers: int = 0, accelerator: Any = None) -> FinetuneFeatures:
    """Train/dev/test features of a fine-tuning task, shared by its variants, mapped from
    the cache (built first when missing). ``settings``: the task's ``TaskConfig`` (its
    max_length, label vocabulary, on_error and TACRED's ``max_train_negatives`` cap)."""
    from kadapter.finetune import configured_labels, read_splits
    from kadapter.tasks import SkippedRecords

    configured = configured_labels(task, settings)
    max_length, max_train_negatives = settings.max_length, settings.max_train_negatives
    key_settings = {"max_length": max_length, "labels": configured, "on_error": settings.on_error,
                    "max_train_negatives": max_train_negatives}
    key, inputs = cache_key(task.name, tokenizer, list(files.values()), key_settings)
    cache = cache_dir / f"{task.name}-{key}"

    def build() -> None:
        skipped = SkippedRecords()
        examples = read_splits(task, settings, files, skipped)
        every = [e for split in examples.values() for e in split]
        label_space = task.label_space(every, configured)
        labels_found = len(task.label_space(every, None))
        dropped = 0
        if max_train_negatives is not None:
            if task.kind != "relation":
                raise ValueError(f"max_train_negatives is for TACRED only, not {task.name}")
            kept, negatives = [], 0
            for example in examples["train"]:
                if example.relation == "no_relation":
                    negatives += 1
                    if negatives > max_train_negatives:
                        dropped += 1
                        continue
                kept.append(example)
            examples["train"] = kept
        splits = {split: (files[split], finetune_jobs(task, files[split], split_examples,
                                                      label_space, max_length))
                  for split, split_examples in examples.items()}

        def finish(info: dict[str, Any]) -> None:  # counts as fine-tuning reports them
            counts = {}
            for split, split_examples in examples.items():
                rows = info["splits"][split]["rows"]
                counts[split] = {"examples": len(split_examples), "encoded": rows,
                                 "too_long": len(split_examples) - rows}
                if split != "train":  # cut to a window around the markers, but kept
                    longer = info["counts"][split].get("longer", 0)
                    counts[split]["truncated"] = longer - counts[split]["too_long"]
            counts["train"]["negatives_dropped"] = dropped
            info.update(counts=counts, skipped=skipped.summary(), labels_found=labels_found)

        write_cache(cache, key, splits, tokenizer, resolve_workers(workers),
                    {"task": task.name, "inputs": inputs, "labels": label_space,
                     "require_examples": False}, finish)

    info = ensure_cache(cache, build, accelerator)
    splits = {split: MappedFeatures.open(cache / split, layout) for split, layout in info["splits"].items()}
    kept = {split: source_index(cache / split, layout["rows"]) for split, layout in info["splits"].items()}
    return FinetuneFeatures(info["labels"], splits, kept, info["counts"], info["skipped"],
                            info["labels_found"], str(cache))


def build_features(config: Any, task: str) -> list[dict[str, Any]]:
    """The feature stage for one task, as configured (``pretrain_<task>`` for fac/lin,
    ``finetune.<task>`` with each variant's overrides for the others): every cache the
    training runs will map, built when missing. Writes ``<cache_dir>/<task>.json`` (the
    caches and their counts: the Makefile's stamp) and returns its entries."""
    import time

    from kadapter.modeling import load_tokenizer, resolve_model_path

    if task not in PRETRAIN_TASKS + FINETUNE_TASKS:
        raise ValueError(f"task must be one of {PRETRAIN_TASKS + FINETUNE_TASKS}, got {task!r}")
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    entries: dict[str, dict[str, Any]] = {}
    started = time.time()
    if task in PRETRAIN_TASKS:
        from kadapter.pretrain import resolve_paths

        section = getattr(config, f"pretrain_{task}")
        data_dir, _, cache_dir = resolve_paths(section, task, config.preset)
        built = pretrain_features(task, data_dir, cache_dir, tokenizer, section.max_length,
                                  section.feature_workers)
        entries[built["cache"]] = {"cache": built["cache"], "counts": built["counts"]}
    else:
        from kadapter.finetune import data_files, variant_settings
        from kadapter.tasks import TASKS

        cache_dir = Path(config.finetune.cache_dir)
        for variant in config.finetune.variants:  # a variant may override max_length
            settings = variant_settings(config, task, variant)
            files = data_files(TASKS[task], settings, task)
            built = finetune_features(TASKS[task], settings, files, tokenizer, cache_dir,
                                      config.finetune.feature_workers)
            entry = entries.setdefault(built.cache, {"cache": built.cache, "counts": built.counts,
                                                     "variants": []})
            entry["variants"].append(variant)
    atomic_write_json(cache_dir / f"{task}.json", {"task": task, "caches": list(entries.values()),
                                                  "seconds": round(time.time() - started, 3)})
    return list(entries.values())


__all__ = [
    "FinetuneFeatures",
    "MappedFeatures",
    "build_features",
    "check_spans",
    "finetune_features",
    "open_cache",
    "pretrain_features",
    "token_spans",
]
