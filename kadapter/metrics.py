"""Metrics of the downstream tasks, computed from a predictions file.

Every evaluation writes ``predictions.jsonl``, one line per example:
``{"id": ..., "gold": ..., "predicted": ...}`` where gold/predicted are a list of type
names (entity typing), a relation name (TACRED) or a choice label (multiple choice);
``gold`` is null for unlabelled test files (CommonsenseQA, CosmosQA). The metrics
below are pure functions of those rows, so any predictions file can be re-scored.

Values are fractions in [0, 1]; tables multiply by 100 as the paper does.
- OpenEntity: loose micro precision / recall / F1 over predicted type sets, as
  microsoft/K-Adapter's run_finetune_openentity_adapter.py.
- FIGER: strict accuracy (predicted set == gold set), loose macro F1 (per-example
  precision and recall averaged over examples), loose micro F1 (Ling & Weld 2012), as
  run_finetune_figer_adapter.py (whose prediction rule kadapter.tasks follows).
- TACRED: micro P/R/F1 where ``no_relation`` is never a positive, exactly as the
  official TACRED scorer (Zhang et al. 2017), including its convention that precision
  is 1.0 when nothing positive was predicted.
- CommonsenseQA, CosmosQA: accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from kadapter.io import InputError, atomic_write_bytes, read_jsonl

NO_RELATION = "no_relation"


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _prf(precision: float, recall: float) -> dict[str, float]:
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def loose_micro(gold: Sequence[Iterable[str]], predicted: Sequence[Iterable[str]]) -> dict[str, float]:
    """Precision = correct labels / predicted labels, recall = correct / gold, pooled over
    all examples. Nothing predicted -> precision 0; no gold labels -> recall 0."""
    n_correct = n_predicted = n_gold = 0
    for gold_labels, predicted_labels in zip(gold, predicted, strict=True):
        gold_set, predicted_set = set(gold_labels), set(predicted_labels)
        n_correct += len(gold_set & predicted_set)
        n_predicted += len(predicted_set)
        n_gold += len(gold_set)
    return _prf(n_correct / n_predicted if n_predicted else 0.0,
                n_correct / n_gold if n_gold else 0.0)


def loose_macro(gold: Sequence[Iterable[str]], predicted: Sequence[Iterable[str]]) -> dict[str, float]:
    """Per-example precision and recall, averaged over all examples (an example with an
    empty predicted set adds 0 to precision, one with an empty gold set 0 to recall)."""
    precision_sum = recall_sum = 0.0
    count = 0
    for gold_labels, predicted_labels in zip(gold, predicted, strict=True):
        gold_set, predicted_set = set(gold_labels), set(predicted_labels)
        correct = len(gold_set & predicted_set)
        precision_sum += correct / len(predicted_set) if predicted_set else 0.0
        recall_sum += correct / len(gold_set) if gold_set else 0.0
        count += 1
    if not count:
        return _prf(0.0, 0.0)
    return _prf(precision_sum / count, recall_sum / count)


def strict_accuracy(gold: Sequence[Iterable[str]], predicted: Sequence[Iterable[str]]) -> float:
    """Fraction of examples whose predicted type set equals the gold set exactly."""
    pairs = list(zip(gold, predicted, strict=True))
    return sum(set(g) == set(p) for g, p in pairs) / len(pairs) if pairs else 0.0


def relation_micro(gold: Sequence[str], predicted: Sequence[str],
                   negative: str = NO_RELATION) -> dict[str, float]:
    """TACRED micro P/R/F1: a prediction counts as guessed unless it is ``negative``, a
    gold label as a positive unless it is ``negative``; correct = guessed and equal."""
    guessed = positives = correct = 0
    for gold_label, predicted_label in zip(gold, predicted, strict=True):
        if predicted_label != negative:
            guessed += 1
            correct += predicted_label == gold_label
        positives += gold_label != negative
    return _prf(correct / guessed if guessed else 1.0, correct / positives if positives else 0.0)


def accuracy(gold: Sequence[Any], predicted: Sequence[Any]) -> float:
    pairs = list(zip(gold, predicted, strict=True))
    return sum(g == p for g, p in pairs) / len(pairs) if pairs else 0.0


def _figer(gold, predicted):
    return {
        "strict_accuracy": strict_accuracy(gold, predicted),
        "loose_macro_f1": loose_macro(gold, predicted)["f1"],
        "loose_micro_f1": loose_micro(gold, predicted)["f1"],
    }


def _accuracy(gold, predicted):
    return {"accuracy": accuracy(gold, predicted)}


# metric family -> (function of (gold, predicted) -> flat dict, main metric key)
METRICS = {
    "openentity": (loose_micro, "f1"),
    "figer": (_figer, "loose_micro_f1"),
    "tacred": (relation_micro, "f1"),
    "accuracy": (_accuracy, "accuracy"),
}


def score(metric: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of ``rows`` (predictions-file rows) for metric family ``metric``.

    Rows whose gold is null (unlabelled test files) are counted but not scored; when no
    row is labelled the result holds only the counts.
    """
    function, _ = METRICS[metric]
    labelled = [row for row in rows if row["gold"] is not None]
    result: dict[str, Any] = {"examples": len(rows), "labelled": len(labelled)}
    if labelled:
        result.update(function([r["gold"] for r in labelled], [r["predicted"] for r in labelled]))
    return result


def main_metric(metric: str) -> str:
    return METRICS[metric][1]


def write_predictions(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON lines (``id``, ``gold``, ``predicted`` first), atomically."""
    lines = [orjson.dumps({"id": r["id"], "gold": r["gold"], "predicted": r["predicted"],
                           **{k: v for k, v in r.items() if k not in ("id", "gold", "predicted")}})
             for r in rows]
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines))


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a predictions file; a malformed line is an InputError naming file and line."""
    rows = []
    for number, row in read_jsonl(path):
        if not {"id", "gold", "predicted"} <= row.keys():
            raise InputError(path, f"line {number}", "expected an object with id, gold, predicted")
        rows.append(row)
    return rows


def score_file(metric: str, path: str | Path) -> dict[str, Any]:
    return score(metric, read_predictions(path))
