"""Byte-level BPE encoding that runs the BPE once per distinct word, for the feature stage.

RoBERTa's fast tokenizer (``tokenizers``: ByteLevel pre-tokenizer, BPE model,
RobertaProcessing) cuts a text into words with one regular expression

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

then encodes each word on its own (the merges never cross a word), trims the spaces off
each token's character offsets, truncates and adds ``<s>``/``</s>``. On a corpus most
words repeat, yet ``encode_batch`` pays for the whole pipeline, and for one Python object
per text, on every text: about 2/3 of the feature stage's time.

``WordEncoder`` does the same with the splitting in Python's ``re`` over the whole batch
at once (one ``findall`` on the texts joined by a separator) and a table of every word
met so far: the new words of a batch are encoded by the real tokenizer, each on its own
(one pre-tokenized sequence; a word the expression produced is one word again on its
own, and its tokens and offsets relative to its first character are those it has in
context); then every token, offset and special token of the batch is laid out with numpy. The same expression works in ``re`` because each character
is given the class (letter, number, space, other) that the tokenizer's own pre-tokenizer
shows for it, asked once per distinct character (so the Unicode tables of the two regular
expression engines never have to agree). What it cannot vouch for goes to the tokenizer
as it is: a text holding an added token's text (``<mask>``...), the separator or a
character the probes cannot place, and every text when the tokenizer is not byte-level
BPE with RobertaProcessing, or when the self-check against ``encode_batch`` on tricky
texts (run once per encoder) fails. So the output is ``encode_batch``'s; the tests
compare the two on the real T-REx sample and on adversarial texts.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

SEPARATOR = "\x00"  # joins a batch's texts: a word of its own, counted as a text's end
MAX_WORDS = 1 << 20  # table size at which it starts over (~150 MB: memory stays bounded)
SELF_CHECK = [
    "", " ", "  ", "a", "Paris is in France.", "@ Paris @ is in # France #.",
    "Andorra (/ænˈdɔːrə/; [ənˈdorə]) is a @ (landlocked) # state #, in  the  Pyrenees  ",
    "it's they're we've I'm you'll he'd 's 'S 't", "a\tb\n\nc \u00a0d\u3000e\u2028f  \t g",
    "Zürich – 1,234.5 km² ½ Ⅻ ٣ 你好世界 😀 e\u0301 ﬁ", "   leading and trailing   ",
    "x@y#z @@ ## (@ @) #. #, @'s", "\u200b\u200d\ufeff zero width", "tab\tend\t",
]


@dataclass
class Encodings:
    """A batch of encodings as flat numpy arrays: token ``ids``, character ``offsets``
    (T, 2), ``special`` mask, and each row's first token index ``starts`` and ``lengths``."""

    ids: np.ndarray
    offsets: np.ndarray
    special: np.ndarray | None
    starts: np.ndarray
    lengths: np.ndarray


def rust_encodings(backend: Any, texts: list[str], special: bool) -> Encodings:
    """``backend.encode_batch(texts)`` as flat arrays (the tokenizer's own path)."""
    encodings = backend.encode_batch(texts)
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(lengths.sum())
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(e.ids for e in encodings), dtype=np.int32, count=total)
    offsets = np.fromiter(chain(chain(e.offsets for e in encodings)), dtype=np.int64,
                          count=2 * total).reshape(-1, 2)
    mask = (np.fromiter(chain(e.special_tokens_mask for e in encodings), dtype=np.int8, count=total)
            if special else None)
    return Encodings(ids, offsets, mask, row_starts(lengths), lengths)


def row_starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for every (s, n)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def supported(state: dict[str, Any]) -> tuple[int, int] | None:
    """(cls id, sep id) when the tokenizer's pipeline is the one reproduced here."""
    pre, post, model = state.get("pre_tokenizer") or {}, state.get("post_processor") or {}, state["model"]
    if (state.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and model.get("type") == "BPE" and model.get("dropout") is None
            and post.get("type") == "RobertaProcessing" and post.get("trim_offsets")
            and not post.get("add_prefix_space")):
        return post["cls"][1], post["sep"][1]
    return None


