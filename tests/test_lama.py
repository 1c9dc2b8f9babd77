"""LAMA probe: readers, token forms, filters, ranking and metrics, the MLM mix, the stage.

Models here are built in the test: a hand-written byte-level BPE tokenizer (RoBERTa
style, whose mask token does not swallow the space before it) and a WordPiece one (BERT
style), each with a 2-layer random masked LM. Where a ranking must be known, the LM
head's output bias is rigged so that a few tokens win every query, in a fixed order.
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
import torch
import yaml
from transformers import (
    AddedToken,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from kadapter import lama
from kadapter.config import ConfigError, load_config
from kadapter.io import InputError
from kadapter.modeling import AdapterConfig, KAdapterModel, KnowledgeAdapter, save_adapter

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LAMA = REPO / "data/sample/lama"
# Words of the hand-built vocabularies (a leading space = the mid-sentence form).
ROBERTA_WORDS = [" Paris", " Rome", " Vienna", " France", " Italy", " Austria", " French",
                 " German", " Italian", " Ulm", " Mexico", " in", " was", " born", " died", " .",
                 " the", " capital", " of", " is", " Einstein", " Mozart", " City", "The",
                 "Albert", "Wolfgang", "Paris", " a", " common", " name", " following", " city",
                 " language", " country", " :"]
BERT_WORDS = ["Paris", "Rome", "Vienna", "France", "Italy", "Austria", "French", "German",
              "Italian", "Ulm", "Mexico", "in", "was", "born", "died", ".", "the", "capital",
              "of", "is", "The", "Albert", "Einstein", "Wolfgang", "Mozart", "Jean", "Marais",
              "City", "a", "common", "name", "following", "city", "language", "country", ":",
              "##s", "##ian"]


# --------------------------------------------------------------------------- builders


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (space -> 'Ġ')."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_roberta_tokenizer(directory: Path, words: list[str]) -> Path:
    """vocab.json + merges.txt where each word of ``words`` is exactly one token."""
    byte_chars = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])}
    for char in byte_chars.values():
        vocab.setdefault(char, len(vocab))
    merges: list[str] = []
    # space-prefixed words first, so "Ġ P" outranks "P a" and " Paris" stays whole
    for word in sorted(words, key=lambda w: not w.startswith(" ")):
        pieces = [byte_chars[b] for b in word.encode()]
        current = pieces[0]
        for piece in pieces[1:]:
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            vocab.setdefault(current, len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    return directory


def write_bert_tokenizer(directory: Path, words: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": False}))
    return directory


def rig(masked_lm, tokenizer, words_in_order: list[str]) -> None:
    """Raise the LM head's output bias so ``words_in_order`` win every query, in that order."""
    tokens = lama.ProbeTokens(tokenizer)
    with torch.no_grad():
        bias = masked_lm.get_output_embeddings().bias
        for place, token_id in enumerate(tokens.word_ids(words_in_order)):
            bias[token_id] += 1e4 * (len(words_in_order) - place)


def build_toy(directory: Path, kind: str, rigged: list[str] = ()) -> Path:
    """A 2-layer random masked LM with a hand-built tokenizer, saved as a HF directory."""
    if kind == "roberta":
        write_roberta_tokenizer(directory, ROBERTA_WORDS)
    else:
        write_bert_tokenizer(directory, BERT_WORDS)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    if kind == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(pad_token_id=1, type_vocab_size=1,
                                                 max_position_embeddings=66, **common))
    else:
        model = BertForMaskedLM(BertConfig(pad_token_id=0, max_position_embeddings=64, **common))
    rig(model, tokenizer, list(rigged))
    model.save_pretrained(directory)
    return directory


def toy_adapters(config, seed: int = 3) -> dict[str, KnowledgeAdapter]:
    torch.manual_seed(seed)
    shape = AdapterConfig(positions=[0, 1, 2], adapter_size=16, num_transformer_layers=1)
    return {name: KnowledgeAdapter(shape, config.hidden_size, config.num_hidden_layers)
            for name in ("fac", "lin")}


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> Path:
    return build_toy(tmp_path_factory.mktemp("toy-roberta"), "roberta")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return build_toy(tmp_path_factory.mktemp("toy-bert"), "bert")


@pytest.fixture(scope="module")
def roberta_tokens(roberta_dir) -> lama.ProbeTokens:
    return lama.ProbeTokens(AutoTokenizer.from_pretrained(roberta_dir))


@pytest.fixture(scope="module")
def bert_tokens(bert_dir) -> lama.ProbeTokens:
    return lama.ProbeTokens(AutoTokenizer.from_pretrained(bert_dir))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fact(relation: str, sub: str, obj: str, votes: tuple[int, int] | None = None) -> lama.Fact:
    yes, other = votes if votes else (None, None)
    return lama.Fact(relation, sub, obj, "test", yes, other)


# ------------------------------------------------------------------- tokens and queries


