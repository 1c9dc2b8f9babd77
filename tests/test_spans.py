"""Entity markers, offsets -> token spans, span pooling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from kadapter.spans import gather_positions, mark_spans, span_mean, token_span


@pytest.mark.parametrize(
    "text, spans, expected",
    [
        ("Paris is in France.", [(0, 5, "@"), (12, 18, "#")], "@ Paris @ is in # France #."),
        ("Paris is in France.", [(12, 18, "#"), (0, 5, "@")], "@ Paris @ is in # France #."),
        ("He met Ada Lovelace", [(7, 19, "@")], "He met @ Ada Lovelace @"),
    ],
)
def test_mark_spans(text, spans, expected):
    marked = mark_spans(text, spans)
    assert marked.text == expected
    for (start, end, marker), (m_start, m_end), (k_start, k_end) in zip(spans, marked.mentions,
                                                                          marked.markers):
        assert marked.text[m_start:m_end] == text[start:end]
        assert marked.text[k_start:k_end] == marker


@pytest.mark.parametrize("spans, message", [
    ([(0, 5, "@"), (3, 8, "#")], "overlap"),
    ([(4, 4, "@")], "empty or outside"),
    ([(0, 99, "@")], "empty or outside"),
])
def test_mark_spans_rejects_bad_spans(spans, message):
    with pytest.raises(ValueError, match=message):
        mark_spans("Paris is in France.", spans)


def test_token_span_covers_exactly_the_mention(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    marked = mark_spans("The Thames flows through London.", [(4, 10, "@"), (25, 31, "#")])
    encoded = tokenizer(marked.text, return_offsets_mapping=True)
    for (start, end), word in zip(marked.mentions, ["Thames", "London"]):
        first, last = token_span(encoded["offset_mapping"], start, end)
        decoded = tokenizer.decode(encoded["input_ids"][first:last]).strip()
        assert decoded == word
        before = tokenizer.decode(encoded["input_ids"][first - 1 : first]).strip()
        assert before in {"@", "#"}
    assert token_span(encoded["offset_mapping"], 500, 510) is None


def test_span_mean_and_gather():
    features = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    pooled = span_mean(features, torch.tensor([1, 0]), torch.tensor([3, 1]))
    torch.testing.assert_close(pooled[0], features[0, 1:3].mean(0))
    torch.testing.assert_close(pooled[1], features[1, 0])
    torch.testing.assert_close(gather_positions(features, torch.tensor([4, 2])),
                               torch.stack([features[0, 4], features[1, 2]]))
    # no check on the device (the feature stage rejects empty spans): zeros, no error
    pooled = span_mean(features, torch.tensor([2, 0]), torch.tensor([2, 1]))
    torch.testing.assert_close(pooled[0], torch.zeros(3))


def test_span_mean_never_reads_tensor_values():
    """Meta tensors have no data: any host-device sync (``bool(tensor)``, ``.item()``)
    would fail on them, so this runs only when span_mean never waits for the device."""
    features = torch.empty(4, 7, 3, device="meta")
    starts = torch.empty(4, dtype=torch.long, device="meta")
    assert span_mean(features, starts, starts).shape == (4, 3)
