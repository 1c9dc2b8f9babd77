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

Pass 1 (parallel over files) parses, counts and writes each file's candidates to a
spill parquet; passes 2 and 3 (columnar, pyarrow) apply the filters and write
``train.parquet`` / ``dev.parquet``. Rows are ordered by input file (sorted paths),
then docid, sentence, offsets and relation; the bytes do not depend on ``workers``.
Every triple read is accounted for in the manifest: triples read = sum of drop
reasons + candidates; candidates = dropped by each filter + examples.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kadapter.config import to_plain
from kadapter.io import (
    InputError,
    atomic_output_dir,
    atomic_write_json,
    expand_inputs,
    file_fingerprint,
    split_of,
    versions,
)

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
    """Processes that parse input files in parallel (the output does not depend on it)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.min_entity_count < 1 or self.min_relation_pairs < 1:
            raise ValueError("min_entity_count and min_relation_pairs must be >= 1")


def short_id(uri: str) -> str:
    """``http://www.wikidata.org/entity/Q228`` -> ``Q228``; other URIs (dates) unchanged."""
    return uri[len(WIKIDATA_ENTITY):] if uri.startswith(WIKIDATA_ENTITY) else uri


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
    if type(bounds) is not list or len(bounds) != 2:
        raise BadRecord("malformed_triple", f"boundaries {bounds!r} are not [start, end]")
    start, end = bounds
    if type(start) is not int or type(end) is not int or not 0 <= start < end <= text_length:
        raise BadRecord(
            "boundaries_outside_text",
            f"boundaries {bounds!r} outside the text (length {text_length})",
        )
    return start, end


def _sentences(doc: dict) -> list[tuple[int, int]]:
    text_length = len(doc["text"])
    sentences = []
    for bounds in doc["sentences_boundaries"]:
        if (
            type(bounds) is not list
            or len(bounds) != 2
            or not all(type(b) is int for b in bounds)
            or not 0 <= bounds[0] <= bounds[1] <= text_length
        ):
            raise BadRecord(
                "bad_sentence_boundaries",
                f"sentence boundaries {bounds!r} outside the text (length {text_length})",
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


def read_documents(path: str | Path) -> list:
    """One T-REx file -> its list of documents (``words_boundaries`` emptied)."""
    raw = _WORD_BOUNDARIES.sub(b'"words_boundaries":[]', Path(path).read_bytes())
    documents = orjson.loads(raw)
    if type(documents) is not list:
        raise orjson.JSONDecodeError("top level is not a list of documents", "", 0)
    return documents


def docid_hash(docid: str) -> int:
    return int.from_bytes(hashlib.blake2b(docid.encode(), digest_size=8).digest(), "big")


def scan_file(path: str, spill: str, seed: int, dev_fraction: float,
              exclude: frozenset[str], on_error: str,
              skip_docids: frozenset[str] = frozenset()) -> FileScan:
    """Pass 1 on one file: count entity mentions, write its candidates to ``spill``.
    Documents whose docid is in ``skip_docids`` (already read from an earlier file) are
    skipped as duplicates."""
    stats: Counter = Counter()
    entities: Counter = Counter()

    def fail(record: str | None, problem: str) -> FileScan | None:
        """With on_error: raise, the result that reports the error; else None (skip)."""
        if on_error == "raise":
            return FileScan(Counter(), stats, 0, error=(path, record, problem))
        return None

    try:
        documents = read_documents(path)
    except orjson.JSONDecodeError as err:
        stats["files_skipped"] += 1
        return fail(None, f"not valid JSON: {err}") or FileScan(entities, stats, 0)

    relation_ids: dict[str, str] = {}  # predicate URI -> P-id, and excluded or not
    rows: set[tuple] = set()
    dropped: Counter = Counter()
    missing = outside = overlapping = same = excluded = literal = 0
    seen: dict[str, int] = {}  # docid -> index of its document in this file
    for index, doc in enumerate(documents):
        triples = doc.get("triples") if type(doc) is dict else None
        if type(triples) is list:
            stats["triples"] += len(triples)
        try:
            _check_document(doc)
            if doc["docid"] in seen:
                raise BadRecord("duplicate_docid", f"docid {doc['docid']} is also document "
                                f"{seen[doc['docid']]} of this file (its rows and entity "
                                "counts would double)")
            if doc["docid"] in skip_docids:
                raise BadRecord("duplicate_docid", f"docid {doc['docid']} is also in an "
                                "earlier input file")
            sentences = _sentences(doc)
            uris = _entity_uris(doc)
            seen[doc["docid"]] = index
        except BadRecord as bad:
            stats[f"skipped:{bad.reason}"] += 1
            if type(triples) is list:
                dropped[IN_SKIPPED_DOCUMENT] += len(triples)
            failure = fail(f"document {index}", bad.problem)
            if failure:
                return failure
            continue
        entities.update(uris)
        docid, text = doc["docid"], doc["text"]
        dev = split_of(docid, seed, dev_fraction) == "dev"
        stats["documents_dev" if dev else "documents_train"] += 1
        text_length, sentence_count = len(text), len(sentences)
        for position, triple in enumerate(triples):
            try:
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
                if type(sentence_id) is not int or not 0 <= sentence_id < sentence_count:
                    raise BadRecord(
                        "bad_sentence_id",
                        f"sentence_id {sentence_id!r} out of range ({sentence_count} sentences)",
                    )
                kinds = (_argument_kind(subj_uri), _argument_kind(obj_uri))
                for role, argument, span, kind in (("subject", subject, subj_span, kinds[0]),
                                                   ("object", obj, obj_span, kinds[1])):
                    if kind == "bad":
                        raise BadRecord("not_an_entity", f"{role} uri {argument['uri']!r} is "
                                        "neither a Wikidata entity nor a typed value")
                    form = argument.get("surfaceform")
                    if span is not None and type(form) is str and text[span[0]:span[1]] != form:
                        raise BadRecord("surfaceform_mismatch", f"{role} surfaceform {form!r} "
                                        f"is not the text at {list(span)} "
                                        f"({text[span[0]:span[1]]!r})")
            except BadRecord as bad:
                dropped[bad.reason] += 1
                failure = fail(f"document {index} (docid {docid}), triple {position}", bad.problem)
                if failure:
                    return failure
                continue
            if subj_span is None or obj_span is None:
                missing += 1
                continue
            if kinds != ("entity", "entity"):
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
            "sentence": [documents[r[9]]["text"][r[1]:r[10]] for r in ordered],
            "subj_start": [r[2] for r in ordered],
            "subj_end": [r[3] for r in ordered],
            "obj_start": [r[4] for r in ordered],
            "obj_end": [r[5] for r in ordered],
            "subj_uri": [short_id(r[7]) for r in ordered],
            "obj_uri": [short_id(r[8]) for r in ordered],
            "relation": [r[6] for r in ordered],
            "dev": [r[11] for r in ordered],
        },
        schema=SPILL_SCHEMA,
    )
    pq.write_table(table, spill, compression="zstd")
    short_counts: Counter = Counter()
    for uri, count in entities.items():
        short_counts[short_id(uri)] += count
    kept = sorted(seen.items(), key=lambda item: item[1])
    return FileScan(short_counts, stats, len(ordered),
                    docids=np.array([docid_hash(d) for d, _ in kept], dtype=np.uint64),
                    doc_indexes=np.array([i for _, i in kept], dtype=np.int64))