def test_roberta_objects_are_the_space_prefixed_token(roberta_tokens):
    tokenizer = roberta_tokens.tokenizer
    assert roberta_tokens.space_prefixed
    (paris,) = roberta_tokens.word_ids(["Paris"])
    assert tokenizer.convert_ids_to_tokens(paris) == "ĠParis"
    assert paris != tokenizer.convert_tokens_to_ids("Paris")  # the sentence-initial form
    # not one token: split into pieces, or unknown to the vocabulary
    assert roberta_tokens.word_ids(["Parisian", "Paris Rome"]) == [None, None]


def test_bert_objects_are_the_plain_wordpiece(bert_tokens):
    tokenizer = bert_tokens.tokenizer
    assert not bert_tokens.space_prefixed
    (paris,) = bert_tokens.word_ids(["Paris"])
    assert tokenizer.convert_ids_to_tokens(paris) == "Paris"
    # "Parisian" -> Paris ##ian (two pieces); "Ulmer" -> [UNK] (one token, but not a word)
    assert bert_tokens.word_ids(["Parisian", "Ulmer"]) == [None, None]


@pytest.mark.parametrize("kind, expected", [
    ("roberta", ["<s>", "Albert", "ĠEinstein", "Ġwas", "Ġborn", "Ġin", "<mask>", "Ġ.", "</s>"]),
    ("bert", ["[CLS]", "Albert", "Einstein", "was", "born", "in", "[MASK]", ".", "[SEP]"]),
])
def test_query_masks_the_object_without_a_stray_space_token(kind, expected, roberta_tokens,
                                                           bert_tokens):
    tokens = roberta_tokens if kind == "roberta" else bert_tokens
    text, ids, mask_index = tokens.query("[X] was born in [Y] .", "Albert Einstein")
    assert text == f"Albert Einstein was born in {tokens.tokenizer.mask_token} ."
    assert tokens.tokenizer.convert_ids_to_tokens(ids) == expected
    assert ids[mask_index] == tokens.mask_id


def test_query_ids_match_a_tokenizer_whose_mask_absorbs_the_space(roberta_dir, roberta_tokens):
    # roberta-large's <mask> strips the space on its left; ours does not. Both give one query.
    absorbing = AutoTokenizer.from_pretrained(roberta_dir, mask_token=AddedToken("<mask>", lstrip=True))
    for template in ("[X] was born in [Y] .", "The capital of [X] is [Y] .", "[Y] is the capital of [X] ."):
        text, ids, _ = roberta_tokens.query(template, "Italy")
        assert absorbing(text)["input_ids"] == ids


# ------------------------------------------------------------------------------ readers


def test_sample_lama_data_reads_in_lama_layout():
    relations, template_only = lama.read_trex(SAMPLE_LAMA)
    assert [r.name for r in relations] == sorted(r.name for r in relations)
    assert sum(len(r.facts) for r in relations) == 252 and len(relations) == 10
    assert template_only == ["P1412"]  # a template without a facts file, as in LAMA
    google = lama.read_google_re(SAMPLE_LAMA)
    assert [r.name for r in google] == ["place_of_birth", "date_of_birth", "place_of_death"]
    assert sum(len(r.facts) for r in google) == 49
    assert google[1].template == "[X] (born [Y])."
    # the sample holds facts for every filter: LAMA-UHN's substring one included
    uhn = {(f.sub_label, f.obj_label) for r in relations for f in r.facts if lama.object_in_subject(f)}
    assert {("Leonardo da Vinci", "Vinci"), ("Mexico City", "Mexico")} <= uhn
    assert any(f.yes_votes <= f.other_votes for r in google for f in r.facts)


def test_real_lama_templates_and_common_vocab(shared_real, roberta_tokens, bert_tokens):
    templates = lama.read_templates(shared_real / "LAMA_relations.jsonl")
    assert len(templates) == 46 and templates["P19"] == "[X] was born in [Y] ."
    assert templates["P1923"] == "[Y] participated in the [X] ."  # object first
    for tokens in (roberta_tokens, bert_tokens):
        for template in templates.values():
            text, ids, mask_index = tokens.query(template, "Albert Einstein")
            assert ids.count(tokens.mask_id) == 1 and ids[mask_index] == tokens.mask_id
            assert text == template.replace("[X]", "Albert Einstein").replace("[Y]", tokens.tokenizer.mask_token)
    words = lama.read_common_vocab(shared_real / "common_vocab_cased.txt")
    assert len(words) == 21018 and "Paris" in words
    # the candidates are exactly the common words that are one token of the model
    vocabulary = lama.CommonVocabulary(words, bert_tokens)
    expected = {w for w in BERT_WORDS if w in set(words) and not w.startswith("##")}
    assert set(vocabulary.decoded.values()) == expected
    assert len(vocabulary.not_single_token) == len(words) - len(expected)


