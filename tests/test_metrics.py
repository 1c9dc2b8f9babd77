"""Downstream metrics against hand-computed cases, edge cases included."""

from __future__ import annotations

import pytest

from kadapter.io import InputError
from kadapter.metrics import (
    accuracy,
    loose_macro,
    loose_micro,
    read_predictions,
    relation_micro,
    score,
    score_file,
    strict_accuracy,
    write_predictions,
)

A, B, C, D = "a", "b", "c", "d"


def approx(expected: dict[str, float]):
    return pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("gold, predicted, expected", [
    # 2 correct of 3 predicted, of 3 gold
    ([[A, B], [C]], [[A], [C, D]], {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3}),
    # 1 correct of 3 predicted, of 2 gold: F1 = 2 * (1/3 * 1/2) / (1/3 + 1/2) = 0.4
    ([[A], [B]], [[A, B, C], []], {"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4}),
    # nothing predicted at all
    ([[A], [B]], [[], []], {"precision": 0.0, "recall": 0.0, "f1": 0.0}),
    # no gold labels, one wrong prediction
    ([[], []], [[A], []], {"precision": 0.0, "recall": 0.0, "f1": 0.0}),
    # everything right, order inside a set does not matter
    ([[A, B]], [[B, A]], {"precision": 1.0, "recall": 1.0, "f1": 1.0}),
    # no examples
    ([], [], {"precision": 0.0, "recall": 0.0, "f1": 0.0}),
])
def test_loose_micro(gold, predicted, expected):
    assert loose_micro(gold, predicted) == approx(expected)


@pytest.mark.parametrize("gold, predicted, expected", [
    # per example (p, r): (1, 1/2), (1/2, 1) -> P = R = 0.75
    ([[A, B], [C]], [[A], [C, D]], {"precision": 0.75, "recall": 0.75, "f1": 0.75}),
    # (1/3, 1), (0, 0) -> P = 1/6, R = 1/2, F1 = 2 * (1/12) / (2/3) = 0.25
    ([[A], [B]], [[A, B, C], []], {"precision": 1 / 6, "recall": 0.5, "f1": 0.25}),
    ([[A], [B]], [[], []], {"precision": 0.0, "recall": 0.0, "f1": 0.0}),
    ([], [], {"precision": 0.0, "recall": 0.0, "f1": 0.0}),
])
def test_loose_macro(gold, predicted, expected):
    assert loose_macro(gold, predicted) == approx(expected)


@pytest.mark.parametrize("gold, predicted, expected", [
    ([[A, B], [C], [D]], [[B, A], [C, D], [D]], 2 / 3),
    ([[A]], [[]], 0.0),
    ([[]], [[]], 1.0),  # an example with no types, predicted as none, is exactly right
    ([], [], 0.0),
])
def test_strict_accuracy(gold, predicted, expected):
    assert strict_accuracy(gold, predicted) == pytest.approx(expected)


NO = "no_relation"


@pytest.mark.parametrize("gold, predicted, expected", [
    # guessed r1, r2, r2 (3); correct 1; gold positives r1, r2, r1 (3)
    (["r1", "r2", NO, NO, "r1"], ["r1", NO, "r2", NO, "r2"],
     {"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3}),
    # all predicted no_relation: nothing guessed -> precision 1.0 (official scorer), recall 0
    (["r1", NO], [NO, NO], {"precision": 1.0, "recall": 0.0, "f1": 0.0}),
    # all gold no_relation: a guess is never correct, there is nothing to recall
    ([NO, NO], ["r1", NO], {"precision": 0.0, "recall": 0.0, "f1": 0.0}),
    # no_relation predicted correctly is not a true positive
    ([NO, "r1"], [NO, "r1"], {"precision": 1.0, "recall": 1.0, "f1": 1.0}),
    ([], [], {"precision": 1.0, "recall": 0.0, "f1": 0.0}),
])
def test_relation_micro(gold, predicted, expected):
    assert relation_micro(gold, predicted) == approx(expected)


def test_accuracy():
    assert accuracy(["A", "B", "C"], ["A", "C", "C"]) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        loose_micro([[A]], [[A], [B]])


@pytest.mark.parametrize("metric, rows, expected", [
    ("figer", [{"id": 1, "gold": [A, B], "predicted": [A]}, {"id": 2, "gold": [C], "predicted": [C, D]}],
     {"examples": 2, "labelled": 2, "strict_accuracy": 0.0, "loose_macro_f1": 0.75,
      "loose_micro_f1": 2 / 3}),
    ("openentity", [{"id": 1, "gold": [A], "predicted": []}],
     {"examples": 1, "labelled": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}),
    ("tacred", [{"id": "x", "gold": "r1", "predicted": "r1"}, {"id": "y", "gold": NO, "predicted": "r1"}],
     {"examples": 2, "labelled": 2, "precision": 0.5, "recall": 1.0, "f1": 2 / 3}),
    # unlabelled rows are counted, not scored
    ("accuracy", [{"id": 1, "gold": "A", "predicted": "A"}, {"id": 2, "gold": None, "predicted": "B"}],
     {"examples": 2, "labelled": 1, "accuracy": 1.0}),
    ("accuracy", [{"id": 1, "gold": None, "predicted": "B"}], {"examples": 1, "labelled": 0}),
])
def test_score_rows(metric, rows, expected):
    assert score(metric, rows) == approx(expected)


def test_predictions_file_round_trip(tmp_path):
    rows = [{"id": "q1", "gold": ["person"], "predicted": ["person", "group"]},
            {"id": "q2", "gold": ["time"], "predicted": []}]
    path = tmp_path / "predictions.jsonl"
    write_predictions(path, rows)
    assert path.read_bytes().count(b"\n") == 2
    assert read_predictions(path) == rows
    assert score_file("openentity", path) == approx(
        {"examples": 2, "labelled": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5})


@pytest.mark.parametrize("content, problem", [
    (b'{"id": 1, "gold": "A", "predicted": "A"}\n{"id": 2, "gold": \n', "line 2: not valid JSON"),
    (b'{"id": 1, "gold": "A"}\n', "line 1: expected an object with id, gold, predicted"),
    (b'\n["q1", "A", "A"]\n', "line 2: expected a JSON object, got list"),
])
def test_malformed_predictions_file(tmp_path, content, problem):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=problem) as info:
        read_predictions(path)
    assert str(path) in str(info.value)