def _scan_job(job: tuple) -> FileScan:
    return scan_file(*job)


def _first_pass(jobs: list[tuple], skips: dict[int, frozenset[str]], config: TrexConfig,
                progress: bool) -> tuple[Counter, Counter, int, list[tuple[np.ndarray, np.ndarray]]]:
    """Pass 1 over every file -> (entity counts, stats, candidates, and per file the docid
    hashes of its kept documents with their positions)."""
    entity_counts: Counter = Counter()
    stats: Counter = Counter()
    candidates = 0
    docids: list[tuple[np.ndarray, np.ndarray]] = []
    jobs = [(*job, skips.get(i, frozenset())) for i, job in enumerate(jobs)]
    from kadapter.progress import progress as progress_bar

    bar = progress_bar(total=len(jobs), desc="T-REx files", unit="file", disable=not progress)
    if config.workers > 1 and len(jobs) > 1:
        pool = multiprocessing.get_context("spawn").Pool(min(config.workers, len(jobs)))
        scans = pool.imap(_scan_job, jobs)
    else:
        pool, scans = None, map(_scan_job, jobs)
    try:
        for scan in scans:
            if scan.error:
                raise InputError(*scan.error)
            entity_counts.update(scan.entity_counts)
            stats.update(scan.stats)
            candidates += scan.candidates
            if scan.docids is None:  # a file skipped as invalid JSON
                docids.append((np.zeros(0, np.uint64), np.zeros(0, np.int64)))
            else:
                docids.append((scan.docids, scan.doc_indexes))
            bar.update()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # every result is in (or an error stops the run)
    return entity_counts, stats, candidates, docids


def _repeated_docids(paths: list[Path], docids: list[tuple[np.ndarray, np.ndarray]]
                     ) -> dict[tuple[Path, int, str], Path]:
    """``{(later file, document index, docid): first file}`` for each docid kept in more
    than one file (by 64-bit hash, confirmed on the documents)."""
    hashes = [h for h, _ in docids]
    if not hashes or sum(len(h) for h in hashes) == 0:
        return {}
    flat = np.concatenate(hashes)
    files = np.repeat(np.arange(len(hashes)), [len(h) for h in hashes])
    positions = np.concatenate([np.arange(len(h)) for h in hashes])
    order = np.argsort(flat, kind="stable")  # stable: the earliest file comes first
    ordered = flat[order]
    later = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
    if len(later) == 0:
        return {}
    found: dict[tuple[Path, int, str], Path] = {}
    cache: dict[int, list] = {}
    for k in later:
        file, position = int(files[order[k]]), int(positions[order[k]])
        first = int(files[order[np.searchsorted(ordered, ordered[k])]])
        if file == first:
            continue  # a repeat inside one file is caught by its scan
        index = int(docids[file][1][position])
        documents = cache.setdefault(file, read_documents(paths[file]))
        found[(paths[file], index, documents[index]["docid"])] = paths[first]
    return found


