"""Entity markers, character-span -> token alignment, and span pooling.

Factual pretraining, entity typing and TACRED all mark mentions in the text
(``@`` around the subject, ``#`` around the object), tokenize with offsets, and pool
the mention's sub-word states. Marking happens on characters, before tokenization,
so every tokenizer (byte-level BPE with leading spaces, WordPiece) sees the same
text, and the mention's token span is recovered from the offsets, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MarkedText:
    text: str
    """The text with markers inserted."""
    mentions: list[tuple[int, int]]
    """Character span [start, end) of each mention inside ``text`` (markers excluded)."""
    markers: list[tuple[int, int]]
    """Character span of each mention's opening marker inside ``text``."""


def mark_spans(text: str, spans: list[tuple[int, int, str]]) -> MarkedText:
    """Insert ``marker + " "`` before and ``" " + marker`` after each span.

    ``spans`` are (start, end, marker) character spans of ``text``, end exclusive; they
    must be non-empty, inside the text and not overlap. Results come back in the input
    order. Example: ``mark_spans("Paris is in France.", [(0, 5, "@"), (12, 18, "#")])``
    -> ``"@ Paris @ is in # France #."``.
    """
    for start, end, marker in spans:
        if not 0 <= start < end <= len(text):
            raise ValueError(f"span [{start}, {end}) is empty or outside a text of {len(text)} chars")
        if not marker:
            raise ValueError("marker must be a non-empty string")
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    for a, b in zip(order, order[1:]):
        if spans[b][0] < spans[a][1]:
            raise ValueError(f"spans {spans[a][:2]} and {spans[b][:2]} overlap")
    pieces: list[str] = []
    cursor = offset = 0
    mentions: dict[int, tuple[int, int]] = {}
    markers: dict[int, tuple[int, int]] = {}
    for i in order:
        start, end, marker = spans[i]
        pieces.append(text[cursor:start])
        opening = f"{marker} "
        markers[i] = (start + offset, start + offset + len(marker))
        mentions[i] = (start + offset + len(opening), end + offset + len(opening))
        pieces.append(opening + text[start:end] + f" {marker}")
        offset += len(opening) + len(marker) + 1
        cursor = end
    pieces.append(text[cursor:])
    return MarkedText("".join(pieces), [mentions[i] for i in range(len(spans))],
                      [markers[i] for i in range(len(spans))])


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Tokens [first, last + 1) whose character offsets overlap [start, end).

    ``offsets`` is a tokenizer's ``offset_mapping`` for one sequence; special tokens
    (offset (0, 0)) never match. Returns None when no token covers the span (e.g. it was
    truncated away).
    """
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    return (hits[0], hits[-1] + 1) if hits else None


def span_mean(features: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Mean of ``features[b, starts[b]:ends[b]]`` for each row b: (B, T, H) -> (B, H).

    Spans are not checked here (that would wait for the device on every step): the
    feature stage rejects an empty or out-of-range span when it builds the features
    (``kadapter.features.check_spans``); an empty span would give zeros.
    """
    positions = torch.arange(features.shape[1], device=features.device)
    mask = (positions[None, :] >= starts[:, None]) & (positions[None, :] < ends[:, None])
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1)
    mask = mask.to(features.dtype)
    return torch.einsum("bt,bth->bh", mask, features) / counts.to(features.dtype)


def gather_positions(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``features[b, positions[b]]`` for each row b: (B, T, H) -> (B, H) (marker pooling)."""
    index = positions.view(-1, 1, 1).expand(-1, 1, features.shape[-1])
    return features.gather(1, index).squeeze(1)
