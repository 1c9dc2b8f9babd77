"""T-REx dump -> relation-classification set (T-REx-rc) for the factual adapter.

The T-REx dump is a set of JSON files (the full one: ~465 files, tens of GB, ~3.09M
documents, ~11M triples), each a list of documents ``{docid, uri, title, text,
sentences_boundaries, words_boundaries, entities, triples}``: Wikipedia abstracts
aligned to Wikidata triples. From it we keep one example per (sentence, subject
mention, object mention, relation); the paper's T-REx-rc had 430 relations and 5.5M
sentences.

1. every document of every file is read, one file at a time (memory: one parsed file,
   the entity counter and the small per-file outputs);
2. entity mentions (items of ``entities``) are counted by URI across all documents;
3. a triple is a *candidate* when both its arguments have boundaries inside the
   sentence ``sentences_boundaries[sentence_id]``, the spans do not overlap, the
   entities differ and the predicate is not excluded; identical candidates (same
   document, sentence, spans, entities and predicate: T-REx repeats a triple under
   several aligners) are kept once;
4. entity filter: subject and object each have >= ``min_entity_count`` mentions;
5. relation filter: relations with >= ``min_relation_pairs`` distinct (subject,
   object) pairs among what is left;
6. label = index of the P-id in the sorted list of kept relations;
7. a document goes wholly to dev when a seeded hash of its docid falls below
   ``dev_fraction``, else to train.

Pass 1 (parallel over files) decodes each file into typed structs holding only the
fields used (msgspec; a file that does not fit them is decoded as plain dicts, where the
checks name its bad records), counts and collects the candidates: in a spill parquet
(``engine: local``) or as Arrow blocks of a Ray Data dataset (``engine: ray``,
kadapter/ray_engine.py). Passes 2 and 3 (columnar, pyarrow, the same functions for
both engines) apply the filters and write ``train.parquet`` / ``dev.parquet``. Rows are ordered by input file (sorted paths),
then docid, sentence, offsets and relation; the bytes do not depend on ``workers`` or
the engine.
Every triple read is accounted for in the manifest: triples read = sum of drop
reasons + candidates; candidates = dropped by each filter + examples.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kadapter.config import to_plain
from kadapter.fs import expand_any, fingerprint_any, output_dir_any, read_bytes
from kadapter.io import InputError, atomic_write_json, split_of, versions

WIKIDATA_ENTITY = "http://www.wikidata.org/entity/"
WIKIDATA_PROPERTY = "http://www.wikidata.org/prop/direct/"

# Reasons a triple is not a candidate, in the order they are checked.
DROP_REASONS = (
    "missing_boundaries",  # subject or object has no character span (null boundaries)
    "literal_argument",  # subject or object is a value (a date: "...^^xsd:dateTime"), not an entity
    "outside_sentence",  # a span is not inside the triple's sentence
    "overlapping_spans",
    "same_entity",
    "excluded_relation",
    "duplicate",  # same document, sentence, spans, entities and predicate as a kept one
)
# Bad records (with on_error: skip they are counted under these reasons).
BAD_TRIPLE_REASONS = ("malformed_triple", "bad_sentence_id", "boundaries_outside_text",
                      "surfaceform_mismatch", "not_an_entity")
BAD_DOCUMENT_REASONS = ("malformed_document", "bad_sentence_boundaries", "duplicate_docid")
IN_SKIPPED_DOCUMENT = "in_skipped_document"  # triples of a document skipped as a whole

SPILL_SCHEMA = pa.schema(
    [
        ("docid", pa.string()),
        ("sentence", pa.string()),
        ("subj_start", pa.int32()),
        ("subj_end", pa.int32()),
        ("obj_start", pa.int32()),
        ("obj_end", pa.int32()),
        ("subj_uri", pa.string()),
        ("obj_uri", pa.string()),
        ("relation", pa.string()),
        ("dev", pa.bool_()),
    ]
)
OUTPUT_SCHEMA = pa.schema([*SPILL_SCHEMA][:-1] + [pa.field("label", pa.int64())])
SPLITS = ("train", "dev")


@dataclass
class TrexConfig:
    """T-REx dump -> relation-classification set (section ``data_trex``)."""

    input: str | list[str] = "data/sample/trex"
    """T-REx JSON input: a file, a directory (its *.json files, recursively), a glob such
    as ``/data/trex/*.json``, or a list of these. Each file is a JSON list of documents."""
    output_dir: str = "data/processed/{preset}/trex_rc"
    """Where train.parquet, dev.parquet, relations.json and manifest.json are written
    (replaced whole, atomically)."""
    min_entity_count: int = 50
    """Entity filter: keep a candidate only if its subject and its object each have at
    least this many mentions (items of ``entities``) across all input documents."""
    min_relation_pairs: int = 50
    """Relation filter: keep a relation only if it has at least this many distinct
    (subject, object) entity pairs among the candidates left by the entity filter."""
    exclude_relations: list[str] = field(default_factory=lambda: ["P31"])
    """P-ids never used (P31 'instance of', as in the original release)."""
    dev_fraction: float = 0.1
    """Share of documents sent to dev, chosen by a hash of docid seeded with the
    top-level ``seed`` (a document is never split across train and dev)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad input (invalid JSON, a document missing fields, boundaries outside the text,
    a sentence_id out of range): ``raise`` stops with an error naming the file and
    the document; ``skip`` drops the file, document or triple and counts it per reason
    in the manifest."""
    workers: int = 1
    """Processes that parse input files in parallel (the output does not depend on it);
    with ``engine: ray`` and no ``ray_address``, the CPUs of the local Ray started."""
    engine: Literal["local", "ray"] = "local"
    """``local``: a process pool on this machine; ``ray``: Ray Data (one task per file) on a
    local Ray or a cluster (``ray_address``). Same bytes out either way."""
    ray_address: str | None = None
    """With ``engine: ray``: None starts a local Ray with ``workers`` CPUs; ``auto`` joins
    the running cluster (or the one named by RAY_ADDRESS); ``ray://host:10001`` or
    ``host:6379`` joins that one."""

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be local or ray, got {self.engine!r}")
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.min_entity_count < 1 or self.min_relation_pairs < 1:
            raise ValueError("min_entity_count and min_relation_pairs must be >= 1")


def short_id(uri: str) -> str:
    """``http://www.wikidata.org/entity/Q228`` -> ``Q228``; other URIs (dates) unchanged."""
    return uri[len(WIKIDATA_ENTITY):] if uri.startswith(WIKIDATA_ENTITY) else uri


def _short_ids(uris: list[str]) -> pa.Array:
    """``short_id`` of each URI, in Arrow."""
    column = pa.array(uris, pa.string())
    return pc.if_else(pc.starts_with(column, WIKIDATA_ENTITY),
                      pc.utf8_slice_codeunits(column, len(WIKIDATA_ENTITY)), column)


_ENTITY_URI = re.compile(re.escape(WIKIDATA_ENTITY) + r"Q[1-9][0-9]*")


def _argument_kind(uri: str) -> str:
    """``entity`` (a Wikidata item URI), ``literal`` (T-REx's ``value^^datatype`` form for
    dates and quantities) or ``bad`` (anything else)."""
    if _ENTITY_URI.fullmatch(uri):
        return "entity"
    return "literal" if "^^http://www.w3.org/2001/XMLSchema#" in uri else "bad"


def relation_id(uri: str) -> str:
    """``http://www.wikidata.org/prop/direct/P37`` -> ``P37``."""
    return uri[len(WIKIDATA_PROPERTY):] if uri.startswith(WIKIDATA_PROPERTY) else uri


class BadRecord(Exception):
    """A malformed document or triple; ``reason`` is the manifest key for it."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


def _span(bounds: Any, text_length: int) -> tuple[int, int] | None:
    """A triple argument's ``boundaries`` -> its [start, end) span, None when it has none."""
    if bounds is None:
        return None
    if type(bounds) not in (list, tuple) or len(bounds) != 2:
        raise BadRecord("malformed_triple", f"boundaries {bounds!r} are not [start, end]")
    start, end = bounds
    if type(start) is not int or type(end) is not int or not 0 <= start < end <= text_length:
        raise BadRecord(
            "boundaries_outside_text",
            f"boundaries {list(bounds)!r} outside the text (length {text_length})",
        )
    return start, end


def _as_json(value: Any) -> Any:
    """A typed document's tuples shown as the JSON lists they were (for messages)."""
    return list(value) if type(value) is tuple else value


def _sentences(text: str, boundaries: list) -> list[tuple[int, int]]:
    text_length = len(text)
    sentences = []
    for bounds in boundaries:
        if (
            type(bounds) not in (list, tuple)
            or len(bounds) != 2
            or not all(type(b) is int for b in bounds)
            or not 0 <= bounds[0] <= bounds[1] <= text_length
        ):
            raise BadRecord(
                "bad_sentence_boundaries",
                f"sentence boundaries {_as_json(bounds)!r} outside the text (length {text_length})",
            )
        sentences.append((bounds[0], bounds[1]))
    return sentences


def _check_document(doc: Any) -> None:
    if type(doc) is not dict:
        raise BadRecord("malformed_document", f"document is a {type(doc).__name__}, not an object")
    for key, kind in (("docid", str), ("text", str), ("sentences_boundaries", list),
                      ("entities", list), ("triples", list)):
        if key not in doc:
            raise BadRecord("malformed_document", f"missing field {key!r}")
        if type(doc[key]) is not kind:
            raise BadRecord("malformed_document", f"field {key!r} is not a {kind.__name__}")


def _entity_uris(doc: dict) -> list[str]:
    try:
        uris = [mention["uri"] for mention in doc["entities"]]
    except (TypeError, KeyError):
        raise BadRecord("malformed_document", "an item of 'entities' has no 'uri'") from None
    if not all(type(uri) is str for uri in uris):
        raise BadRecord("malformed_document", "an entity 'uri' is not a string")
    return uris


@dataclass
class FileScan:
    """What pass 1 learns from one input file."""

    entity_counts: Counter
    stats: Counter  # documents, triples, drop and skip reasons, split sizes
    candidates: int
    error: tuple[str, str | None, str] | None = None  # (path, record, problem) when raising
    docids: np.ndarray | None = None  # 64-bit hashes of the kept documents' docids
    doc_indexes: np.ndarray | None = None  # their positions in the file


# ``words_boundaries`` (a [start, end] pair for every word) is about half the parsing
# work on the real dump and is never used here. A value that is a valid JSON list of
# integer pairs is replaced by an empty list before parsing; anything else there is left
# for the parser to judge, so a file is valid JSON after the replacement exactly when it
# was before. (JSON whitespace and integers spelled out: no \f, \v or leading zeros.)
_WS, _INT = rb"[ \t\n\r]*", rb"(?:0|[1-9][0-9]*)"
_PAIR = rb"\[" + _WS + _INT + _WS + rb"," + _WS + _INT + _WS + rb"\]"
_WORD_BOUNDARIES = re.compile(
    rb'"words_boundaries"' + _WS + rb":" + _WS + rb"\[" + _WS
    + rb"(?:" + _PAIR + rb"(?:" + _WS + rb"," + _WS + _PAIR + rb")*)?" + _WS + rb"\]"
)


def plain_documents(raw: bytes) -> list:
    """A T-REx file's bytes -> its list of documents as dicts (``words_boundaries``
    emptied); invalid JSON raises orjson.JSONDecodeError."""
    documents = orjson.loads(_WORD_BOUNDARIES.sub(b'"words_boundaries":[]', raw))
    if type(documents) is not list:
        raise orjson.JSONDecodeError("top level is not a list of documents", "", 0)
    return documents


# Typed decoding: only the fields the stage reads become Python objects; msgspec skips
# the rest (words_boundaries, annotators...) without building them, 2-4x less work than
# dicts of everything. A file whose structure or types differ anywhere from these (a
# missing field, a float offset, a surface form that is not a string, a document that is
# not an object, invalid JSON) is decoded again as plain dicts, where the checks below
# name the bad record: both decodings give the same values, so the same bytes and counts
# come out.
class _Uri(msgspec.Struct, gc=False):
    uri: str


class _Argument(msgspec.Struct, gc=False):
    uri: str
    boundaries: tuple[int, int] | None
    surfaceform: str | None = None  # checked against the text at ``boundaries``


class _Triple(msgspec.Struct, gc=False):
    subject: _Argument
    object: _Argument
    predicate: _Uri
    sentence_id: int


class _Document(msgspec.Struct, gc=False):
    docid: str
    text: str
    sentences_boundaries: list[tuple[int, int]]
    entities: list[_Uri]
    triples: list[_Triple]


_TYPED = msgspec.json.Decoder(list[_Document])


def decode_documents(raw: bytes) -> list:
    """A T-REx file's bytes -> typed documents, or plain dicts when it does not fit the
    typed form (then bad records are found and named by the checks)."""
    try:
        return _TYPED.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return plain_documents(raw)


def docid_hash(docid: str) -> int:
    return int.from_bytes(hashlib.blake2b(docid.encode(), digest_size=8).digest(), "big")


# Field access, for typed and plain documents alike: the one place that reads a document.
def _triple_list(doc: Any) -> list | None:
    if type(doc) is _Document:
        return doc.triples
    triples = doc.get("triples") if type(doc) is dict else None
    return triples if type(triples) is list else None


def _docid(doc: Any) -> str:
    """The document's docid; BadRecord if the document is malformed."""
    if type(doc) is _Document:
        return doc.docid
    _check_document(doc)
    return doc["docid"]


def _document_fields(doc: Any) -> tuple[str, list[tuple[int, int]], list[str], list]:
    """text, sentence spans, entity mention URIs and triples of a document that passed
    ``_docid``; BadRecord if malformed."""
    if type(doc) is _Document:
        return (doc.text, _sentences(doc.text, doc.sentences_boundaries),
                [mention.uri for mention in doc.entities], doc.triples)
    return (doc["text"], _sentences(doc["text"], doc["sentences_boundaries"]),
            _entity_uris(doc), doc["triples"])


def _triple_fields(triple: Any, text_length: int, sentence_count: int) -> tuple:
    """predicate URI, subject URI, object URI, sentence_id, subject span, object span,
    subject surface form, object surface form (None when absent or not a string)."""
    if type(triple) is _Triple:  # types are checked by the decoder, ranges here
        subject, obj = triple.subject, triple.object
        predicate, subj_uri, obj_uri = triple.predicate.uri, subject.uri, obj.uri
        sentence_id = triple.sentence_id
        subj_span, obj_span = subject.boundaries, obj.boundaries
        subj_form, obj_form = subject.surfaceform, obj.surfaceform
        for span in (subj_span, obj_span):
            if span is not None and not 0 <= span[0] < span[1] <= text_length:
                _span(list(span), text_length)  # raises, with the plain path's message
    else:
        try:
            subject, obj = triple["subject"], triple["object"]
            predicate = triple["predicate"]["uri"]
            subj_uri, obj_uri = subject["uri"], obj["uri"]
            sentence_id = triple["sentence_id"]
            subj_span = _span(subject["boundaries"], text_length)
            obj_span = _span(obj["boundaries"], text_length)
        except (TypeError, KeyError) as err:
            raise BadRecord("malformed_triple", f"missing or wrong field {err}") from None
        if type(predicate) is not str or type(subj_uri) is not str or type(obj_uri) is not str:
            raise BadRecord("malformed_triple", "a 'uri' is not a string")
        subj_form, obj_form = subject.get("surfaceform"), obj.get("surfaceform")
        subj_form = subj_form if type(subj_form) is str else None
        obj_form = obj_form if type(obj_form) is str else None
    if type(sentence_id) is not int or not 0 <= sentence_id < sentence_count:
        raise BadRecord(
            "bad_sentence_id",
            f"sentence_id {sentence_id!r} out of range ({sentence_count} sentences)",
        )
    return predicate, subj_uri, obj_uri, sentence_id, subj_span, obj_span, subj_form, obj_form


def _check_argument(role: str, uri: str, kind: str, span: tuple[int, int] | None,
                    form: str | None, text: str) -> None:
    """BadRecord for an argument that is neither an entity nor a typed value, or whose
    surface form is not the text at its span."""
    if kind == "bad":
        raise BadRecord("not_an_entity", f"{role} uri {uri!r} is "
                        "neither a Wikidata entity nor a typed value")
    if span is not None and form is not None and text[span[0]:span[1]] != form:
        raise BadRecord("surfaceform_mismatch", f"{role} surfaceform {form!r} "
                        f"is not the text at {list(span)} "
                        f"({text[span[0]:span[1]]!r})")


def scan_file(path: str, spill: str, seed: int, dev_fraction: float,
              exclude: frozenset[str], on_error: str,
              skip_docids: frozenset[str] = frozenset()) -> FileScan:
    """Pass 1 on one file (local engine): ``scan_table``, its candidates written to ``spill``."""
    scan, table = scan_table(path, seed, dev_fraction, exclude, on_error, skip_docids)
    if table is not None:
        pq.write_table(table, spill, compression="zstd")
    return scan


def scan_table(path: str, seed: int, dev_fraction: float, exclude: frozenset[str],
               on_error: str, skip_docids: frozenset[str] = frozenset()
               ) -> tuple[FileScan, pa.Table | None]:
    """Pass 1 on one file: count entity mentions, collect its candidates (SPILL_SCHEMA,
    sorted); the table is None when the file is skipped or an error is reported.
    Documents whose docid is in ``skip_docids`` (already read from an earlier file) are
    skipped as duplicates."""
    # Hundreds of thousands of small acyclic objects are built per file: the cycle
    # collector, triggered by allocations, would spend ~25% of the time finding nothing.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan_table(path, seed, dev_fraction, exclude, on_error, skip_docids)
    finally:
        if enabled:
            gc.enable()


def _scan_table(path: str, seed: int, dev_fraction: float, exclude: frozenset[str],
                on_error: str, skip_docids: frozenset[str]) -> tuple[FileScan, pa.Table | None]:
    stats: Counter = Counter()
    entities: Counter = Counter()

    def fail(record: str | None, problem: str) -> tuple[FileScan, None] | None:
        """With on_error: raise, the result that reports the error; else None (skip)."""
        if on_error == "raise":
            return FileScan(Counter(), stats, 0, error=(str(path), record, problem)), None
        return None

    try:
        documents = decode_documents(read_bytes(path))
    except orjson.JSONDecodeError as err:
        stats["files_skipped"] += 1
        return fail(None, f"not valid JSON: {err}") or (FileScan(entities, stats, 0), None)

    relation_ids: dict[str, str] = {}  # predicate URI -> P-id, and excluded or not
    kinds: dict[str, str] = {}  # argument URI -> _argument_kind
    rows: set[tuple] = set()
    texts: list[str] = []  # the text of each document, by index
    dropped: Counter = Counter()
    missing = outside = overlapping = same = excluded = literal = 0
    seen: dict[str, int] = {}  # docid -> index of its document in this file
    for index, doc in enumerate(documents):
        triples = _triple_list(doc)
        if triples is not None:
            stats["triples"] += len(triples)
        try:
            docid = _docid(doc)
            if docid in seen:
                raise BadRecord("duplicate_docid", f"docid {docid} is also document "
                                f"{seen[docid]} of this file (its rows and entity "
                                "counts would double)")
            if docid in skip_docids:
                raise BadRecord("duplicate_docid", f"docid {docid} is also in an "
                                "earlier input file")
            text, sentences, uris, triples = _document_fields(doc)
            seen[docid] = index
        except BadRecord as bad:
            stats[f"skipped:{bad.reason}"] += 1
            texts.append("")
            if triples is not None:
                dropped[IN_SKIPPED_DOCUMENT] += len(triples)
            failure = fail(f"document {index}", bad.problem)
            if failure:
                return failure
            continue
        texts.append(text)
        entities.update(uris)
        dev = split_of(docid, seed, dev_fraction) == "dev"
        stats["documents_dev" if dev else "documents_train"] += 1
        text_length, sentence_count = len(text), len(sentences)
        for position, triple in enumerate(triples):
            try:
                (predicate, subj_uri, obj_uri, sentence_id, subj_span, obj_span,
                 subj_form, obj_form) = _triple_fields(triple, text_length, sentence_count)
                subj_kind = kinds.get(subj_uri)
                if subj_kind is None:
                    subj_kind = kinds[subj_uri] = _argument_kind(subj_uri)
                obj_kind = kinds.get(obj_uri)
                if obj_kind is None:
                    obj_kind = kinds[obj_uri] = _argument_kind(obj_uri)
                # one test for the common case (both fine); the message from _check_argument
                if (subj_kind == "bad" or obj_kind == "bad"
                        or (subj_form is not None and subj_span is not None
                            and text[subj_span[0]:subj_span[1]] != subj_form)
                        or (obj_form is not None and obj_span is not None
                            and text[obj_span[0]:obj_span[1]] != obj_form)):
                    _check_argument("subject", subj_uri, subj_kind, subj_span, subj_form, text)
                    _check_argument("object", obj_uri, obj_kind, obj_span, obj_form, text)
            except BadRecord as bad:
                dropped[bad.reason] += 1
                failure = fail(f"document {index} (docid {docid}), triple {position}", bad.problem)
                if failure:
                    return failure
                continue
            if subj_span is None or obj_span is None:
                missing += 1
                continue
            if subj_kind != "entity" or obj_kind != "entity":
                literal += 1
                continue
            sent_start, sent_end = sentences[sentence_id]
            (subj_start, subj_end), (obj_start, obj_end) = subj_span, obj_span
            if not (sent_start <= subj_start and subj_end <= sent_end
                    and sent_start <= obj_start and obj_end <= sent_end):
                outside += 1
                continue
            if subj_start < obj_end and obj_start < subj_end:
                overlapping += 1
                continue
            if subj_uri == obj_uri:
                same += 1
                continue
            relation = relation_ids.get(predicate)
            if relation is None:
                relation = relation_ids[predicate] = relation_id(predicate)
            if relation in exclude:
                excluded += 1
                continue
            rows.add((docid, sent_start, subj_start - sent_start, subj_end - sent_start,
                      obj_start - sent_start, obj_end - sent_start, relation,
                      subj_uri, obj_uri, index, sent_end, dev))
    stats["documents"] = len(documents)
    dropped.update(missing_boundaries=missing, literal_argument=literal, outside_sentence=outside,
                   overlapping_spans=overlapping, same_entity=same, excluded_relation=excluded)
    candidates = stats["triples"] - sum(dropped.values())
    dropped["duplicate"] = candidates - len(rows)
    stats.update({f"dropped:{reason}": n for reason, n in dropped.items()})

    # Rows sort by docid, sentence, offsets, relation, entities; the sentence text is cut
    # only for the rows kept.
    ordered = sorted(rows)
    table = pa.table(
        {
            "docid": [r[0] for r in ordered],
            "sentence": [texts[r[9]][r[1]:r[10]] for r in ordered],
            "subj_start": [r[2] for r in ordered],
            "subj_end": [r[3] for r in ordered],
            "obj_start": [r[4] for r in ordered],
            "obj_end": [r[5] for r in ordered],
            "subj_uri": _short_ids([r[7] for r in ordered]),
            "obj_uri": _short_ids([r[8] for r in ordered]),
            "relation": [r[6] for r in ordered],
            "dev": [r[11] for r in ordered],
        },
        schema=SPILL_SCHEMA,
    )
    short_counts: Counter = Counter()
    for uri, count in entities.items():
        short_counts[short_id(uri)] += count
    kept = sorted(seen.items(), key=lambda item: item[1])
    return FileScan(short_counts, stats, len(ordered),
                    docids=np.array([docid_hash(d) for d, _ in kept], dtype=np.uint64),
                    doc_indexes=np.array([i for _, i in kept], dtype=np.int64)), table


def _scan_job(job: tuple) -> FileScan:
    return scan_file(*job)


def _rescan_job(job: tuple) -> tuple[Counter, FileScan]:
    """A file scanned again with more documents skipped: (its entity counts in the scan
    being replaced, found by running that scan again, and the new scan)."""
    path, spill, seed, dev_fraction, exclude, on_error, before, after = job
    earlier, _ = scan_table(path, seed, dev_fraction, exclude, on_error, before)
    return earlier.entity_counts, scan_file(path, spill, seed, dev_fraction, exclude, on_error,
                                            after)


# Passes 2 and 3 on one file's candidates: the same functions for both engines.
def entity_filter(table: pa.Table, kept_entities: pa.Array) -> pa.Table:
    """The candidates whose subject and object are both kept entities."""
    return table.filter(pc.and_(pc.is_in(table["subj_uri"], value_set=kept_entities),
                                pc.is_in(table["obj_uri"], value_set=kept_entities)))


def distinct_pairs(table: pa.Table) -> pa.Table:
    """The distinct (relation, subject, object) triples of a table."""
    return (table.select(["relation", "subj_uri", "obj_uri"])
            .group_by(["relation", "subj_uri", "obj_uri"]).aggregate([]))


def pair_counts_of(pair_tables: list[pa.Table]) -> dict[str, int]:
    """Relation -> number of distinct (subject, object) pairs over all tables."""
    pairs = pa.concat_tables(pair_tables) if pair_tables else SPILL_SCHEMA.empty_table()
    pairs = distinct_pairs(pairs)
    return {row["relation"]: row["count_all"]
            for row in pairs.group_by("relation").aggregate([([], "count_all")]).to_pylist()}


def label(table: pa.Table, kept_relations: pa.Array) -> pa.Table:
    """Relation filter and label column (the index of the relation in ``kept_relations``)."""
    table = table.filter(pc.is_in(table["relation"], value_set=kept_relations))
    labels = pc.cast(pc.index_in(table["relation"], value_set=kept_relations), pa.int64())
    return table.append_column("label", labels)


def split_parts(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """One file's labelled rows -> its non-empty (split, part), in the order they are written."""
    parts = []
    for split, mask in (("train", pc.invert(table["dev"])), ("dev", table["dev"])):
        part = table.filter(mask).select(OUTPUT_SCHEMA.names)
        if part.num_rows:
            parts.append((split, part))
    return parts


def label_and_split(table: pa.Table, kept_relations: pa.Array) -> list[tuple[str, pa.Table]]:
    """Relation filter, label column, split: the non-empty (split, part) of one file."""
    return split_parts(label(table, kept_relations))


def _docids_of(scan: FileScan) -> tuple[np.ndarray, np.ndarray]:
    """A scan's docid hashes and document positions (none for a file skipped as invalid JSON)."""
    if scan.docids is None:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return scan.docids, scan.doc_indexes


def repeated_docids(paths: list, docids: list[tuple[np.ndarray, np.ndarray]]
                    ) -> dict[tuple[str, int, str], str]:
    """``{(later file, document index, docid): first file}`` for each docid kept in more
    than one file (found by 64-bit hash, confirmed on the documents' docids)."""
    hashes = [h for h, _ in docids]
    if sum(len(h) for h in hashes) == 0:
        return {}
    flat = np.concatenate(hashes)
    files = np.repeat(np.arange(len(hashes)), [len(h) for h in hashes])
    positions = np.concatenate([np.arange(len(h)) for h in hashes])
    order = np.argsort(flat, kind="stable")  # stable: the earliest file comes first
    ordered = flat[order]
    repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1  # not the first of its hash
    found: list[tuple[int, int, str, int]] = []  # (file, document index, docid, first file)
    cache: dict[int, list] = {}

    def docid_at(k: int) -> tuple[int, int, str]:
        """(file, document index, docid) of the k-th hash in sorted order."""
        file = int(files[order[k]])
        index = int(docids[file][1][positions[order[k]]])
        documents = cache.get(file)
        if documents is None:
            documents = cache[file] = decode_documents(read_bytes(paths[file]))
        return file, index, _docid(documents[index])

    for start in sorted({int(np.searchsorted(ordered, ordered[k])) for k in repeats}):
        first_file: dict[str, int] = {}  # docid -> earliest file, within one hash value
        k = start
        while k < len(ordered) and ordered[k] == ordered[start]:
            file, index, docid = docid_at(k)
            earlier = first_file.setdefault(docid, file)
            if earlier != file:  # (a repeat inside one file is caught by its scan)
                found.append((file, index, docid, earlier))
            k += 1
    return {(str(paths[file]), index, docid): str(paths[earlier])  # in input order
            for file, index, docid, earlier in sorted(found)}


def _totals(scans: list[FileScan]) -> tuple[Counter, int, list[tuple[np.ndarray, np.ndarray]]]:
    """Stats, candidates and docid hashes of the files' scans, in input order."""
    stats: Counter = Counter()
    for scan in scans:
        stats.update(scan.stats)
    return stats, sum(scan.candidates for scan in scans), [_docids_of(scan) for scan in scans]


def _with_repeats(skips: dict[int, frozenset[str]], repeated: dict, paths: list
                  ) -> dict[int, frozenset[str]]:
    """The docids each file skips on the next pass 1: those before, plus ``repeated``."""
    more: dict[int, set[str]] = {k: set(v) for k, v in skips.items()}
    index_of = {str(p): i for i, p in enumerate(paths)}
    for path, _, docid in repeated:
        more.setdefault(index_of[path], set()).add(docid)
    return {k: frozenset(v) for k, v in more.items()}


class LocalTrex:
    """The local engine: a process pool for pass 1, spill files for the candidates."""

    def __init__(self, paths: list, config: TrexConfig, seed: int, out: Path, progress: bool):
        self.paths, self.config, self.seed, self.progress = paths, config, seed, progress
        self.spill_dir = out / ".spill"
        self.spill_dir.mkdir()
        self.all_spills = [str(self.spill_dir / f"{i:06d}.parquet") for i in range(len(paths))]
        self.spills: list[str] = []
        self.entity_counts: Counter = Counter()
        self.scans: dict[int, FileScan] = {}  # by file index, without their entity counts

    def scan(self, skips: dict[int, frozenset[str]],
             before: dict[int, frozenset[str]] | None = None
             ) -> tuple[Counter, int, list[tuple[np.ndarray, np.ndarray]]]:
        """Pass 1: parse every file (in parallel), count mentions, spill candidates; the
        documents of file i whose docid is in ``skips[i]`` are skipped as duplicates.
        With ``before`` (the skips of the pass 1 done already) only the files whose skips
        changed are parsed again, and their earlier counts are taken back.
        Returns stats, candidates and each file's docid hashes (``repeated_docids``), of
        all files."""
        from kadapter.progress import progress as progress_bar

        config = self.config
        common = (self.seed, config.dev_fraction, frozenset(config.exclude_relations),
                  config.on_error)
        if before is None:
            files = list(range(len(self.paths)))
            jobs = [(str(self.paths[i]), self.all_spills[i], *common, skips.get(i, frozenset()))
                    for i in files]
            job = _scan_job
        else:
            files = [i for i in range(len(self.paths))
                     if skips.get(i, frozenset()) != before.get(i, frozenset())]
            jobs = [(str(self.paths[i]), self.all_spills[i], *common, before.get(i, frozenset()),
                     skips.get(i, frozenset())) for i in files]
            job = _rescan_job
        bar = progress_bar(total=len(jobs), desc="T-REx files", unit="file",
                           disable=not self.progress)
        if config.workers > 1 and len(jobs) > 1:
            pool = multiprocessing.get_context("spawn").Pool(min(config.workers, len(jobs)))
            results = pool.imap(job, jobs)
        else:
            pool, results = None, map(job, jobs)
        try:
            for file, result in zip(files, results):
                if before is not None:
                    earlier, result = result
                    self.entity_counts.subtract(earlier)
                    for entity in earlier:  # entities left with no mention go
                        if self.entity_counts[entity] <= 0:
                            del self.entity_counts[entity]
                if result.error:
                    raise InputError(*result.error)
                self.entity_counts.update(result.entity_counts)
                result.entity_counts = None
                self.scans[file] = result
                bar.update()
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()  # every result is in (or an error stops the run)
        # minus invalid files
        self.spills = [spill for spill in self.all_spills if Path(spill).exists()]
        return _totals([self.scans[i] for i in range(len(self.paths))])

    def entity_totals(self, min_count: int) -> tuple[int, int, pa.Array]:
        """Mentions, distinct entities, and the sorted kept entities."""
        kept = sorted(e for e, n in self.entity_counts.items() if n >= min_count)
        return (sum(self.entity_counts.values()), len(self.entity_counts),
                pa.array(kept, pa.string()))

    def filter_entities(self, kept_entities: pa.Array) -> tuple[int, dict[str, int]]:
        """Pass 2: entity filter (each spill rewritten with what it keeps), then the
        distinct (subject, object) pairs of every relation."""
        after_entity_filter = 0
        pair_tables = []
        for spill in self.spills:
            table = entity_filter(pq.read_table(spill), kept_entities)
            pq.write_table(table, spill, compression="zstd")
            after_entity_filter += table.num_rows
            pair_tables.append(distinct_pairs(table))
        return after_entity_filter, pair_counts_of(pair_tables)

    def labelled_parts(self, kept_relations: pa.Array) -> Iterator[list[tuple[str, pa.Table]]]:
        """Pass 3, file by file in input order."""
        for spill in self.spills:
            yield label_and_split(pq.read_table(spill), kept_relations)

    def close(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)


def build_trex_rc(config: TrexConfig, seed: int, output_dir: str | Path,
                  progress: bool = False) -> dict[str, Any]:
    """Run the whole stage; returns the manifest (also written to ``output_dir``)."""
    paths = expand_any(config.input, suffixes=(".json",))
    started = time.perf_counter()
    with output_dir_any(output_dir, stage="data_trex") as out:
        if config.engine == "ray":
            from kadapter.ray_engine import RayTrex

            engine = RayTrex(paths, config, seed, progress)
        else:
            engine = LocalTrex(paths, config, seed, out, progress)
        try:
            # Pass 1. A docid met again in a later file is an error, or (skip) the files
            # where it is met again are parsed again, skipping it there.
            skips: dict[int, frozenset[str]] = {}
            stats, candidates, docids = engine.scan(skips)
            while repeated := repeated_docids(paths, docids):
                if config.on_error == "raise":
                    (path, index, docid), first = next(iter(repeated.items()))
                    raise InputError(path, f"document {index} (docid {docid})",
                                     f"docid also in {first}: its rows and entity counts "
                                     "would double")
                skips, before = _with_repeats(skips, repeated, paths), skips
                stats, candidates, docids = engine.scan(skips, before)
            mentions, distinct_entities, kept_entities = engine.entity_totals(
                config.min_entity_count)
            after_entity_filter, pair_counts = engine.filter_entities(kept_entities)
            relations = sorted(r for r, n in pair_counts.items()
                               if n >= config.min_relation_pairs)
            kept_relations = pa.array(relations, pa.string())

            # Pass 3: relation filter, labels, split; rows keep the input file order.
            per_relation = {r: Counter() for r in relations}
            writers = {split: pq.ParquetWriter(out / f"{split}.parquet", OUTPUT_SCHEMA,
                                               compression="zstd") for split in SPLITS}
            documents_with_examples = Counter()  # a document lies in one file: sum per file
            try:
                for parts in engine.labelled_parts(kept_relations):
                    for split, part in parts:
                        writers[split].write_table(part)
                        documents_with_examples[split] += len(part["docid"].unique())
                        for relation, count in zip(*_value_counts(part["relation"])):
                            per_relation[relation][split] += count
            finally:
                for writer in writers.values():
                    writer.close()
        finally:
            engine.close()

        examples = {split: sum(c[split] for c in per_relation.values()) for split in SPLITS}
        dropped = {reason: stats[f"dropped:{reason}"]
                   for reason in (*DROP_REASONS, *BAD_TRIPLE_REASONS, IN_SKIPPED_DOCUMENT)}
        counts = {
            "files": len(paths),
            "files_skipped_invalid_json": stats["files_skipped"],
            "documents": stats["documents"],
            "documents_skipped": sum(stats[f"skipped:{r}"] for r in BAD_DOCUMENT_REASONS),
            "documents_skipped_by_reason": {
                r: stats[f"skipped:{r}"] for r in BAD_DOCUMENT_REASONS
            },
            "documents_by_split": {s: stats[f"documents_{s}"] for s in SPLITS},
            "documents_with_examples": {s: documents_with_examples[s] for s in SPLITS},
            "entity_mentions": mentions,
            "distinct_entities": distinct_entities,
            "entities_kept": len(kept_entities),
            "triples_read": stats["triples"],
            "triples_dropped": dropped,
            "candidates": candidates,
            "dropped_by_entity_filter": candidates - after_entity_filter,
            "after_entity_filter": after_entity_filter,
            "relations_after_entity_filter": len(pair_counts),
            "relations_kept": len(relations),
            "dropped_by_relation_filter": after_entity_filter - sum(examples.values()),
            "after_relation_filter": sum(examples.values()),
            "examples": examples,
        }
        if counts["triples_read"] != sum(dropped.values()) + candidates:
            raise AssertionError(f"triple accounting is off: {counts}")
        atomic_write_json(out / "relations.json", relations)
        manifest = {
            "stage": "data_trex",
            "inputs": [fingerprint_any(p, full_hash=False) for p in paths],  # tens of GB: no hash
            "parameters": {**to_plain(config), "output_dir": str(output_dir), "seed": seed},
            "counts": counts,
            "relations": {
                r: {"label": i, "pairs": pair_counts[r], **{s: per_relation[r][s] for s in SPLITS}}
                for i, r in enumerate(relations)
            },
            "relations_dropped_by_pair_filter": {
                r: n for r, n in sorted(pair_counts.items()) if r not in per_relation
            },
            "outputs": {name: (out / name).stat().st_size
                        for name in ("train.parquet", "dev.parquet", "relations.json")},
            "versions": versions(),
        }
        atomic_write_json(out / "manifest.json", manifest)
    if progress:
        print(f"read {stats['triples']} triples in {counts['documents']} documents "
              f"({time.perf_counter() - started:.1f}s)")
    return manifest


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counted = pc.value_counts(column)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()
