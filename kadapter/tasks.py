"""Downstream tasks: readers of the real formats, model inputs, heads and decoding.

Five tasks, three kinds (KADAPTER.md section 4):
- entity typing, ``typing`` (OpenEntity, 9 types) and ``figer`` (FIGER, 113 types): a
  JSON list of ``{sent, start, end, labels}`` with character offsets (end exclusive).
  Input: the sentence with ``@`` around the mention; head: pooled mention -> one logit
  per type (sigmoid). OpenEntity predicts every type with logit > 0; FIGER predicts
  every type whose logit is > 0 or equal to the maximum, so all types tied at the top
  are kept (the original's rule, ``accuracy`` in run_finetune_figer_adapter.py).
- relation classification, ``tacred``: a JSON list of ``{id, relation, token,
  subj_start, subj_end, obj_start, obj_end, ...}`` with inclusive token spans. Input:
  ``@`` around the subject, ``#`` around the object; head: concat(pooled subject,
  pooled object) -> 42 logits (softmax).
- multiple choice, ``csqa`` (CommonsenseQA JSONL, 5 choices; the test file has no
  ``answerKey``) and ``cosmosqa`` (CosmosQA's release CSV ``id, context, question,
  answer0..3, label``, or its leaderboard JSONL with the labels in ``*-labels.lst``):
  one sequence per choice, scored from ``<s>``, softmax over the choices.

A bad record (a span out of range or empty, overlapping subject and object, an unknown
label, a missing field...) is a BadRecord naming file and record; a reader given a
SkippedRecords (``on_error: skip``) counts it by reason and reads on instead.

Label ids are indices into a sorted label list, never file order. Mentions are pooled
as the mean of their sub-word states (``span``) or at the opening marker (``marker``,
the original code's choice). A sequence longer than ``max_length`` is cut to a window
that keeps every marker; an example whose markers cannot fit is returned as None so
the caller can count it.
"""

from __future__ import annotations

import csv
import io
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import torch
import torch.nn.functional as F
from torch import nn

from kadapter.io import InputError, jsonl_lines, read_json
from kadapter.spans import MarkedText, gather_positions, mark_spans, span_mean, token_span

OPENENTITY_TYPES = sorted(
    ["entity", "location", "time", "organization", "object", "event", "place", "person", "group"]
)
TACRED_RELATIONS = sorted([
    "no_relation", "org:alternate_names", "org:city_of_headquarters", "org:country_of_headquarters",
    "org:dissolved", "org:founded", "org:founded_by", "org:member_of", "org:members",
    "org:number_of_employees/members", "org:parents", "org:political/religious_affiliation",
    "org:shareholders", "org:stateorprovince_of_headquarters", "org:subsidiaries",
    "org:top_members/employees", "org:website", "per:age", "per:alternate_names", "per:cause_of_death",
    "per:charges", "per:children", "per:cities_of_residence", "per:city_of_birth", "per:city_of_death",
    "per:countries_of_residence", "per:country_of_birth", "per:country_of_death", "per:date_of_birth",
    "per:date_of_death", "per:employee_of", "per:origin", "per:other_family", "per:parents",
    "per:religion", "per:schools_attended", "per:siblings", "per:spouse", "per:stateorprovince_of_birth",
    "per:stateorprovince_of_death", "per:stateorprovinces_of_residence", "per:title",
])
# TACRED's tokens are PTB-escaped; the encoder should see the characters.
PTB_ESCAPES = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}"}
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class TypingExample:
    id: str
    text: str
    start: int
    """Character offset of the mention's first character."""
    end: int
    """Character offset just past the mention."""
    labels: tuple[str, ...]


@dataclass(frozen=True)
class RelationExample:
    id: str
    tokens: tuple[str, ...]
    subj: tuple[int, int]
    """Inclusive token span of the subject."""
    obj: tuple[int, int]
    """Inclusive token span of the object."""
    relation: str


@dataclass(frozen=True)
class ChoiceExample:
    id: str
    context: str | None
    """CosmosQA's passage; None for CommonsenseQA."""
    question: str
    choices: tuple[str, ...]
    choice_labels: tuple[str, ...]
    answer: str | None
    """The correct choice's label; None in an unlabelled test file."""