@pytest.mark.parametrize("name, content, problem", [
    ("TREx/P19.jsonl", '{"sub_label": "A", "obj_label": "B"}\nnot json\n', "line 2: not valid JSON"),
    ("TREx/P19.jsonl", '{"sub_label": "A"}\n', "line 1: 'obj_label' must be a non-empty string"),
    ("TREx/P19.jsonl", '{"sub_label": " ", "obj_label": "B"}\n', "'sub_label' must be a non-empty"),
    ("TREx/P19.jsonl", '{"predicate_id": "P20", "sub_label": "A", "obj_label": "B"}\n',
     "predicate_id 'P20' does not match"),
    ("TREx/P19.jsonl", '["A", "B"]\n', "expected a JSON object"),
    ("TREx/P999.jsonl", '{"sub_label": "A", "obj_label": "B"}\n', "relation P999 has no template"),
    ("relations.jsonl", '{"relation": "P19", "template": "[X] was born ."}\n', "template must hold"),
    ("relations.jsonl", '{"template": "[X] was born in [Y] ."}\n', "missing 'relation'"),
])
def test_bad_lama_records_name_file_and_line(tmp_path, name, content, problem):
    jsonl(tmp_path / "relations.jsonl", [{"relation": "P19", "template": "[X] was born in [Y] ."}])
    jsonl(tmp_path / "TREx/P19.jsonl", [{"sub_label": "A", "obj_label": "B"}])
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=problem) as err:
        lama.read_trex(tmp_path)
    assert name in str(err.value)


@pytest.mark.parametrize("judgments, problem", [
    ('"yes"', "'judgments' must be a list"),
    ('[{"rater": "1"}]', "'judgments' must be a list"),
])
def test_bad_google_re_judgments(tmp_path, judgments, problem):
    for name in lama.GOOGLE_RE_TEMPLATES:
        jsonl(tmp_path / f"Google_RE/{name}_test.jsonl", [{"sub_label": "A", "obj_label": "B"}])
    path = tmp_path / "Google_RE/date_of_birth_test.jsonl"
    path.write_text('{"sub_label": "A", "obj_label": "1879", "judgments": ' + judgments + "}\n")
    with pytest.raises(InputError, match=f"date_of_birth_test.jsonl, record line 1: {problem}"):
        lama.read_google_re(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="relations.jsonl"):
        lama.read_trex(tmp_path)
    with pytest.raises(FileNotFoundError, match="place_of_birth_test.jsonl"):
        lama.read_google_re(tmp_path)
    with pytest.raises(FileNotFoundError, match="common vocabulary"):
        lama.read_common_vocab(tmp_path / "common_vocab_cased.txt")


# ------------------------------------------------------------------------------ filters


@pytest.mark.parametrize("sub, obj, guessable", [
    ("Mexico City", "Mexico", True),
    ("Leonardo da Vinci", "Vinci", True),
    ("Tower of London", "london", True),       # lowercased on both sides
    ("Luxembourg", "Luxembourg", True),
    ("Albert Einstein", "Ulm", False),
    ("Paris", "Parisian", False),              # the object must lie inside the subject
])
def test_uhn_substring_filter(sub, obj, guessable):
    assert lama.object_in_subject(fact("P1376", sub, obj)) is guessable


def select(tokens, subset, facts, words, max_length=64, person_filter=None):
    relations = [lama.Relation(name, template, [f for f in facts if f.relation == name])
                 for name, template in (("P19", "[X] was born in [Y] ."),
                                        ("P1376", "[X] is the capital of [Y] ."),
                                        ("place_of_birth", "[X] was born in [Y] ."))]
    vocabulary = lama.CommonVocabulary(words, tokens)
    return lama.select_queries(subset, relations, tokens, vocabulary, max_length, person_filter)


@pytest.mark.parametrize("subset, facts, reasons", [
    # Google-RE, as LAMA: dropped only when the non-"yes" votes outnumber the "yes" ones;
    # ties and facts without votes are kept (distinct subjects: one fact per pair is kept)
    ("google_re", [fact("place_of_birth", f"Albert Einstein {i}", "Ulm", v) for i, v in
                   enumerate([(3, 0), (2, 1), (2, 2), (1, 3), (0, 0)])],
     [None, None, None, "judgments_majority_no", None]),
    # vocabulary filters, in order: one token first, then the common vocabulary
    ("trex", [fact("P19", "Albert Einstein", "Ulm"), fact("P19", "Albert Einstein", "Parisian"),
              fact("P19", "Albert Einstein", "Vienna"), fact("P19", "Albert Einstein", "Paris Rome")],
     [None, "object_not_single_token", "object_not_in_common_vocab", "object_not_single_token"]),
    # UHN adds its substring filter; the plain subset keeps those facts
    ("trex", [fact("P1376", "Mexico City", "Mexico"), fact("P1376", "Rome", "Italy")], [None, None]),
    ("uhn_trex", [fact("P1376", "Mexico City", "Mexico"), fact("P1376", "Rome", "Italy")],
     ["uhn_object_in_subject", None]),
])
def test_filters_drop_with_the_first_reason(roberta_tokens, subset, facts, reasons):
    words = ["Ulm", "Mexico", "Italy", "Parisian", "Paris Rome"]  # no Vienna
    kept, dropped = select(roberta_tokens, subset, facts, words)
    assert [d["reason"] for d in dropped] == [r for r in reasons if r]
    assert [(q.sub_label, q.obj_label) for q in kept] == [
        (f.sub_label, f.obj_label) for f, r in zip(facts, reasons) if r is None]
    for query in kept:  # the object is scored as its mid-sentence token
        assert query.object_id == roberta_tokens.word_ids([query.obj_label])[0]
        assert query.ids[query.mask_index] == roberta_tokens.mask_id