def build_trex_rc(config: TrexConfig, seed: int, output_dir: str | Path,
                  progress: bool = False) -> dict[str, Any]:
    """Run the whole stage; returns the manifest (also written to ``output_dir``)."""

    paths = expand_inputs(config.input, suffixes=(".json",))
    exclude = frozenset(config.exclude_relations)
    started = time.perf_counter()
    with atomic_output_dir(output_dir, stage="data_trex") as out:
        spill_dir = out / ".spill"
        spill_dir.mkdir()
        spills = [str(spill_dir / f"{i:06d}.parquet") for i in range(len(paths))]
        jobs = [(str(p), s, seed, config.dev_fraction, exclude, config.on_error)
                for p, s in zip(paths, spills)]

        # Pass 1: parse every file (in parallel), count mentions, spill candidates. A docid
        # met again in a later file is an error, or (skip) a second pass 1 skips it there.
        skips: dict[int, frozenset[str]] = {}
        while True:
            entity_counts, stats, candidates, docids = _first_pass(jobs, skips, config, progress)
            repeated = _repeated_docids(paths, docids)
            if not repeated:
                break
            if config.on_error == "raise":
                (path, index, docid), first = next(iter(repeated.items()))
                raise InputError(path, f"document {index} (docid {docid})",
                                 f"docid also in {first}: its rows and entity counts would double")
            more: dict[int, set[str]] = {k: set(v) for k, v in skips.items()}
            for path, _, docid in repeated:
                more.setdefault(paths.index(path), set()).add(docid)
            skips = {k: frozenset(v) for k, v in more.items()}

        # Pass 2: entity filter (each spill rewritten with what it keeps), then the
        # distinct (subject, object) pairs of every relation.
        kept_entities = pa.array(
            sorted(e for e, n in entity_counts.items() if n >= config.min_entity_count),
            pa.string(),
        )
        spills = [spill for spill in spills if Path(spill).exists()]  # minus invalid files
        after_entity_filter = 0
        pair_tables = []
        for spill in spills:
            table = pq.read_table(spill)
            table = table.filter(pc.and_(pc.is_in(table["subj_uri"], value_set=kept_entities),
                                         pc.is_in(table["obj_uri"], value_set=kept_entities)))
            pq.write_table(table, spill, compression="zstd")
            after_entity_filter += table.num_rows
            pair_tables.append(table.select(["relation", "subj_uri", "obj_uri"])
                               .group_by(["relation", "subj_uri", "obj_uri"]).aggregate([]))
        pairs = pa.concat_tables(pair_tables) if pair_tables else SPILL_SCHEMA.empty_table()
        pairs = pairs.group_by(["relation", "subj_uri", "obj_uri"]).aggregate([])
        pair_counts = {
            row["relation"]: row["count_all"]
            for row in pairs.group_by("relation").aggregate([([], "count_all")]).to_pylist()
        }
        relations = sorted(r for r, n in pair_counts.items() if n >= config.min_relation_pairs)
        kept_relations = pa.array(relations, pa.string())

        # Pass 3: relation filter, labels, split; rows keep the spill order.
        per_relation = {r: Counter() for r in relations}
        writers = {split: pq.ParquetWriter(out / f"{split}.parquet", OUTPUT_SCHEMA,
                                           compression="zstd") for split in SPLITS}
        documents_with_examples = Counter()  # a document lies in one file: sum per file
        try:
            for spill in spills:
                table = pq.read_table(spill)
                table = table.filter(pc.is_in(table["relation"], value_set=kept_relations))
                labels = pc.cast(pc.index_in(table["relation"], value_set=kept_relations),
                                 pa.int64())
                table = table.append_column("label", labels)
                for split, mask in (("train", pc.invert(table["dev"])), ("dev", table["dev"])):
                    part = table.filter(mask).drop_columns(["dev"]).select(OUTPUT_SCHEMA.names)
                    if part.num_rows == 0:
                        continue
                    writers[split].write_table(part)
                    documents_with_examples[split] += len(part["docid"].unique())
                    for relation, count in zip(*_value_counts(part["relation"])):
                        per_relation[relation][split] += count
        finally:
            for writer in writers.values():
                writer.close()
        shutil.rmtree(spill_dir)

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
            "entity_mentions": sum(entity_counts.values()),
            "distinct_entities": len(entity_counts),
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
            "inputs": [file_fingerprint(p, full_hash=False) for p in paths],  # tens of GB: no hash
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
