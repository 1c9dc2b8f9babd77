"""kadapter.bpe_words.WordEncoder gives exactly the fast tokenizer's encode_batch (ids,
character offsets, special-tokens mask, truncation) while encoding each distinct word
once: on the real T-REx sample (plain and marked the way the feature stage marks it)
and on adversarial texts; texts it cannot vouch for go to the tokenizer itself."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import kadapter.bpe_words as bpe_words
from kadapter.bpe_words import SEPARATOR, WordEncoder, rust_encodings
from kadapter.features import OBJECT_MARKER, SUBJECT_MARKER, mark_batch
from kadapter.modeling import load_tokenizer

FIELDS = ("ids", "offsets", "special", "starts", "lengths")
ADVERSARIAL = [
    "", " ", "   ", "\t", "\n\n", "a", "@", "#", "@ @", "# # #",
    "@ Paris @ is in # France #.", "(@ Paris @), [# France #]; \"@ x @\"", "@'s #'t",
    "it's they're we've I'm you'll he'd 'S 'T 're", "He said 'sorry' 'dadada",
    "x@y#z @@ ## (@ @) #. #, @'s", "email@example.com #hashtag @user",
    "Zürich – 1,234.5 km² ½ Ⅻ ٣ 你好世界 😀 e\u0301 ﬁ ß ǅ",
    "multiple   spaces\tand\ttabs\nnew\nlines  \n  ", "   leading", "trailing   ",
    "\u00a0nbsp\u2009thin\u3000ideographic\u2028line\u2029para\u0085nel",
    "\u200b\u200d\ufeff zero width \u00ad soft hyphen", "\x1c\x1d\x1e\x1f unit separators",
    "control \x01\x02\x7f chars", "digits 123 4.5 ٤٥ ①② and letters ＡＢ",
    "<mask> inside <s> and </s> and <pad> <unk>", "lstrip  <mask>", "no\x00nul\x00here",
    "a" * 300, "word " * 200, "😀" * 40, "é" * 70, "'s" * 30,
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def same(encoder: WordEncoder, texts: list[str], max_length: int | None) -> None:
    mine = encoder.encode(texts, max_length, special=True)
    theirs = rust_encodings(encoder._truncating(max_length), texts, special=True)
    for field in FIELDS:
        assert np.array_equal(getattr(mine, field), getattr(theirs, field)), (field, max_length)
    # and row by row, the way a user would call the tokenizer
    for i, text in enumerate(texts[:50]):
        row = slice(int(mine.starts[i]), int(mine.starts[i] + mine.lengths[i]))
        one = encoder._truncating(max_length).encode(text)
        assert mine.ids[row].tolist() == one.ids
        assert [tuple(o) for o in mine.offsets[row].tolist()] == one.offsets


def real_texts(shared_real) -> list[str]:
    documents = json.loads((shared_real / "trex-sample-output.json").read_text())
    sentences = [d["text"][a:b] for d in documents for a, b in d["sentences_boundaries"]]
    entities = [e["surfaceform"] for d in documents for e in d["entities"] if e.get("surfaceform")]
    return sentences + [d["text"] for d in documents] + entities


@pytest.mark.parametrize("max_length", [None, 3, 8, 64, 512])
def test_same_as_encode_batch_on_real_and_adversarial_texts(tokenizer, shared_real, max_length):
    encoder = WordEncoder(tokenizer.backend_tokenizer)
    assert encoder.specials is not None  # the tiny model's tokenizer takes the word path
    texts = real_texts(shared_real) + ADVERSARIAL
    same(encoder, texts, max_length)
    same(encoder, texts[::-1], max_length)  # now every word comes from the table


def test_same_on_marked_real_sentences(tokenizer, shared_real):
    """Every entity pair of every real sentence marked as the feature stage marks it:
    markers at the sentence start and end, next to punctuation, adjacent to each other."""
    documents = json.loads((shared_real / "trex-sample-output.json").read_text())
    texts, starts, ends = [], [], []
    for document in documents:
        for a, b in document["sentences_boundaries"]:
            spans = sorted({(e["boundaries"][0] - a, e["boundaries"][1] - a) for e in document["entities"]
                            if a <= e["boundaries"][0] < e["boundaries"][1] <= b})
            for s in spans:
                for o in spans:
                    if s[1] <= o[0] or o[1] <= s[0]:
                        texts.append(document["text"][a:b])
                        starts.append([s[0], o[0]])
                        ends.append([s[1], o[1]])
    assert len(texts) > 500
    marked, _, _ = mark_batch(texts, np.array(starts), np.array(ends), (SUBJECT_MARKER, OBJECT_MARKER))
    encoder = WordEncoder(tokenizer.backend_tokenizer)
    for max_length in (None, 16, 64):
        same(encoder, marked, max_length)


def test_texts_it_cannot_vouch_for_go_to_the_tokenizer(tokenizer):
    encoder = WordEncoder(tokenizer.backend_tokenizer)
    texts = ["plain text", "with <mask> token", f"with the separator {SEPARATOR} inside", "plain again"]
    assert encoder._usable(texts, SEPARATOR.join(texts)).tolist() == [True, False, False, True]
    same(encoder, texts, None)
    same(encoder, texts, 5)


def test_a_full_table_starts_over_with_the_same_results(tokenizer, shared_real, monkeypatch):
    monkeypatch.setattr(bpe_words, "MAX_WORDS", 200)
    encoder = WordEncoder(tokenizer.backend_tokenizer)
    texts = real_texts(shared_real)
    for start in range(0, len(texts), 7):
        same(encoder, texts[start:start + 7], 64)
    assert len(encoder.words) <= 200 + 7 * 400


def test_other_tokenizer_pipelines_use_the_tokenizer_itself(tokenizer):
    """A pipeline this encoder does not reproduce (here: add_prefix_space) is left to
    encode_batch whole, with the same results."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    encoder = WordEncoder(backend)
    assert encoder.specials is None
    same(encoder, ADVERSARIAL, 16)


def test_a_failed_self_check_turns_the_word_path_off(tokenizer, monkeypatch):
    """If the word path ever disagreed with the tokenizer on the built-in tricky texts
    (say, a tokenizers release with another pre-tokenizer expression), it is not used."""
    monkeypatch.setattr(bpe_words, "SELF_CHECK", ["it's", "a b"])
    original = WordEncoder._compiled

    def without_contractions(self):
        return re.compile(original(self).pattern.replace("'s|", "", 1))

    monkeypatch.setattr(WordEncoder, "_compiled", without_contractions)
    encoder = WordEncoder(tokenizer.backend_tokenizer)
    assert encoder.specials is None
    same(encoder, ["it's fine", "a b"], None)