# ----------------------------------------------------------------------------- readers

SKIP_LOCATIONS_KEPT = 20
"""How many bad records ``on_error: skip`` lists by location (all are counted)."""


class BadRecord(InputError):
    """One record a reader rejects; ``reason`` names the kind of problem, the key under
    which ``on_error: skip`` counts it."""

    def __init__(self, path: str | Path, record: Any, problem: str, reason: str):
        super().__init__(path, record, problem)
        self.reason = reason


class SkippedRecords:
    """The bad records skipped under ``on_error: skip``: a count per reason and the first
    SKIP_LOCATIONS_KEPT locations (file, record, reason, problem), in reading order."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.by_file: Counter[str] = Counter()
        self.first: list[dict[str, Any]] = []

    def add(self, error: BadRecord) -> None:
        self.by_reason[error.reason] += 1
        self.by_file[error.path] += 1
        if len(self.first) < SKIP_LOCATIONS_KEPT:
            self.first.append({"file": error.path, "record": error.record, "reason": error.reason,
                               "problem": error.problem})

    def total(self) -> int:
        return sum(self.by_reason.values())

    def summary(self) -> dict[str, Any]:
        return {"total": self.total(), "by_reason": dict(sorted(self.by_reason.items())),
                "by_file": dict(sorted(self.by_file.items())), "first": self.first}


def _collect(records: Iterable[tuple[Any, Any]], parse: Callable[[Any, Any], Any],
             skipped: SkippedRecords | None) -> list[Any]:
    """parse(where, raw) for every record; a BadRecord is raised (``skipped`` None) or
    counted and the record left out."""
    examples = []
    for where, raw in records:
        try:
            if isinstance(raw, BadRecord):
                raise raw
            examples.append(parse(where, raw))
        except BadRecord as error:
            if skipped is None:
                raise
            skipped.add(error)
    return examples


def _json_list(path: Path) -> list[tuple[int, Any]]:
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    return list(enumerate(data))


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; a line that is not JSON comes as a
    BadRecord, so that ``on_error: skip`` can count it and read on."""
    for number, line in jsonl_lines(path):
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError as err:
            yield number, BadRecord(path, f"line {number}", f"not valid JSON: {err}", "invalid_json")