def test_google_re_votes_that_are_not_yes_count_against(tmp_path):
    for name in lama.GOOGLE_RE_TEMPLATES:
        jsonl(tmp_path / f"Google_RE/{name}_test.jsonl", [{
            "sub_label": "A", "obj_label": "B",
            "judgments": [{"judgment": "yes"}, {"judgment": "yes"}, {"judgment": "skip"}, {"judgment": "no"}]}])
    (first, *_) = [f for r in lama.read_google_re(tmp_path) for f in r.facts]
    assert (first.yes_votes, first.other_votes) == (2, 2)


def test_long_queries_are_dropped(roberta_tokens):
    facts = [fact("P19", "Albert Einstein", "Ulm"), fact("P19", "Albert", "Ulm")]
    kept, dropped = select(roberta_tokens, "trex", facts, ["Ulm"], max_length=8)
    assert [q.sub_label for q in kept] == ["Albert"] and len(kept[0].ids) <= 8
    assert [d["reason"] for d in dropped] == ["query_too_long"]


@pytest.fixture(scope="module")
def person_filter(tmp_path_factory) -> lama.PersonNameFilter:
    directory = build_toy(tmp_path_factory.mktemp("toy-bert-rigged"), "bert",
                          rigged=["French", "German", "Italian"])
    return lama.PersonNameFilter(BertForMaskedLM.from_pretrained(directory),
                                 AutoTokenizer.from_pretrained(directory), top_k=3)


def test_person_name_filter_drops_objects_guessable_from_a_name(person_filter, bert_tokens):
    # BERT's top 3 for every name question is French, German, Italian (rigged)
    facts = [fact("P103", "Jean Marais", "French"), fact("P19", "Jean Marais", "Paris"),
             fact("P27", "Wolfgang Mozart", "Italian"), fact("P1376", "Rome", "Italian"),
             fact("place_of_birth", "Albert Einstein", "German", (2, 0))]
    assert person_filter.matches(facts) == [True, False, True, False, True]
    questions = person_filter.top_tokens([("Marais", "language")])
    assert questions[("Marais", "language")] == {"French", "German", "Italian"}


def test_person_name_filter_only_in_uhn_subsets(person_filter, bert_tokens):
    facts = [fact("P19", "Albert Einstein", "German"), fact("P19", "Albert Einstein", "Ulm"),
             fact("P1376", "Rome", "Italian")]
    words = ["German", "Ulm", "Italian"]
    kept, dropped = select(bert_tokens, "trex", facts, words, person_filter=person_filter)
    assert len(kept) == 3 and not dropped
    kept, dropped = select(bert_tokens, "uhn_trex", facts, words, person_filter=person_filter)
    assert [q.obj_label for q in kept] == ["Ulm", "Italian"]
    assert dropped == [{"subset": "uhn_trex", "relation": "P19", "sub_label": "Albert Einstein",
                        "obj_label": "German", "reason": "uhn_person_name"}]


# ---------------------------------------------------------------------- ranking, metrics


@pytest.mark.parametrize("scores, object_id, top, rank", [
    ([0.1, 0.9, 0.5, 0.3], 9, [7, 9, 11, 3], 2),
    ([0.1, 0.9, 0.5, 0.3], 3, [7, 9, 11, 3], 4),
    ([0.5, 0.5, 0.2, 0.5], 3, [3, 7, 11, 9], 1),   # ties: smaller token id first
    ([0.5, 0.5, 0.2, 0.5], 7, [3, 7, 11, 9], 2),
    ([0.5, 0.5, 0.2, 0.5], 11, [3, 7, 11, 9], 3),
    ([0.5, 0.5, 0.2, 0.5], 9, [3, 7, 11, 9], 4),
])
def test_rank_candidates_with_fixed_scores(scores, object_id, top, rank):
    candidates = torch.tensor([3, 7, 9, 11])
    got_top, got_rank = lama.rank_candidates(torch.tensor([scores]), candidates,
                                             torch.tensor([object_id]), k=4)
    assert got_top.tolist() == [top] and got_rank.tolist() == [rank]


def test_rank_candidates_rejects_an_object_outside_the_candidates():
    with pytest.raises(ValueError, match="not among the candidates"):
        lama.rank_candidates(torch.zeros(1, 2), torch.tensor([3, 7]), torch.tensor([5]))


