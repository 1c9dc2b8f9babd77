"""Downstream readers (real formats, malformed records), marked inputs, heads' decoding."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kadapter.io import InputError
from kadapter.tasks import (
    OPENENTITY_TYPES,
    TACRED_RELATIONS,
    TASKS,
    RelationExample,
    TypingExample,
    collate,
    encode_marked,
    read_cosmosqa,
    read_csqa,
    read_tacred,
    read_typing,
    relation_text,
)

SAMPLE = {"typing": "data/sample/openentity", "figer": "data/sample/figer",
          "csqa": "data/sample/csqa", "cosmosqa": "data/sample/cosmosqa", "tacred": "data/sample/tacred"}


@pytest.fixture(scope="module")
def word_tokenizer():
    """A fixed whitespace word-level tokenizer with [CLS] ... [SEP]: sub-words are words."""
    words = "Ada met Bob in Paris today . @ # ( ) AL founded Acme".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


@pytest.mark.parametrize("task", sorted(SAMPLE))
def test_sample_files_load_in_the_real_format(repo_root, task):
    spec = TASKS[task]
    counts = {}
    for name in spec.files:
        examples = spec.reader(repo_root / SAMPLE[task] / name, spec.default_labels)
        assert examples, name
        assert len({e.id for e in examples}) == len(examples), f"{name}: ids not unique"
        counts[name] = len(examples)
    if spec.kind == "choice":
        test = spec.reader(repo_root / SAMPLE[task] / spec.files[2])
        assert all(e.answer is None for e in test)  # upstream test files are unlabelled
        train = spec.reader(repo_root / SAMPLE[task] / spec.files[0])
        assert all(e.answer in e.choice_labels for e in train)
    assert counts[spec.files[0]] > counts[spec.files[1]]


def _example_key(example) -> tuple:
    """What makes two examples the same input: sentence and mention(s), or the question
    (and CosmosQA's context)."""
    if isinstance(example, TypingExample):
        return example.text, example.start, example.end
    if isinstance(example, RelationExample):
        return example.tokens, example.subj, example.obj
    return example.context, example.question


@pytest.mark.parametrize("task", sorted(SAMPLE))
def test_sample_splits_share_no_example(repo_root, task):
    """A dev or test example seen in training (or twice in one file) measures memory, not
    the task: the old CosmosQA and CommonsenseQA samples repeated most dev questions."""
    spec = TASKS[task]
    seen: set[tuple] = set()
    for name in spec.files:
        keys = [_example_key(e) for e in spec.reader(repo_root / SAMPLE[task] / name, spec.default_labels)]
        assert len(set(keys)) == len(keys), f"{name}: an example repeats"
        assert not seen & set(keys), f"{name}: examples of an earlier split"
        seen |= set(keys)


@pytest.mark.parametrize("task", ["csqa", "cosmosqa"])
def test_sample_choice_answers_need_the_question(repo_root, task):
    """No surface rule finds the answer: neither the longest answer nor the answer text most
    often right in training beats chance on dev, and no answer position dominates."""
    from collections import Counter

    spec = TASKS[task]
    train, dev = (spec.reader(repo_root / SAMPLE[task] / name) for name in spec.files[:2])
    chance = 1 / len(dev[0].choices)

    def right(e):
        return e.choice_labels.index(e.answer)

    wins = Counter(e.choices[right(e)] for e in train)
    rules = {"longest": lambda e: max(range(len(e.choices)), key=lambda i: len(e.choices[i])),
             "most often right": lambda e: max(range(len(e.choices)), key=lambda i: wins[e.choices[i]])}
    for rule, pick in rules.items():
        assert sum(pick(e) == right(e) for e in dev) / len(dev) <= chance + 0.05, rule
    assert Counter(map(right, train)).most_common(1)[0][1] / len(train) <= chance + 0.05


def test_sample_tacred_labels_and_spans(repo_root):
    examples = read_tacred(repo_root / SAMPLE["tacred"] / "train.json")
    relations = {e.relation for e in examples}
    assert "no_relation" in relations and relations <= set(TACRED_RELATIONS)
    assert len(TACRED_RELATIONS) == 42
    assert all("-LRB-" not in e.tokens for e in examples)  # PTB escapes are undone


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


GOOD_TYPING = {"sent": "Ada met Bob .", "start": 0, "end": 3, "labels": ["person"]}
GOOD_TACRED = {"id": "r1", "relation": "per:spouse", "token": ["Ada", "met", "Bob", "."],
               "subj_start": 0, "subj_end": 0, "obj_start": 2, "obj_end": 2,
               "subj_type": "PERSON", "obj_type": "PERSON"}
GOOD_CSQA = {"answerKey": "A", "id": "q1", "question": {"question_concept": "milk", "stem": "Where?",
             "choices": [{"label": "A", "text": "fridge"}, {"label": "B", "text": "bank"}]}}
GOOD_COSMOS = {"id": "c1", "context": "Ada ran .", "question": "Why ?", "answer0": "late",
               "answer1": "fun", "answer2": "fire", "answer3": "None of the above choices .", "label": 0}


def _jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


@pytest.mark.parametrize("reader, name, content, record, problem", [
    (read_typing, "train.json", {"sent": "x"}, None, "expected a JSON list"),
    (read_typing, "train.json", "[{", None, "not valid JSON"),
    (read_typing, "train.json", [GOOD_TYPING, "text"], "1", "expected a JSON object"),
    (read_typing, "train.json", [{**GOOD_TYPING, "sent": None}], "0", "field 'sent' must be str"),
    (read_typing, "train.json", [{"sent": "Ada", "start": 0, "labels": []}], "0", "missing field 'end'"),
    (read_typing, "train.json", [GOOD_TYPING, {**GOOD_TYPING, "end": 40}], "1", "outside a sentence of 13"),
    (read_typing, "train.json", [{**GOOD_TYPING, "start": 3, "end": 3}], "0", "is empty or outside"),
    (read_typing, "train.json", [{**GOOD_TYPING, "start": 3, "end": 4}], "0", "only whitespace"),
    (read_typing, "train.json", [{**GOOD_TYPING, "start": True}], "0", "must be int"),
    (read_typing, "train.json", [{**GOOD_TYPING, "labels": "person"}], "0", "must be list"),
    (read_typing, "train.json", [{**GOOD_TYPING, "labels": ["persn"]}], "0", "unknown type(s) ['persn']"),
    (read_tacred, "dev.json", [{**GOOD_TACRED, "obj_end": 4}], "0 (id r1)", "obj span [2, 4]"),
    (read_tacred, "dev.json", [{**GOOD_TACRED, "obj_start": 0, "obj_end": 1}], "0 (id r1)", "overlap"),
    (read_tacred, "dev.json", [{**GOOD_TACRED, "relation": "per:wife"}], "0 (id r1)", "unknown relation"),
    (read_tacred, "dev.json", [{**GOOD_TACRED, "token": "Ada met Bob"}], "0 (id r1)", "must be list"),
    (read_tacred, "dev.json", [{k: v for k, v in GOOD_TACRED.items() if k != "id"}], "0", "missing field 'id'"),
    (read_csqa, "dev_rand_split.jsonl", _jsonl(GOOD_CSQA, "{oops"), "line 2", "not valid JSON"),
    (read_csqa, "dev_rand_split.jsonl", _jsonl(GOOD_CSQA, {**GOOD_CSQA, "answerKey": "E"}),
     "line 2 (id q1)", "answerKey 'E' is not one of the choice labels"),
    (read_csqa, "dev_rand_split.jsonl", _jsonl({**GOOD_CSQA, "question": {
        **GOOD_CSQA["question"], "choices": GOOD_CSQA["question"]["choices"][:1]}}),
     "line 1 (id q1)", "at least 2 choices"),
    (read_csqa, "dev_rand_split.jsonl", _jsonl({**GOOD_CSQA, "question": {
        **GOOD_CSQA["question"], "choices": [{"label": "A", "text": "x"}, {"label": "A", "text": "y"}]}}),
     "line 1 (id q1)", "not unique"),
    (read_csqa, "dev_rand_split.jsonl", _jsonl(GOOD_CSQA, {**GOOD_CSQA, "question": {
        **GOOD_CSQA["question"], "choices": [*GOOD_CSQA["question"]["choices"], {"label": "C", "text": "z"}]}}),
     "line 2 (id q1)", "3 choices, but the file's first record has 2"),
    (read_csqa, "dev_rand_split.jsonl", _jsonl({**GOOD_CSQA, "question": {"stem": " ", "choices": []}}),
     "line 1 (id q1)", "field 'stem' is empty"),
    (read_cosmosqa, "valid.jsonl", _jsonl(GOOD_COSMOS, {**GOOD_COSMOS, "label": 7}), "line 2", "not one of 0, 1, 2, 3"),
    (read_cosmosqa, "valid.jsonl", _jsonl({k: v for k, v in GOOD_COSMOS.items() if k != "answer2"}),
     "line 1", "missing field 'answer2'"),
    (read_cosmosqa, "valid.jsonl", _jsonl([1, 2]), "line 1", "expected a JSON object"),
])
def test_malformed_records_name_file_and_record(tmp_path, reader, name, content, record, problem):
    path = _write(tmp_path, name, content)
    allowed = OPENENTITY_TYPES if reader is read_typing else TACRED_RELATIONS
    with pytest.raises(InputError) as info:
        reader(path, allowed)
    message = str(info.value)
    assert message.startswith(str(path))
    assert problem in message
    if record is not None:
        assert f"record {record}:" in message


@pytest.mark.parametrize("reader, name, content, expected", [
    # CosmosQA labels come as ints or digit strings; the test file has none
    (read_cosmosqa, "test.jsonl", _jsonl({**GOOD_COSMOS, "label": "2"}), "2"),
    (read_cosmosqa, "test.jsonl", _jsonl({k: v for k, v in GOOD_COSMOS.items() if k != "label"}), None),
    # CommonsenseQA's test file has no answerKey
    (read_csqa, "test_rand_split_no_answers.jsonl",
     _jsonl({k: v for k, v in GOOD_CSQA.items() if k != "answerKey"}, ""), None),
])
def test_choice_answers(tmp_path, reader, name, content, expected):
    (example,) = reader(_write(tmp_path, name, content))
    assert example.answer == expected


def test_typing_ids_and_sorted_labels(tmp_path):
    path = _write(tmp_path, "dev.json", [{**GOOD_TYPING, "labels": ["time", "event", "time"]}, GOOD_TYPING])
    first, second = read_typing(path)
    assert (first.id, second.id) == ("dev-0", "dev-1")
    assert first.labels == ("event", "time")


@pytest.mark.parametrize("max_length, expected_tokens, span, marker", [
    (32, "[CLS] Ada met Bob in @ Paris @ today . [SEP]", (6, 7), 5),
    # budget 4: the markers (3 tokens) fit, the window starts at the opening marker
    (6, "[CLS] @ Paris @ today [SEP]", (2, 3), 1),
    (5, "[CLS] @ Paris @ [SEP]", (2, 3), 1),
])
def test_encode_marked_windows_around_the_mention(word_tokenizer, max_length, expected_tokens, span, marker):
    (item,) = encode_marked(word_tokenizer, ["Ada met Bob in Paris today ."], [[(15, 20, "@")]], max_length)
    assert " ".join(word_tokenizer.convert_ids_to_tokens(item.input_ids)) == expected_tokens
    assert item.spans == [span] and item.markers == [marker]


def test_encode_marked_reports_what_cannot_fit(word_tokenizer):
    # "@ Paris @" needs 3 tokens; max_length 4 leaves 2 beside [CLS] and [SEP]
    assert encode_marked(word_tokenizer, ["Ada met Bob in Paris today ."], [[(15, 20, "@")]], 4) == [None]


def test_relation_input(word_tokenizer):
    example = RelationExample("r", ("Ada", "(", "AL", ")", "founded", "Acme", "."), (0, 0), (5, 5), "x")
    text, spans = relation_text(example)
    assert text == "Ada ( AL ) founded Acme ."
    assert spans == [(0, 3, "@"), (19, 23, "#")]
    (item,) = encode_marked(word_tokenizer, [text], [spans], 64)
    tokens = word_tokenizer.convert_ids_to_tokens(item.input_ids)
    assert " ".join(tokens) == "[CLS] @ Ada @ ( AL ) founded # Acme # . [SEP]"
    assert item.spans == [(2, 3), (9, 10)] and item.markers == [1, 8]


@pytest.mark.parametrize("task, logits, expected", [
    ("typing", [-1.0, 0.5, -0.2], ["b"]),
    ("typing", [-1.0, -0.5, -2.0], []),          # OpenEntity may predict no type
    ("figer", [-1.0, -0.5, -2.0], ["b"]),         # FIGER always predicts the argmax type
    ("figer", [0.1, -0.5, 3.0], ["a", "c"]),
])
def test_typing_decode(task, logits, expected):
    example = TypingExample("x", "Ada", 0, 3, ())
    assert TASKS[task].decode(torch.tensor(logits), ["a", "b", "c"], example) == expected


def test_tasks_encode_and_collate(tiny_model_dir, repo_root):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for name, max_length in [("typing", 64), ("tacred", 64), ("csqa", 32)]:
        task = TASKS[name]
        examples = task.reader(repo_root / SAMPLE[name] / task.files[1], task.default_labels)[:5]
        labels = task.label_space(examples, task.default_labels)
        encoded = task.encode(examples, tokenizer, labels, max_length)
        batch = collate(encoded.features, tokenizer.pad_token_id)
        rows = batch["input_ids"].shape[0]
        assert rows == (5 * len(examples[0].choices) if task.kind == "choice" else 5)
        assert batch["input_ids"].shape[1] <= max_length
        assert batch["attention_mask"].sum(1).min() > 0
        if task.kind != "choice":
            starts, markers = batch["span_start"], batch["marker"]
            tokens = batch["input_ids"].gather(1, markers)
            assert set(tokenizer.convert_ids_to_tokens(tokens.flatten().tolist())) <= {"@", "#"}
            assert bool((starts > markers).all())


@pytest.mark.parametrize("pooling, expected", [("entity", [2.5, 4.5]), ("marker", [1.0, 3.0])])
def test_mention_head_pooling(pooling, expected):
    from kadapter.tasks import MentionHead

    head = MentionHead(hidden_size=1, num_labels=1, n_mentions=2, dropout=0.0, pooling=pooling)
    torch.nn.init.ones_(head.out.weight)
    torch.nn.init.zeros_(head.out.bias)
    features = torch.arange(6, dtype=torch.float32).view(1, 6, 1)  # state of token t = t
    batch = {"span_start": torch.tensor([[2, 4]]), "span_end": torch.tensor([[4, 6]]),
             "marker": torch.tensor([[1, 3]])}
    # logit = subject pooled + object pooled: span (2+3)/2 + (4+5)/2 = 7, markers 1 + 3 = 4
    assert head(features, batch).item() == pytest.approx(sum(expected))


def test_pipeline_reports_bad_input_in_one_line(tmp_path, repo_root, capsys):
    from pipelines.common import run_stage
    from pipelines.finetune import main

    data = tmp_path / "openentity"
    data.mkdir()
    for name in ("train.json", "dev.json", "test.json"):
        (data / name).write_text(json.dumps([GOOD_TYPING]))
    (data / "dev.json").write_text(json.dumps([GOOD_TYPING, {**GOOD_TYPING, "end": 99}]))
    with pytest.raises(SystemExit) as info:
        run_stage("pipelines.finetune", "finetune", main,
                  ["--config", str(repo_root / "configs/sample.yaml"), "--task", "typing",
                   "--finetune.typing.data_dir", str(data), "--output_dir", str(tmp_path / "runs")])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {data / 'dev.json'}, record 1: mention [0, 99) is empty or outside a sentence of 13 characters"
            " (to leave such records out and count them, set --finetune.typing.on_error skip)")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.json"))