class _Record:
    """Typed access to one record's fields; every failure names file and record."""

    def __init__(self, path: Path, where: Any, record: Any):
        self.path, self.where = path, where
        if not isinstance(record, dict):
            self.fail(f"expected a JSON object, got {type(record).__name__}", "not_an_object")
        self.record = record

    def fail(self, problem: str, reason: str):
        raise BadRecord(self.path, self.where, problem, reason)

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = True,
            record: dict | None = None) -> Any:
        source = self.record if record is None else record
        if key not in source:
            if required:
                self.fail(f"missing field {key!r}", "missing_field")
            return None
        value = source[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            self.fail(f"field {key!r} must be {names}, got {value!r}", "wrong_type")
        return value

    def text(self, key: str, record: dict | None = None) -> str:
        value = self.get(key, str, record=record)
        if not value.strip():
            self.fail(f"field {key!r} is empty", "empty_field")
        return value

    def string_list(self, key: str) -> list[str]:
        values = self.get(key, list)
        if not all(isinstance(v, str) for v in values):
            self.fail(f"field {key!r} must be a list of strings", "wrong_type")
        return values


def _check_labels(record: _Record, labels: Sequence[str], allowed: set[str] | None, what: str) -> None:
    if allowed is not None:
        unknown = sorted(set(labels) - allowed)
        if unknown:
            record.fail(f"unknown {what} {unknown}; expected one of the configured labels", "unknown_label")


def read_typing(path: str | Path, allowed: Sequence[str] | None = None,
                skipped: SkippedRecords | None = None) -> list[TypingExample]:
    """OpenEntity / FIGER: a JSON list of ``{sent, start, end, labels}`` (ids: ``<stem>-<i>``).
    A bad record raises a BadRecord, or is counted in ``skipped`` when one is given."""
    path = Path(path)
    allowed_set = set(allowed) if allowed is not None else None

    def parse(index: int, raw: Any) -> TypingExample:
        record = _Record(path, index, raw)
        sent = record.text("sent")
        start, end = record.get("start", int), record.get("end", int)
        if not 0 <= start < end <= len(sent):
            record.fail(f"mention [{start}, {end}) is empty or outside a sentence of {len(sent)} characters",
                        "empty_span" if start >= end else "span_out_of_range")
        if not sent[start:end].strip():
            record.fail(f"mention [{start}, {end}) is only whitespace", "empty_span")
        labels = record.string_list("labels")
        _check_labels(record, labels, allowed_set, "type(s)")
        example_id = str(raw["id"]) if "id" in raw else f"{path.stem}-{index}"
        return TypingExample(example_id, sent, start, end, tuple(sorted(set(labels))))

    return _collect(_json_list(path), parse, skipped)


def read_tacred(path: str | Path, allowed: Sequence[str] | None = TACRED_RELATIONS,
                skipped: SkippedRecords | None = None) -> list[RelationExample]:
    """TACRED: a JSON list of records with inclusive token spans of subject and object."""
    path = Path(path)
    allowed_set = set(allowed) if allowed is not None else None

    def parse(index: int, raw: Any) -> RelationExample:
        record = _Record(path, index, raw)
        example_id = record.get("id", str)
        record.where = f"{index} (id {example_id})"
        relation = record.get("relation", str)
        _check_labels(record, [relation], allowed_set, "relation")
        tokens = record.string_list("token")
        if not tokens:
            record.fail("field 'token' is empty", "empty_field")
        spans = []
        for role in ("subj", "obj"):
            first, last = record.get(f"{role}_start", int), record.get(f"{role}_end", int)
            if not 0 <= first <= last < len(tokens):
                record.fail(f"{role} span [{first}, {last}] (inclusive) is outside {len(tokens)} tokens",
                            "empty_span" if first > last else "span_out_of_range")
            spans.append((first, last))
        (s0, s1), (o0, o1) = spans
        if s0 <= o1 and o0 <= s1:
            record.fail(f"subject [{s0}, {s1}] and object [{o0}, {o1}] overlap", "overlapping_spans")
        tokens = [PTB_ESCAPES.get(t, t) for t in tokens]
        return RelationExample(example_id, tuple(tokens), spans[0], spans[1], relation)

    return _collect(_json_list(path), parse, skipped)


def read_csqa(path: str | Path, allowed: Sequence[str] | None = None,
              skipped: SkippedRecords | None = None) -> list[ChoiceExample]:
    """CommonsenseQA JSONL ``{id, answerKey?, question: {stem, choices: [{label, text}]}}``."""
    path = Path(path)
    choice_count: list[int] = []  # the first good record's, which every other must match

    def parse(number: int, raw: Any) -> ChoiceExample:
        record = _Record(path, f"line {number}", raw)
        example_id = record.get("id", str)
        record.where = f"line {number} (id {example_id})"
        question = record.get("question", dict)
        stem = record.text("stem", record=question)
        choices = record.get("choices", list, record=question)
        if len(choices) < 2:
            record.fail(f"expected at least 2 choices, got {len(choices)}", "too_few_choices")
        labels, texts = [], []
        for choice in choices:
            if not isinstance(choice, dict):
                record.fail("every choice must be an object with label and text", "wrong_type")
            labels.append(record.text("label", record=choice))
            texts.append(record.text("text", record=choice))
        if len(set(labels)) != len(labels):
            record.fail(f"choice labels {labels} are not unique", "duplicate_choice_labels")
        if choice_count and len(labels) != choice_count[0]:
            record.fail(f"{len(labels)} choices, but the file's first record has {choice_count[0]}",
                        "choice_count_mismatch")
        answer = record.get("answerKey", str, required=False)
        if answer is not None and answer not in labels:
            record.fail(f"answerKey {answer!r} is not one of the choice labels {labels}", "unknown_label")
        choice_count[:] = [len(labels)]
        return ChoiceExample(example_id, None, stem, tuple(texts), tuple(labels), answer)

    return _collect(_jsonl(path), parse, skipped)


COSMOS_CHOICES = ("0", "1", "2", "3")
COSMOS_FIELDS = ("id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label")


def cosmos_labels_file(path: Path) -> Path:
    """The leaderboard layout keeps ``valid.jsonl``'s labels in ``valid-labels.lst``."""
    return path.with_name(f"{path.stem}-labels.lst")


def _cosmos_csv(path: Path) -> list[tuple[str, Any]]:
    """The release's CSV: a header naming COSMOS_FIELDS (label may be absent), then one
    row per example (fields may hold quoted newlines); records are ``row N`` (1 = the
    first after the header)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, None, f"cannot read as UTF-8 CSV: {err}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    missing = [f for f in COSMOS_FIELDS if f != "label" and f not in (header or [])]
    if missing:
        raise InputError(path, None, f"CSV header {header} lacks {missing}; expected {list(COSMOS_FIELDS)}")
    rows = []
    for number, row in enumerate(reader, start=1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            rows.append((f"row {number}", BadRecord(path, f"row {number}", f"{len(row)} fields, the header has "
                                                    f"{len(header)}", "wrong_field_count")))
            continue
        record = dict(zip(header, row))
        if not record.get("label", "").strip():
            record.pop("label", None)  # an unlabelled row (a test file)
        rows.append((f"row {number}", record))
    return rows


def _cosmos_leaderboard_labels(path: Path, count: int) -> list[str] | None:
    """The labels of the leaderboard layout (one per line, in record order), or None."""
    labels_path = cosmos_labels_file(path)
    if not labels_path.is_file():
        return None
    labels = [line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != count:
        raise InputError(labels_path, None, f"{len(labels)} labels for the {count} records of {path.name}")
    return labels


def read_cosmosqa(path: str | Path, allowed: Sequence[str] | None = None,
                  skipped: SkippedRecords | None = None) -> list[ChoiceExample]:
    """CosmosQA in any of its layouts:

    - the release's CSV (``train.csv``, ``valid.csv``): ``id, context, question,
      answer0..answer3, label``;
    - the leaderboard's JSONL (``train.jsonl``...) without labels, which are in
      ``<stem>-labels.lst`` beside it, one per line in record order;
    - JSONL with the label in each record (the original code's input).
    A label is 0-3 (int or digit string); a record without one is unlabelled.
    """
    path = Path(path)
    if path.suffix == ".csv":
        records = _cosmos_csv(path)
        listed: list[str | None] = [None] * len(records)
    else:
        records = [(f"line {number}", raw) for number, raw in _jsonl(path)]
        listed = _cosmos_leaderboard_labels(path, len(records)) or [None] * len(records)
    lst_label = {where: label for (where, _), label in zip(records, listed)}

    def parse(where: str, raw: Any) -> ChoiceExample:
        record = _Record(path, where, raw)
        example_id = str(raw["id"]) if "id" in raw else f"{path.stem}-{where.split()[-1]}"
        context, question = record.text("context"), record.text("question")
        answers = tuple(record.get(f"answer{i}", str) for i in range(len(COSMOS_CHOICES)))
        label = record.get("label", (int, str), required=False)
        listed = lst_label[where]
        if label is not None and listed is not None and str(label).strip() != listed:
            record.fail(f"label {label!r} differs from {listed!r} in {cosmos_labels_file(path).name}",
                        "conflicting_labels")
        label = listed if listed is not None else label
        if label is not None:
            label = str(label).strip()
            if label not in COSMOS_CHOICES:
                record.fail(f"label {label!r} is not one of 0, 1, 2, 3", "unknown_label")
        return ChoiceExample(example_id, context, question, answers, COSMOS_CHOICES, label)

    return _collect(records, parse, skipped)


# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class MarkedInput:
    input_ids: list[int]
    spans: list[tuple[int, int]]
    """Token span [start, end) of each mention (markers excluded) inside input_ids."""
    markers: list[int]
    """Position of each mention's opening marker inside input_ids."""


def encode_marked(tokenizer, texts: Sequence[str], spans: Sequence[list[tuple[int, int, str]]],
                  max_length: int) -> list[MarkedInput | None]:
    """Mark each text's character spans, tokenize (in one batch) and cut to ``max_length``.

    The window around the markers keeps them all and centres them in what is left;
    None when the markers alone span more than ``max_length`` minus the special tokens.
    """
    if not texts:  # the tokenizer fails on an empty batch
        return []
    marked = [mark_spans(text, text_spans) for text, text_spans in zip(texts, spans)]
    encoded = tokenizer([m.text for m in marked], return_offsets_mapping=True,
                        return_special_tokens_mask=True)
    return [
        _window(encoded["input_ids"][i], encoded["offset_mapping"][i],
                encoded["special_tokens_mask"][i], mark, [marker for *_, marker in text_spans],
                max_length)
        for i, (mark, text_spans) in enumerate(zip(marked, spans))
    ]


def _window(ids: list[int], offsets: list[tuple[int, int]], special: list[int], mark: MarkedText,
            markers: list[str], max_length: int) -> MarkedInput | None:
    content = [j for j, is_special in enumerate(special) if not is_special]
    first, last = content[0], content[-1] + 1
    prefix, body, suffix = ids[:first], ids[first:last], ids[last:]
    body_offsets = offsets[first:last]

    def locate(start: int, end: int) -> tuple[int, int]:
        found = token_span(body_offsets, start, end)
        if found is None:
            raise ValueError(f"no token covers characters [{start}, {end}) of {mark.text!r}")
        return found

    mentions = [locate(s, e) for s, e in mark.mentions]
    openings = [locate(s, e)[0] for s, e in mark.markers]
    closings = [locate(e + 1, e + 1 + len(marker))[1] for (_, e), marker in zip(mark.mentions, markers)]
    low, high = min(openings), max(closings)
    budget = max_length - len(prefix) - len(suffix)
    if high - low > budget:
        return None
    start = low - (budget - (high - low)) // 2
    start = max(0, min(start, len(body) - budget))
    shift = len(prefix) - start
    return MarkedInput(
        prefix + body[start:start + budget] + suffix,
        [(a + shift, b + shift) for a, b in mentions],
        [m + shift for m in openings],
    )


def relation_text(example: RelationExample) -> tuple[str, list[tuple[int, int, str]]]:
    """Tokens joined by spaces, with the character spans of subject (``@``) and object (``#``)."""
    starts, position = [], 0
    for token in example.tokens:
        starts.append(position)
        position += len(token) + 1
    text = " ".join(example.tokens)

    def chars(span: tuple[int, int]) -> tuple[int, int]:
        return starts[span[0]], starts[span[1]] + len(example.tokens[span[1]])

    return text, [(*chars(example.subj), "@"), (*chars(example.obj), "#")]


# ------------------------------------------------------------------------------- heads


def pool(features: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, markers: torch.Tensor,
         mode: Literal["entity", "marker"]) -> torch.Tensor:
    """(B, T, H) -> (B, H): mean over the mention's sub-words, or the opening marker's state."""
    return span_mean(features, starts, ends) if mode == "entity" else gather_positions(features, markers)


class MentionHead(nn.Module):
    """Pool ``n_mentions`` mentions, concatenate -> ``num_labels`` logits.

    ``classifier``: ``linear`` (ours) is dropout -> one linear layer; ``original`` is the
    original's ``dense`` (n_mentions*H -> H) -> dropout -> ``out_proj`` (H -> labels), with
    no nonlinearity between the two layers (run_finetune_{openentity,figer,TACRED}_adapter.py).
    """

    def __init__(self, hidden_size: int, num_labels: int, n_mentions: int, dropout: float,
                 pooling: Literal["entity", "marker"],
                 classifier: Literal["linear", "original"] = "linear"):
        super().__init__()
        self.pooling = pooling
        self.n_mentions = n_mentions
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier
        if classifier == "original":
            self.dense = nn.Linear(n_mentions * hidden_size, hidden_size)
            self.out_proj = nn.Linear(hidden_size, num_labels)
        elif classifier == "linear":
            self.out = nn.Linear(n_mentions * hidden_size, num_labels)
        else:
            raise ValueError(f"classifier must be linear or original, got {classifier!r}")

    def forward(self, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [
            pool(features, batch["span_start"][:, k], batch["span_end"][:, k], batch["marker"][:, k],
                 self.pooling)
            for k in range(self.n_mentions)
        ]
        features = torch.cat(pooled, dim=-1)
        if self.classifier == "original":
            return self.out_proj(self.dropout(self.dense(features)))
        return self.out(self.dropout(features))


class ChoiceHead(nn.Module):
    """Score each choice's sequence from its first token (``<s>``): (B*C, T, H) -> (B, C)."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = self.out(self.dropout(features[:, 0])).squeeze(-1)
        return scores.view(batch["labels"].shape[0], -1)


# ------------------------------------------------------------------------------- tasks


@dataclass
class Encoded:
    """A split ready for the model: one feature dict per example that fits, and the
    examples that could not be represented within ``max_length`` (counted, reported)."""

    features: Sequence[dict[str, Any]]
    """A list of feature dicts, or the feature cache's mapped features."""
    examples: list[Any]
    """The examples behind ``features``, same order."""
    too_long: list[Any]
    source: list[Any]
    """Every example of the split, in file order."""


class Task(ABC):
    """What the fine-tuning driver needs to know about one task."""

    name: str
    kind: str
    metric: str
    files: tuple[str, str, str]
    """Upstream file names of train, dev, test inside the task's data directory."""
    reader: Callable[..., list[Any]]
    default_labels: list[str] | None = None
    label_source: str = "labels are a field of each record"
    """Where a split's labels come from (for the error when a labelled split has none)."""
    other_layouts: tuple[tuple[str, str, str], ...] = ()
    """Other upstream layouts (train, dev, test names), tried in order before ``files``:
    a split's file is the first of these that exists in the data directory."""

    def default_files(self, data_dir: str | Path) -> tuple[str, str, str]:
        """Per split, the first layout's name that exists in ``data_dir`` (else ``files``')."""
        layouts = [*self.other_layouts, self.files]
        return tuple(next((layout[i] for layout in layouts if (Path(data_dir) / layout[i]).is_file()),
                          self.files[i]) for i in range(3))

    def check_labelled(self, examples: list[Any], path: Path, purpose: str) -> None:
        """A split used to train on or select the model with must be labelled (the readers
        of entity typing and TACRED already require labels)."""
        unlabelled = sum(self.gold(e) is None for e in examples)
        if unlabelled:
            raise InputError(path, None, f"{unlabelled} of {len(examples)} records have no label, "
                                         f"but this file is used to {purpose} ({self.label_source})")

    def count_longer(self, examples: list[Any], tokenizer, max_length: int) -> int:
        """Examples whose marked input is longer than ``max_length`` tokens (cut to a
        window, or too long even for that); 0 for tasks without marked inputs."""
        return 0

    @abstractmethod
    def label_space(self, examples: list[Any], configured: list[str] | None) -> list[str]:
        raise NotImplementedError

    @abstractmethod
    def encode(self, examples: list[Any], tokenizer, labels: list[str], max_length: int) -> Encoded:
        raise NotImplementedError

    @abstractmethod
    def head(self, hidden_size: int, num_labels: int, dropout: float, pooling: str,
             classifier: str = "linear") -> nn.Module:
        raise NotImplementedError

    @abstractmethod
    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @abstractmethod
    def gold(self, example: Any) -> Any:
        raise NotImplementedError

    @abstractmethod
    def decode(self, logits: torch.Tensor, labels: list[str], example: Any) -> Any:
        raise NotImplementedError

    def fallback(self, labels: list[str], example: Any) -> Any:
        """The prediction for an example too long to encode (scored as such); only tasks
        whose ``encode`` can report ``too_long`` examples define it."""
        raise NotImplementedError


class TypingTask(Task):
    kind = "typing"

    def __init__(self, name: str, metric: str, always_argmax: bool, default_labels: list[str] | None):
        self.name, self.metric, self.always_argmax = name, metric, always_argmax
        self.files = ("train.json", "dev.json", "test.json")
        self.reader = read_typing
        self.default_labels = default_labels

    def label_space(self, examples, configured):
        return sorted(configured) if configured is not None else sorted(
            {label for example in examples for label in example.labels})

    def encode(self, examples, tokenizer, labels, max_length):
        inputs = encode_marked(tokenizer, [e.text for e in examples],
                               [[(e.start, e.end, "@")] for e in examples], max_length)
        targets = [[float(label in e.labels) for label in labels] for e in examples]  # multi-hot
        return _mention_split(examples, inputs, targets)

    def head(self, hidden_size, num_labels, dropout, pooling, classifier="linear"):
        return MentionHead(hidden_size, num_labels, 1, dropout, pooling, classifier)

    def count_longer(self, examples, tokenizer, max_length):
        return _count_longer(tokenizer, [e.text for e in examples],
                                [[(e.start, e.end, "@")] for e in examples], max_length)

    def loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def gold(self, example):
        return list(example.labels)

    def decode(self, logits, labels, example):
        chosen = logits > 0
        if self.always_argmax:  # every type tied at the maximum, as the original
            chosen |= logits == logits.max()
        return [labels[i] for i in chosen.nonzero().flatten().tolist()]

    def fallback(self, labels, example):
        return []


class RelationTask(Task):
    kind = "relation"

    def __init__(self):
        self.name, self.metric = "tacred", "tacred"
        self.files = ("train.json", "dev.json", "test.json")
        self.reader = read_tacred
        self.default_labels = TACRED_RELATIONS

    def label_space(self, examples, configured):
        return sorted(configured if configured is not None else {e.relation for e in examples})

    def encode(self, examples, tokenizer, labels, max_length):
        index = {label: i for i, label in enumerate(labels)}
        texts, spans = zip(*(relation_text(e) for e in examples)) if examples else ((), ())
        inputs = encode_marked(tokenizer, list(texts), list(spans), max_length)
        return _mention_split(examples, inputs, [index[e.relation] for e in examples])

    def head(self, hidden_size, num_labels, dropout, pooling, classifier="linear"):
        return MentionHead(hidden_size, num_labels, 2, dropout, pooling, classifier)

    def count_longer(self, examples, tokenizer, max_length):
        texts, spans = zip(*(relation_text(e) for e in examples)) if examples else ((), ())
        return _count_longer(tokenizer, list(texts), list(spans), max_length)

    def loss(self, logits, targets):
        return F.cross_entropy(logits.float(), targets)

    def gold(self, example):
        return example.relation

    def decode(self, logits, labels, example):
        return labels[int(logits.argmax())]

    def fallback(self, labels, example):
        return "no_relation"


class ChoiceTask(Task):
    kind = "choice"

    def __init__(self, name: str, files: tuple[str, str, str], reader, label_source: str,
                 other_layouts: tuple[tuple[str, str, str], ...] = ()):
        self.name, self.metric, self.files, self.reader = name, "accuracy", files, reader
        self.label_source, self.other_layouts = label_source, other_layouts

    def label_space(self, examples, configured):
        return []  # the answer is a position among each example's own choices

    def encode(self, examples, tokenizer, labels, max_length):
        if not examples:  # the tokenizer fails on an empty batch
            return Encoded([], [], [], [])
        firsts, seconds = [], []
        for example in examples:
            for choice in example.choices:
                if example.context is None:  # CommonsenseQA: <s> question </s></s> choice </s>
                    firsts.append(example.question)
                    seconds.append(choice)
                else:  # CosmosQA: <s> context </s></s> question </s> answer </s>
                    firsts.append(example.context)
                    seconds.append(f"{example.question} {tokenizer.sep_token} {choice}")
        ids = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)["input_ids"]
        encoded = Encoded([], [], [], list(examples))
        cursor = 0
        for example in examples:
            n = len(example.choices)
            answer = example.choice_labels.index(example.answer) if example.answer is not None else IGNORE_INDEX
            choices = ids[cursor:cursor + n]
            encoded.features.append({"input_ids": [t for c in choices for t in c],
                                     "choice_lengths": [len(c) for c in choices], "labels": answer})
            encoded.examples.append(example)
            cursor += n
        return encoded

    def head(self, hidden_size, num_labels, dropout, pooling, classifier="linear"):
        return ChoiceHead(hidden_size, dropout)  # the original's head too: dropout -> linear

    def loss(self, logits, targets):
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)

    def gold(self, example):
        return example.answer

    def decode(self, logits, labels, example):
        return example.choice_labels[int(logits.argmax())]


def _count_longer(tokenizer, texts: list[str], spans: list[list[tuple[int, int, str]]],
                  max_length: int) -> int:
    """How many marked texts are longer than ``max_length`` tokens."""
    whole = encode_marked(tokenizer, texts, spans, max_length=1 << 30)
    return sum(item is not None and len(item.input_ids) > max_length for item in whole)


def _mention_split(examples: list[Any], inputs: list[MarkedInput | None],
                   targets: list[Any]) -> Encoded:
    """A mention task's split: one feature per example whose markers fit, the others
    kept as too long."""
    encoded = Encoded([], [], [], list(examples))
    for example, item, target in zip(examples, inputs, targets, strict=True):
        if item is None:
            encoded.too_long.append(example)
            continue
        encoded.features.append({
            "input_ids": item.input_ids,
            "span_start": [s for s, _ in item.spans],
            "span_end": [e for _, e in item.spans],
            "marker": item.markers,
            "labels": target,
        })
        encoded.examples.append(example)
    return encoded


TASKS: dict[str, Task] = {
    "typing": TypingTask("typing", "openentity", always_argmax=False, default_labels=OPENENTITY_TYPES),
    "figer": TypingTask("figer", "figer", always_argmax=True, default_labels=None),
    "csqa": ChoiceTask("csqa", ("train_rand_split.jsonl", "dev_rand_split.jsonl",
                                "test_rand_split_no_answers.jsonl"), read_csqa,
                       label_source="labels are each record's answerKey"),
    # the release's CSV first, else the leaderboard's (or the original code's) JSONL
    "cosmosqa": ChoiceTask("cosmosqa", ("train.jsonl", "valid.jsonl", "test.jsonl"), read_cosmosqa,
                           label_source="labels are the CSV's label column, each JSONL record's "
                                        "label, or the leaderboard layout's <name>-labels.lst beside it",
                           other_layouts=(("train.csv", "valid.csv", "test.jsonl"),)),
    "tacred": RelationTask(),
}


def collate(features: list[dict[str, Any]], pad_token_id: int,
            num_labels: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of features into a batch. A multiple-choice feature holds its choices'
    token ids back to back (``choice_lengths`` cuts them): the batch has (B*C, T)
    input_ids and (B,) labels. A typing feature from the feature cache holds its
    ``label_ids``: the (B, num_labels) multi-hot labels are built here, per batch."""
    if "choice_lengths" in features[0]:
        sequences = []
        for feature in features:
            cuts = np.cumsum([0, *feature["choice_lengths"]])
            sequences += [feature["input_ids"][a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    else:
        sequences = [f["input_ids"] for f in features]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in ("span_start", "span_end", "marker"):
        if key in features[0]:
            batch[key] = torch.as_tensor(np.asarray([f[key] for f in features]), dtype=torch.long)
    if "label_ids" in features[0]:
        if num_labels is None:
            raise ValueError("typing features with label_ids need num_labels")
        multi_hot = torch.zeros((len(features), num_labels))
        for row, feature in enumerate(features):
            multi_hot[row, torch.from_numpy(np.asarray(feature["label_ids"], dtype=np.int64))] = 1.0
        batch["labels"] = multi_hot
        return batch
    labels = [f["labels"] for f in features]
    batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], list) else torch.long)
    return batch