def test_metrics_per_relation_and_macro_mean():
    rows = [{"relation": "P19", "rank": r} for r in (1, 2, 20, 1)]
    rows += [{"relation": "P36", "rank": 40}, {"relation": "P36", "rank": 10}]
    summary = lama.summarise(rows)
    assert summary["per_relation"]["P19"] == {"facts": 4, "p@1": 0.5, "p@10": 0.75,
                                              "mrr": pytest.approx(2.55 / 4), "mrr@10": 0.625}
    assert summary["per_relation"]["P36"] == {"facts": 2, "p@1": 0.0, "p@10": 0.5,
                                              "mrr": pytest.approx(0.0625), "mrr@10": 0.05}
    # a subset's score is the mean over relations, not over facts
    assert summary["p@1"] == pytest.approx(0.25)
    assert summary["p@10"] == pytest.approx(0.625)
    assert summary["mrr@10"] == pytest.approx(0.3375)
    assert (summary["relations"], summary["facts_kept"]) == (2, 6)
    assert lama.summarise([])["p@1"] is None


# ----------------------------------------------------------------------- the MLM mix


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_untrained_mix_reproduces_the_encoders_mlm_head_exactly(kind, roberta_dir, bert_dir):
    directory = roberta_dir if kind == "roberta" else bert_dir
    masked_lm = (RobertaForMaskedLM if kind == "roberta" else BertForMaskedLM).from_pretrained(directory).eval()
    encoder, lm_head = lama.split_masked_lm(masked_lm)
    model = KAdapterModel(encoder, toy_adapters(encoder.config), frozen_adapters=("fac", "lin"))
    ids = torch.randint(5, masked_lm.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = masked_lm(input_ids=ids, attention_mask=mask).logits
        out = model(ids, mask)
        assert out.adapter_outputs["fac"].abs().sum() > 0  # the adapters do contribute features
        mixes = lama.VariantMixes(list(lama.VARIANTS), encoder.config.hidden_size)
        logits = lama.variant_logits(lm_head, mixes, list(lama.VARIANTS), out.last_hidden_state,
                                     out.adapter_outputs)
    for variant in lama.VARIANTS:
        assert torch.equal(logits[variant], expected), variant
    # once the mix moves away from [identity, zero], the adapters change the predictions
    with torch.no_grad():
        mixes.mixes["fac"].linear.weight[:, 32:] += 0.5
        moved = lama.variant_logits(lm_head, mixes, ["fac"], out.last_hidden_state, out.adapter_outputs)
    assert not torch.allclose(moved["fac"], expected)


def test_split_masked_lm_rejects_a_model_without_one_head():
    with pytest.raises(ValueError, match="expected an encoder"):
        lama.split_masked_lm(RobertaForMaskedLM(RobertaConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32)).roberta)


def test_masking_collator_is_seeded_and_masks_only_real_tokens(roberta_tokens):
    tokenizer = roberta_tokens.tokenizer
    blocks = [{"input_ids": [0] + list(range(5, 125)) + [2]}, {"input_ids": [0, 40, 41, 2]}] * 20
    first = lama.MaskingCollator(tokenizer, 0.15, seed=7)(blocks)
    again = lama.MaskingCollator(tokenizer, 0.15, seed=7)(blocks)
    assert all(torch.equal(first[k], again[k]) for k in first)
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(b["input_ids"]) for b in blocks],
                                             batch_first=True, padding_value=tokenizer.pad_token_id)
    chosen = first["labels"] != -100
    special = torch.isin(padded, torch.tensor(tokenizer.all_special_ids))
    assert not (chosen & special).any()
    assert torch.equal(first["labels"][chosen], padded[chosen])
    share = chosen.sum() / (~special).sum()
    assert 0.10 < share < 0.20
    masked = (first["input_ids"] == tokenizer.mask_token_id) & chosen
    assert 0.7 < masked.sum() / chosen.sum() < 0.9
    assert torch.equal(first["input_ids"][~chosen], padded[~chosen])
    # the masked positions come with the batch (no boolean selection on the device)
    assert torch.equal(torch.stack([first["masked_rows"], first["masked_cols"]], 1), chosen.nonzero())


def test_text_blocks_cut_the_token_stream(tmp_path, roberta_tokens):
    text = tmp_path / "wiki.train.txt"
    text.write_text(" = Paris = \n \n Paris is the capital of France . \n\n Rome is the capital of Italy . \n")
    blocks = lama.text_blocks([text], roberta_tokens.tokenizer, max_length=8)
    tokenizer = roberta_tokens.tokenizer
    stream = tokenizer([" = Paris = ", " Paris is the capital of France . ", " Rome is the capital of Italy . "],
                       add_special_tokens=False)["input_ids"]
    flat = [t for ids in stream for t in ids]
    assert [b["input_ids"][1:-1] for b in blocks] == [flat[i:i + 6] for i in range(0, len(flat), 6)]
    assert all(b["input_ids"][0] == 0 and b["input_ids"][-1] == 2 for b in blocks)
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(InputError, match="blank.txt: no text"):
        lama.text_blocks([tmp_path / "blank.txt"], tokenizer, 8)


# ------------------------------------------------------------------------- the stage