class WordEncoder:
    """``encode_batch`` of a byte-level BPE tokenizer, with each distinct word encoded
    once (see the module docstring). One per process: it is not thread-safe."""

    def __init__(self, backend: Any):
        from tokenizers import Tokenizer

        text = backend.to_str()
        state = json.loads(text)
        self.rust = Tokenizer.from_str(text)  # a private copy: its own truncation and padding
        self.specials = supported(state)
        self.added = [t["content"] for t in state.get("added_tokens", [])]
        self.classes: dict[str, str] = {}  # character -> "L", "N", "S", "O" or "?" (unplaceable)
        self.pattern: re.Pattern | None = None
        self._reset()
        if self.specials is not None and not self._self_check():
            self.specials = None

    def _self_check(self) -> bool:
        """This encoder agrees with ``encode_batch`` on tricky texts, truncated or not."""
        for max_length in (None, 8):
            mine = self.encode(SELF_CHECK, max_length, special=True)
            theirs = rust_encodings(self._truncating(max_length), SELF_CHECK, special=True)
            if not all(np.array_equal(getattr(mine, f), getattr(theirs, f))
                       for f in ("ids", "offsets", "special", "starts", "lengths")):
                return False
        return True

    # ------------------------------------------------------------------ word table

    def _reset(self) -> None:
        self.words = WordTable({SEPARATOR: 0})
        self.word_chars = np.zeros(1024, dtype=np.int64)
        self.word_chars[0] = 1
        self.first_token = np.zeros(1024, dtype=np.int64)
        self.token_count = np.zeros(1024, dtype=np.int64)
        self.token_ids = np.zeros(4096, dtype=np.int32)
        self.token_offsets = np.zeros((4096, 2), dtype=np.int64)
        self.tokens = 0

    def _add_words(self, new: list[str]) -> None:
        """Encode words met for the first time into the table: as one pre-tokenized
        sequence, where each word is encoded alone, offsets relative to its start."""
        start = len(self.words) - len(new)
        encoding = self._truncating(None).encode(new, is_pretokenized=True, add_special_tokens=False)
        total = len(encoding)
        counts = np.bincount(np.fromiter(encoding.word_ids, dtype=np.int64, count=total),
                             minlength=len(new))
        need_words, need_tokens = start + len(new), self.tokens + total
        if need_words > len(self.word_chars):
            size = max(need_words, 2 * len(self.word_chars))
            for name in ("word_chars", "first_token", "token_count"):
                grown = np.zeros(size, dtype=np.int64)
                grown[:start] = getattr(self, name)[:start]
                setattr(self, name, grown)
        if need_tokens > len(self.token_ids):
            size = max(need_tokens, 2 * len(self.token_ids))
            ids, offsets = np.zeros(size, dtype=np.int32), np.zeros((size, 2), dtype=np.int64)
            ids[:self.tokens], offsets[:self.tokens] = self.token_ids[:self.tokens], self.token_offsets[:self.tokens]
            self.token_ids, self.token_offsets = ids, offsets
        self.word_chars[start:need_words] = np.fromiter(map(len, new), dtype=np.int64, count=len(new))
        self.token_count[start:need_words] = counts
        self.first_token[start:need_words] = self.tokens + np.cumsum(counts) - counts
        self.token_ids[self.tokens:need_tokens] = encoding.ids
        self.token_offsets[self.tokens:need_tokens] = np.fromiter(
            itertools.chain.from_iterable(encoding.offsets), dtype=np.int64, count=2 * total).reshape(-1, 2)
        self.tokens = need_tokens

    # ------------------------------------------------------------------ characters

    def _classify(self, chars: set[str]) -> None:
        """The tokenizer's own class of each new character, from its pre-tokenizer: with
        a letter, a digit, a "!" or a tab before it, it stays one word only if it is a
        letter, a number, other or a space, respectively."""
        split = self.rust.pre_tokenizer.pre_tokenize_str
        for char in chars:
            try:
                alone = [len(split(probe + char)) == 1 for probe in ("a", "0", "!", "\t")]
            except Exception:  # noqa: BLE001 (e.g. a lone surrogate: the tokenizer's own path says)
                alone = []
            self.classes[char] = "LNOS"[alone.index(True)] if alone.count(True) == 1 else "?"
        self.pattern = None

    def _compiled(self) -> re.Pattern:
        if self.pattern is None:
            def members(kind: str) -> str:
                return "".join(re.escape(c) for c, k in sorted(self.classes.items()) if k == kind)

            letters, numbers, spaces = members("L"), members("N"), members("S")
            sep = re.escape(SEPARATOR)
            self.pattern = re.compile(
                f"{sep}|'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"
                f"| ?[^{spaces}{letters}{numbers}{sep}]+|[{spaces}]+(?![^{spaces}{sep}])|[{spaces}]+")
        return self.pattern

    def _usable(self, texts: list[str], joined: str) -> np.ndarray:
        """Texts the word path reproduces exactly (the others go to the tokenizer)."""
        chars = set(joined) - {SEPARATOR}
        new = chars - self.classes.keys()
        if new:
            self._classify(new)
        doubtful = [c for c in chars if self.classes.get(c, "?") == "?"]
        doubtful += [t for t in self.added if t in joined]
        if joined.count(SEPARATOR) != max(len(texts) - 1, 0):
            doubtful.append(SEPARATOR)
        usable = np.ones(len(texts), dtype=bool)
        if doubtful:  # rare: find the texts
            for i, text in enumerate(texts):
                usable[i] = not any(d in text for d in doubtful)
        return usable

    # ------------------------------------------------------------------ encoding

    def encode(self, texts: list[str], max_length: int | None, special: bool = False) -> Encodings:
        """``encode_batch(texts)`` with truncation at ``max_length`` (None: none), as
        flat arrays; ``special`` adds the special-tokens mask."""
        if self.specials is None or (max_length is not None and max_length < 3):
            return rust_encodings(self._truncating(max_length), texts, special)
        joined = SEPARATOR.join(texts)
        usable = self._usable(texts, joined)
        if usable.all():
            return self._encode_words(joined, len(texts), max_length, special)
        fast, slow = np.flatnonzero(usable), np.flatnonzero(~usable)
        fast_texts = [texts[i] for i in fast]
        parts = [self._encode_words(SEPARATOR.join(fast_texts), len(fast), max_length, special),
                 rust_encodings(self._truncating(max_length), [texts[i] for i in slow], special)]
        return interleave(len(texts), [fast, slow], parts, special)

    def _truncating(self, max_length: int | None) -> Any:
        """The tokenizer, truncating at ``max_length`` (None: never), without padding."""
        rust = self.rust
        if max_length is None:
            rust.no_truncation()
        else:
            rust.enable_truncation(max_length)
        rust.no_padding()
        return rust

    def _encode_words(self, joined: str, n: int, max_length: int | None, special: bool) -> Encodings:
        """The n texts of ``joined`` (joined by the separator), every character classified."""
        if n == 0:
            return Encodings(np.zeros(0, np.int32), np.zeros((0, 2), np.int64),
                             np.zeros(0, np.int8) if special else None, np.zeros(0, np.int64),
                             np.zeros(0, np.int64))
        words = self._compiled().findall(joined)
        before = len(self.words)
        if before + len(words) > MAX_WORDS:
            self._reset()
            before = 1
        table = self.words
        index = np.fromiter(map(table.__getitem__, words), dtype=np.int64, count=len(words))
        if len(table) > before:
            self._add_words(list(table)[before:])
        is_sep = index == 0
        word_row = np.cumsum(is_sep) - is_sep  # the separator ends its row
        chars = self.word_chars.take(index)
        word_start = np.cumsum(chars) - chars
        row_char = np.concatenate([[0], word_start[is_sep] + 1])  # each row's first character
        keep = ~is_sep
        index, word_row = index[keep], word_row[keep]
        word_pos = word_start[keep] - row_char.take(word_row)
        counts = self.token_count.take(index)
        token = ranges(self.first_token.take(index), counts)
        token_row = np.repeat(word_row, counts)
        token_pos = np.repeat(word_pos, counts)  # its word's first character in the row
        content = np.bincount(token_row, minlength=n)
        if max_length is not None:  # truncation keeps the first tokens, then specials are added
            limit = max_length - 2
            kept = np.arange(len(token)) - row_starts(content).take(token_row) < limit
            token, token_row, token_pos = token[kept], token_row[kept], token_pos[kept]
            content = np.minimum(content, limit)
        lengths = content + 2
        starts = row_starts(lengths)
        total = int(lengths.sum())
        cls, sep = self.specials
        ids = np.empty(total, dtype=np.int32)
        offsets = np.zeros((total, 2), dtype=np.int64)
        place = np.arange(len(token)) + 2 * token_row + 1  # after its row's and earlier rows' specials
        ids[place] = self.token_ids.take(token)
        offsets[place] = self.token_offsets.take(token, axis=0) + token_pos[:, None]
        ends = starts + lengths - 1
        ids[starts], ids[ends] = cls, sep
        mask = None
        if special:
            mask = np.zeros(total, dtype=np.int8)
            mask[starts] = mask[ends] = 1
        return Encodings(ids, offsets, mask, starts, lengths)


class WordTable(dict):
    """word -> its row in the table; a new word gets the next row."""

    def __missing__(self, word: str) -> int:
        index = self[word] = len(self)
        return index


def interleave(n: int, rows: list[np.ndarray], parts: list[Encodings], special: bool) -> Encodings:
    """One Encodings of n rows from parts covering the rows ``rows[k]`` each."""
    lengths = np.zeros(n, dtype=np.int64)
    for r, part in zip(rows, parts):
        lengths[r] = part.lengths
    starts = row_starts(lengths)
    total = int(lengths.sum())
    ids = np.empty(total, dtype=np.int32)
    offsets = np.empty((total, 2), dtype=np.int64)
    mask = np.empty(total, dtype=np.int8) if special else None
    for r, part in zip(rows, parts):
        target = ranges(starts[r], part.lengths)
        ids[target], offsets[target] = part.ids, part.offsets
        if mask is not None:
            mask[target] = part.special
    return Encodings(ids, offsets, mask, starts, lengths)
