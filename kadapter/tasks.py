"""Downstream tasks: readers of the real formats, model inputs, heads and decoding.

Five tasks, three kinds (KADAPTER.md section 4):
- entity typing, ``typing`` (OpenEntity, 9 types) and ``figer`` (FIGER, 113 types): a
  JSON list of ``{sent, start, end, labels}`` with character offsets (end exclusive).
  Input: the sentence with ``@`` around the mention; head: pooled mention -> one logit
  per type (sigmoid). OpenEntity predicts every type with logit > 0; FIGER always
  predicts the argmax type plus any other with logit > 0.
- relation classification, ``tacred``: a JSON list of ``{id, relation, token,
  subj_start, subj_end, obj_start, obj_end, ...}`` with inclusive token spans. Input:
  ``@`` around the subject, ``#`` around the object; head: concat(pooled subject,
  pooled object) -> 42 logits (softmax).
- multiple choice, ``csqa`` (CommonsenseQA JSONL, 5 choices; the test file has no
  ``answerKey``) and ``cosmosqa`` (CosmosQA JSONL ``context, question, answer0..3,
  label``): one sequence per choice, scored from ``<s>``, softmax over the choices.

Label ids are indices into a sorted label list, never file order. Mentions are pooled
as the mean of their sub-word states (``span``) or at the opening marker (``marker``,
the original code's choice). A sequence longer than ``max_length`` is cut to a window
that keeps every marker; an example whose markers cannot fit is returned as None so
the caller can count it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kadapter.io import InputError, read_json, read_jsonl
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


def _json_list(path: Path) -> list[Any]:
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


class _Record:
    """Typed access to one record's fields; every failure names file and record."""

    def __init__(self, path: Path, where: Any, record: Any):
        self.path, self.where = path, where
        if not isinstance(record, dict):
            self.fail(f"expected a JSON object, got {type(record).__name__}")
        self.record = record

    def fail(self, problem: str):
        raise InputError(self.path, self.where, problem)

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = True,
            record: dict | None = None) -> Any:
        source = self.record if record is None else record
        if key not in source:
            if required:
                self.fail(f"missing field {key!r}")
            return None
        value = source[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            self.fail(f"field {key!r} must be {names}, got {value!r}")
        return value

    def text(self, key: str, record: dict | None = None) -> str:
        value = self.get(key, str, record=record)
        if not value.strip():
            self.fail(f"field {key!r} is empty")
        return value

    def string_list(self, key: str) -> list[str]:
        values = self.get(key, list)
        if not all(isinstance(v, str) for v in values):
            self.fail(f"field {key!r} must be a list of strings")
        return values


def _check_labels(record: _Record, labels: Sequence[str], allowed: set[str] | None, what: str) -> None:
    if allowed is not None:
        unknown = sorted(set(labels) - allowed)
        if unknown:
            record.fail(f"unknown {what} {unknown}; expected one of the configured labels")


def read_typing(path: str | Path, allowed: Sequence[str] | None = None) -> list[TypingExample]:
    """OpenEntity / FIGER: a JSON list of ``{sent, start, end, labels}`` (ids: ``<stem>-<i>``)."""
    path = Path(path)
    allowed_set = set(allowed) if allowed is not None else None
    examples = []
    for index, raw in enumerate(_json_list(path)):
        record = _Record(path, index, raw)
        sent = record.text("sent")
        start, end = record.get("start", int), record.get("end", int)
        if not 0 <= start < end <= len(sent):
            record.fail(f"mention [{start}, {end}) is empty or outside a sentence of {len(sent)} characters")
        if not sent[start:end].strip():
            record.fail(f"mention [{start}, {end}) is only whitespace")
        labels = record.string_list("labels")
        _check_labels(record, labels, allowed_set, "type(s)")
        example_id = str(raw["id"]) if "id" in raw else f"{path.stem}-{index}"
        examples.append(TypingExample(example_id, sent, start, end, tuple(sorted(set(labels)))))
    return examples


def read_tacred(path: str | Path, allowed: Sequence[str] | None = TACRED_RELATIONS) -> list[RelationExample]:
    """TACRED: a JSON list of records with inclusive token spans of subject and object."""
    path = Path(path)
    allowed_set = set(allowed) if allowed is not None else None
    examples = []
    for index, raw in enumerate(_json_list(path)):
        record = _Record(path, index, raw)
        example_id = record.get("id", str)
        record.where = f"{index} (id {example_id})"
        relation = record.get("relation", str)
        _check_labels(record, [relation], allowed_set, "relation")
        tokens = record.string_list("token")
        if not tokens:
            record.fail("field 'token' is empty")
        spans = []
        for role in ("subj", "obj"):
            first, last = record.get(f"{role}_start", int), record.get(f"{role}_end", int)
            if not 0 <= first <= last < len(tokens):
                record.fail(f"{role} span [{first}, {last}] (inclusive) is outside {len(tokens)} tokens")
            spans.append((first, last))
        (s0, s1), (o0, o1) = spans
        if s0 <= o1 and o0 <= s1:
            record.fail(f"subject [{s0}, {s1}] and object [{o0}, {o1}] overlap")
        tokens = [PTB_ESCAPES.get(t, t) for t in tokens]
        examples.append(RelationExample(example_id, tuple(tokens), spans[0], spans[1], relation))
    return examples


def read_csqa(path: str | Path, allowed: Sequence[str] | None = None) -> list[ChoiceExample]:
    """CommonsenseQA JSONL ``{id, answerKey?, question: {stem, choices: [{label, text}]}}``."""
    path = Path(path)
    examples = []
    for number, raw in read_jsonl(path):
        record = _Record(path, f"line {number}", raw)
        example_id = record.get("id", str)
        record.where = f"line {number} (id {example_id})"
        question = record.get("question", dict)
        stem = record.text("stem", record=question)
        choices = record.get("choices", list, record=question)
        if len(choices) < 2:
            record.fail(f"expected at least 2 choices, got {len(choices)}")
        labels, texts = [], []
        for choice in choices:
            if not isinstance(choice, dict):
                record.fail("every choice must be an object with label and text")
            labels.append(record.text("label", record=choice))
            texts.append(record.text("text", record=choice))
        if len(set(labels)) != len(labels):
            record.fail(f"choice labels {labels} are not unique")
        if examples and len(labels) != len(examples[0].choices):
            record.fail(f"{len(labels)} choices, but the file's first record has {len(examples[0].choices)}")
        answer = record.get("answerKey", str, required=False)
        if answer is not None and answer not in labels:
            record.fail(f"answerKey {answer!r} is not one of the choice labels {labels}")
        examples.append(ChoiceExample(example_id, None, stem, tuple(texts), tuple(labels), answer))
    return examples


COSMOS_CHOICES = ("0", "1", "2", "3")


def read_cosmosqa(path: str | Path, allowed: Sequence[str] | None = None) -> list[ChoiceExample]:
    """CosmosQA JSONL ``{id?, context, question, answer0..answer3, label?}``."""
    path = Path(path)
    examples = []
    for number, raw in read_jsonl(path):
        record = _Record(path, f"line {number}", raw)
        example_id = str(raw.get("id", f"{path.stem}-{number}"))
        context, question = record.text("context"), record.text("question")
        answers = tuple(record.get(f"answer{i}", str) for i in range(len(COSMOS_CHOICES)))
        label = record.get("label", (int, str), required=False)
        if label is not None:
            label = str(label).strip()
            if label not in COSMOS_CHOICES:
                record.fail(f"label {raw['label']!r} is not one of 0, 1, 2, 3")
        examples.append(ChoiceExample(example_id, context, question, answers, COSMOS_CHOICES, label))
    return examples


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
    """Pool ``n_mentions`` mentions, concatenate, dropout, linear -> ``num_labels`` logits."""

    def __init__(self, hidden_size: int, num_labels: int, n_mentions: int, dropout: float,
                 pooling: Literal["entity", "marker"]):
        super().__init__()
        self.pooling = pooling
        self.n_mentions = n_mentions
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(n_mentions * hidden_size, num_labels)

    def forward(self, features: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = [
            pool(features, batch["span_start"][:, k], batch["span_end"][:, k], batch["marker"][:, k],
                 self.pooling)
            for k in range(self.n_mentions)
        ]
        return self.out(self.dropout(torch.cat(pooled, dim=-1)))


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

    @abstractmethod
    def label_space(self, examples: list[Any], configured: list[str] | None) -> list[str]:
        raise NotImplementedError

    @abstractmethod
    def encode(self, examples: list[Any], tokenizer, labels: list[str], max_length: int) -> Encoded:
        raise NotImplementedError

    @abstractmethod
    def head(self, hidden_size: int, num_labels: int, dropout: float, pooling: str) -> nn.Module:
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

    def head(self, hidden_size, num_labels, dropout, pooling):
        return MentionHead(hidden_size, num_labels, 1, dropout, pooling)

    def loss(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def gold(self, example):
        return list(example.labels)

    def decode(self, logits, labels, example):
        chosen = set((logits > 0).nonzero().flatten().tolist())
        if self.always_argmax:
            chosen.add(int(logits.argmax()))
        return [labels[i] for i in sorted(chosen)]

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

    def head(self, hidden_size, num_labels, dropout, pooling):
        return MentionHead(hidden_size, num_labels, 2, dropout, pooling)

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

    def __init__(self, name: str, files: tuple[str, str, str], reader):
        self.name, self.metric, self.files, self.reader = name, "accuracy", files, reader

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

    def head(self, hidden_size, num_labels, dropout, pooling):
        return ChoiceHead(hidden_size, dropout)

    def loss(self, logits, targets):
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)

    def gold(self, example):
        return example.answer

    def decode(self, logits, labels, example):
        return example.choice_labels[int(logits.argmax())]


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
                                "test_rand_split_no_answers.jsonl"), read_csqa),
    "cosmosqa": ChoiceTask("cosmosqa", ("train.jsonl", "valid.jsonl", "test.jsonl"), read_cosmosqa),
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