def write_probe_inputs(root: Path) -> dict[str, str]:
    """A LAMA directory, common vocabulary and raw text for the toy RoBERTa."""
    lama_dir = root / "lama"
    jsonl(lama_dir / "relations.jsonl", [
        {"relation": "P19", "template": "[X] was born in [Y] ."},
        {"relation": "P36", "template": "The capital of [X] is [Y] ."},
        {"relation": "P1376", "template": "[X] is the capital of [Y] ."},
        {"relation": "P37", "template": "The official language of [X] is [Y] ."}])
    jsonl(lama_dir / "TREx/P19.jsonl", [{"predicate_id": "P19", "sub_label": s, "obj_label": o} for s, o in
                                       [("Albert Einstein", "Ulm"), ("Wolfgang Mozart", "Vienna"),
                                        ("Albert", "Paris"), ("Wolfgang", "Rome")]])
    jsonl(lama_dir / "TREx/P36.jsonl", [{"sub_label": s, "obj_label": o} for s, o in
                                       [("France", "Paris"), ("Italy", "Rome"), ("Austria", "Vienna"),
                                        ("Mexico", "Mexico City")]])
    jsonl(lama_dir / "TREx/P1376.jsonl", [{"sub_label": s, "obj_label": o} for s, o in
                                         [("Paris", "France"), ("Mexico City", "Mexico"),
                                          ("Vienna", "Austria")]])
    votes = {"yes": [{"judgment": "yes"}] * 2, "no": [{"judgment": "no"}] * 2}
    for name, rows in {"place_of_birth": [("Albert Einstein", "Ulm", "yes"), ("Mozart", "Paris", "no")],
                       "date_of_birth": [("Albert Einstein", "Rome", "yes")],
                       "place_of_death": [("Wolfgang Mozart", "Vienna", "yes"),
                                          ("Albert Einstein", "Paris", "yes")]}.items():
        jsonl(lama_dir / f"Google_RE/{name}_test.jsonl",
              [{"sub_label": s, "obj_label": o, "judgments": votes[v]} for s, o, v in rows])
    vocab = root / "common_vocab_cased.txt"
    vocab.write_text("\n".join(["Paris", "Rome", "Vienna", "Ulm", "France", "Italy", "German",
                                "Parisian", "Mexico"]) + "\n")
    text = root / "text.txt"
    text.write_text("\n".join([" Albert Einstein was born in Ulm . The capital of Italy is Rome ."] * 12) + "\n")
    return {"lama_dir": str(lama_dir), "common_vocab": str(vocab), "text": str(text)}


def write_config(root: Path, model_dir: Path, inputs: dict[str, str], **lama_overrides) -> Path:
    adapters = {}
    encoder_config = RobertaForMaskedLM.from_pretrained(model_dir).config
    for name, adapter in toy_adapters(encoder_config).items():
        adapters[f"{name}_adapter"] = str(save_adapter(
            root / f"{name}-adapter", adapter, base_model=str(model_dir),
            encoder_config=encoder_config, task={"name": name}))
    section = {"lama_dir": inputs["lama_dir"], "common_vocab": inputs["common_vocab"],
               "output_dir": str(root / "out"), "batch_size": 3, **adapters,
               "mlm_head": {"text": inputs["text"], "dev_text": inputs["text"], "max_length": 16,
                            "batch_size": 4, "epochs": 1, "learning_rate": 1e-3, "log_every": 1}}
    section.update(lama_overrides)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"preset": "test", "seed": 5,
                                    "model": {"name_or_path": str(model_dir)}, "lama": section}))
    return path


def read_rows(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def rigged_roberta_dir(tmp_path_factory) -> Path:
    # every query: Paris first, Rome second, Vienna third; the rest after them
    return build_toy(tmp_path_factory.mktemp("toy-roberta-rigged"), "roberta",
                     rigged=["Paris", "Rome", "Vienna"])


def test_stage_scores_known_rankings_and_writes_recomputable_outputs(tmp_path, rigged_roberta_dir):
    inputs = write_probe_inputs(tmp_path)
    config = load_config(write_config(tmp_path, rigged_roberta_dir, inputs))
    results = lama.run_lama(config)
    out = tmp_path / "out"

    facts = results["facts"]
    assert facts["trex"]["read"] == 11 and facts["trex"]["kept"] == 9
    assert facts["trex"]["dropped_by_reason"] == {"object_not_single_token": 1, "object_not_in_common_vocab": 1}
    assert facts["uhn_trex"]["dropped_by_reason"]["uhn_object_in_subject"] == 1
    assert facts["trex"]["relations_without_facts_file"] == ["P37"]
    assert facts["google_re"]["dropped_by_reason"] == {"judgments_majority_no": 1}

    # ranks follow the rigged bias: Paris 1, Rome 2, Vienna 3, anything else beyond 3
    encoder = read_rows(out / "trex/encoder/predictions.jsonl")
    assert [r["relation"] for r in encoder] == ["P1376"] * 2 + ["P19"] * 4 + ["P36"] * 3
    rigged = {"Paris": 1, "Rome": 2, "Vienna": 3}
    for row in encoder:
        assert row["top10"][:3] == ["Paris", "Rome", "Vienna"]
        assert row["rank"] == rigged[row["obj_label"]] if row["obj_label"] in rigged else row["rank"] > 3
    assert encoder[2]["query"] == "Albert Einstein was born in <mask> ."
    p19 = results["subsets"]["trex"]["encoder"]["per_relation"]["P19"]
    assert p19["p@1"] == 0.25 and p19["facts"] == 4
    p36 = results["subsets"]["trex"]["encoder"]["per_relation"]["P36"]
    assert p36 == {"facts": 3, "p@1": 1 / 3, "p@10": 1.0, "mrr": pytest.approx((1 + 1 / 2 + 1 / 3) / 3),
                   "mrr@10": pytest.approx((1 + 1 / 2 + 1 / 3) / 3)}

    # every number is recomputed from predictions.jsonl; kept + dropped = read
    for subset in lama.SUBSETS:
        dropped = read_rows(out / subset / "dropped.jsonl")
        assert len(dropped) + facts[subset]["kept"] == facts[subset]["read"]
        for variant in lama.VARIANTS:
            rows = read_rows(out / subset / variant / "predictions.jsonl")
            summary = lama.summarise(rows)
            summary["facts_dropped"] = len(dropped)
            assert results["subsets"][subset][variant] == summary
    assert json.loads((out / "results.json").read_text())["subsets"] == results["subsets"]
    table = (out / "results.md").read_text()
    assert "| LAMA-T-REx | 3 | 9 / 11 |" in table
    assert "person-name filter: did not run (no lama.bert_model configured)" in table
    assert (out / "p_at_1.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["object_token_form"] == "space-prefixed"
    assert manifest["counts"]["candidates"] == 8  # "Parisian" is not one token
    assert results["mlm_head"]["trained"] and set(results["mlm_head"]["dev_mlm_loss"]) == {
        f"mlm_loss/{v}" for v in lama.VARIANTS}
    assert (out / "mlm_head/mix.safetensors").is_file() and not (out / "mlm_head/checkpoints").exists()


def test_stage_is_deterministic_and_untrained_mix_equals_encoder(tmp_path, roberta_dir):
    inputs = write_probe_inputs(tmp_path)
    outputs = []
    for run in ("a", "b"):
        config_path = write_config(tmp_path, roberta_dir, inputs, output_dir=str(tmp_path / run),
                                   subsets=["trex"], train_mlm_head=run == "b")
        lama.run_lama(load_config(config_path))
        outputs.append(tmp_path / run)
    untrained, trained = outputs
    encoder = (untrained / "trex/encoder/predictions.jsonl").read_bytes()
    for variant in ("fac", "lin", "fac+lin"):  # [identity, zero]: the encoder's own predictions
        assert (untrained / "trex" / variant / "predictions.jsonl").read_bytes() == encoder
    assert (trained / "trex/encoder/predictions.jsonl").read_bytes() == encoder
    # same inputs and seed -> same bytes
    lama.run_lama(load_config(write_config(tmp_path, roberta_dir, inputs, output_dir=str(tmp_path / "c"),
                                           subsets=["trex"], train_mlm_head=True)))
    for name in ("results.json", "results.md", "trex/fac+lin/predictions.jsonl", "mlm_head/mix.safetensors"):
        assert (tmp_path / "c" / name).read_bytes() == (trained / name).read_bytes(), name


def test_stage_names_a_missing_adapter_and_its_make_target(tmp_path, roberta_dir):
    inputs = write_probe_inputs(tmp_path)
    config = load_config(write_config(tmp_path, roberta_dir, inputs, variants=["encoder", "lin"],
                                      lin_adapter=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=r"lin adapter .*nowhere.*make pretrain-lin"):
        lama.run_lama(config)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_stage_rejects_an_adapter_of_another_encoder(tmp_path, roberta_dir):
    inputs = write_probe_inputs(tmp_path)
    config = load_config(write_config(tmp_path, roberta_dir, inputs, variants=["fac"]))
    other = RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    shape = AdapterConfig(positions=[0, 1, 2], adapter_size=16, num_transformer_layers=1)
    save_adapter(config.lama.fac_adapter, KnowledgeAdapter(shape, 16, 2), base_model="other",
                 encoder_config=other, task={"name": "fac"})
    with pytest.raises(InputError, match=r"fac-adapter: adapter does not fit this encoder \(hidden_size"):
        lama.run_lama(config)


def test_stage_with_person_name_filter(tmp_path, roberta_dir):
    bert = build_toy(tmp_path / "bert", "bert", rigged=["Ulm", "Vienna", "German"])
    inputs = write_probe_inputs(tmp_path)
    results = lama.run_lama(load_config(write_config(
        tmp_path, roberta_dir, inputs, variants=["encoder"], subsets=["trex", "uhn_trex", "uhn_google_re"],
        bert_model=str(bert))))
    # P19 (city): Ulm and Vienna are guessable from the rigged BERT; P36 is not a person relation
    assert results["facts"]["uhn_trex"]["dropped_by_reason"]["uhn_person_name"] == 2
    assert results["facts"]["uhn_google_re"]["dropped_by_reason"]["uhn_person_name"] == 2
    assert "uhn_person_name" not in results["facts"]["trex"]["dropped_by_reason"]
    assert results["person_name_filter"]["ran"]
    assert (f"person-name filter: ran with {bert} (top 3) and removed 4 facts "
            "(LAMA-UHN-Google-RE 2, LAMA-UHN-T-REx 2)") in (tmp_path / "out/results.md").read_text()


@pytest.mark.parametrize("override, problem", [
    ({"variants": []}, "must not be empty"),
    ({"subsets": ["trex", "trex"]}, "duplicates"),
    ({"variants": ["encoder", "fac+ent"]}, "is not one of"),
    ({"mlm_head": {"mask_probability": 1.5}}, "mask_probability"),
])
def test_bad_lama_config_is_a_config_error(tmp_path, override, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"preset": "x", "lama": override}))
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


@pytest.mark.parametrize("preset", ["sample", "paper"])
def test_presets_hold_a_lama_section(preset):
    config = load_config(REPO / f"configs/{preset}.yaml")
    assert config.lama.output_dir == f"runs/{preset}/lama"
    assert config.lama.mlm_head.epochs == 2


def test_queries_beyond_the_position_table_are_dropped_not_crashed(tmp_path, roberta_dir):
    # The toy RoBERTa sets no model_max_length and has 66 positions, of which RoBERTa uses 64
    # (position ids start after the pad id). With the template, a subject of n tokens makes a
    # query of n + 7: 57 tokens -> 64 (kept), 58 -> 65 (too long for the encoder).
    inputs = write_probe_inputs(tmp_path)
    jsonl(Path(inputs["lama_dir"]) / "TREx/P19.jsonl",
          [{"sub_label": "Albert" + " Einstein" * words, "obj_label": "Ulm"} for words in (56, 57)])
    results = lama.run_lama(load_config(write_config(tmp_path, roberta_dir, inputs, variants=["encoder"],
                                                     subsets=["trex"])))
    assert results["facts"]["trex"]["per_relation"]["P19"] == {
        "read": 2, "kept": 1, "dropped_by_reason": {"query_too_long": 1}}
    (kept,) = [r for r in read_rows(tmp_path / "out/trex/encoder/predictions.jsonl")
               if r["relation"] == "P19"]
    assert kept["sub_label"].count("Einstein") == 56


def test_predictions_hold_the_full_rank_and_mrr_counts_beyond_10(tmp_path):
    # twelve rigged winners: Ulm, the twelfth, ranks 12 for every P19 query of Einstein
    words = ["Paris", "Rome", "Vienna", "France", "Italy", "Austria", "German", "Italian",
             "Mexico", "capital", "born", "Ulm"]
    model_dir = build_toy(tmp_path / "rigged12", "roberta", rigged=words)
    inputs = write_probe_inputs(tmp_path)
    Path(inputs["common_vocab"]).write_text("\n".join(words) + "\n")
    results = lama.run_lama(load_config(write_config(tmp_path, model_dir, inputs, variants=["encoder"],
                                                     subsets=["trex"], train_mlm_head=False)))
    rows = read_rows(tmp_path / "out/trex/encoder/predictions.jsonl")
    assert [r["rank"] for r in rows if r["obj_label"] == "Ulm"] == [12]
    p19 = results["subsets"]["trex"]["encoder"]["per_relation"]["P19"]
    ranks = [r["rank"] for r in rows if r["relation"] == "P19"]
    assert p19["mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))
    assert p19["mrr@10"] == pytest.approx(sum(1 / r for r in ranks if r <= 10) / len(ranks))
    assert p19["mrr"] > p19["mrr@10"]


def test_a_configured_bert_model_that_is_missing_is_a_clear_error(tmp_path, roberta_dir):
    from kadapter.modeling import ModelNotAvailable

    inputs = write_probe_inputs(tmp_path)
    config = load_config(write_config(tmp_path, roberta_dir, inputs, variants=["encoder"],
                                      subsets=["uhn_trex"], bert_model=str(tmp_path / "no/bert")))
    with pytest.raises(ModelNotAvailable, match=r"lama.bert_model .*person-name filter.*--lama.bert_model null"):
        lama.run_lama(config)
def test_dev_blocks_are_masked_once(tiny_model_dir):
    """The MLM mix's dev loss compares like with like: the same masks at every evaluation,
    and evaluating draws nothing from the training masks' generator."""
    from kadapter.lama import MaskingCollator, masked_once
    from kadapter.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    blocks = [{"input_ids": tokenizer("the cat sat on the mat " * 6)["input_ids"]} for _ in range(3)]
    dev = masked_once(blocks, tokenizer, 0.3, seed=5)
    assert dev == masked_once(blocks, tokenizer, 0.3, seed=5)
    assert any(label != -100 for label in dev[0]["labels"])
    collator = MaskingCollator(tokenizer, 0.3, seed=1)
    first = collator(dev)
    untouched = MaskingCollator(tokenizer, 0.3, seed=1)
    assert first["labels"].tolist() == collator(dev)["labels"].tolist()  # same masks again
    assert collator(blocks)["labels"].tolist() == untouched(blocks)["labels"].tolist()
