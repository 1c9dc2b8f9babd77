"""Evaluation as the field's reference code does it (issue 12), each rule shown on a
hand-made case built from what the reference does:

- LAMA: facebookresearch/LAMA ``scripts/batch_eval_KB_completion.py`` (Google-RE
  judgments, one fact per distinct pair), ``lama/evaluation_metrics.py`` (MRR),
  ``scripts/create_lama_uhn.py`` (the person-name filter compares token strings);
- fine-tuning: microsoft/K-Adapter ``examples/run_finetune_*_adapter.py`` (FIGER's
  prediction rule, the heads, the combining layers, dropout in the frozen adapters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from kadapter import lama
from kadapter.io import read_jsonl

TEMPLATE_WORDS = ["was", "born", "in", "died", "is", "made", "by", "developed", "produced", "."]


def bert_tokens(directory: Path, words: list[str], lowercase: bool = False) -> lama.ProbeTokens:
    """A WordPiece (BERT-style) tokenizer whose vocabulary is ``words``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TEMPLATE_WORDS, *words])
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase}))
    return lama.ProbeTokens(AutoTokenizer.from_pretrained(directory))


def fact(relation: str, sub: str, obj: str, votes: tuple[int, int] | None = None) -> lama.Fact:
    yes, other = votes if votes else (None, None)
    return lama.Fact(relation, sub, obj, "test", yes, other)


def select(tokens: lama.ProbeTokens, subset: str, relation: str, template: str,
           facts: list[lama.Fact], words: list[str]):
    vocabulary = lama.CommonVocabulary(words, tokens)
    return lama.select_queries(subset, [lama.Relation(relation, template, facts)], tokens,
                               vocabulary, max_length=512)


# ---------------------------------------------------------------------------- LAMA


def test_google_re_keeps_ties_and_facts_without_judgments(tmp_path):
    # LAMA drops a Google-RE fact only when num_no > num_yes. Real case:
    # place_of_birth "Oscar O'Brien" -> Ottawa has 3 yes / 3 no, and LAMA scores it.
    tokens = bert_tokens(tmp_path / "bert", ["Ottawa", "Ulm", "Vienna"])
    facts = [fact("place_of_birth", "Oscar O'Brien", "Ottawa", (3, 3)),
             fact("place_of_birth", "Albert Einstein", "Ulm", (0, 0)),
             fact("place_of_birth", "Wolfgang Mozart", "Vienna", (2, 3))]
    kept, dropped = select(tokens, "google_re", "place_of_birth", "[X] was born in [Y] .", facts,
                           ["Ottawa", "Ulm", "Vienna"])
    assert [q.sub_label for q in kept] == ["Oscar O'Brien", "Albert Einstein"]
    assert [(d["sub_label"], d["reason"]) for d in dropped] == [("Wolfgang Mozart", "judgments_majority_no")]


def test_one_fact_per_distinct_pair_chosen_after_the_filters(tmp_path):
    # LAMA filters the samples first, then keeps the first of each (sub, obj) pair among
    # those left: a copy whose judgments drop it does not hide a later copy that is kept.
    tokens = bert_tokens(tmp_path / "bert", ["Exeter", "Ulm"])
    facts = [fact("place_of_death", "John Flavel", "Exeter", (1, 4)),
             fact("place_of_death", "John Flavel", "Exeter", (5, 0)),
             fact("place_of_death", "John Flavel", "Exeter", (5, 0)),
             fact("place_of_death", "John Flavel", "Ulm", (5, 0))]
    kept, dropped = select(tokens, "google_re", "place_of_death", "[X] died in [Y] .", facts,
                           ["Exeter", "Ulm"])
    assert [(q.sub_label, q.obj_label) for q in kept] == [("John Flavel", "Exeter"), ("John Flavel", "Ulm")]
    assert [d["reason"] for d in dropped] == ["judgments_majority_no", "duplicate"]


def real_facts(path: Path, relation: str, google_re: bool) -> list[lama.Fact]:
    return [lama.read_fact(record, path, number, relation, google_re)
            for number, record in read_jsonl(path)]


@pytest.mark.parametrize("file, relation, template, google_re, lines, distinct", [
    ("Google_RE/place_of_death_test.jsonl", "place_of_death", "[X] died in [Y] .", True, 766, 765),
    ("TREx/P176.jsonl", "P176", "[X] is produced by [Y] .", False, 982, 973),
])
def test_real_lama_files_score_one_fact_per_distinct_pair(shared_real, tmp_path, file, relation,
                                                           template, google_re, lines, distinct):
    path = shared_real / "lama" / file
    facts = real_facts(path, relation, google_re)
    assert len(facts) == lines and len({(f.sub_label, f.obj_label) for f in facts}) == distinct
    # every one-word object is a token and a common word, so only the duplicates go
    objects = sorted({f.obj_label for f in facts if f.obj_label.isalpha()})
    tokens = bert_tokens(tmp_path / "bert", objects)
    kept, dropped = select(tokens, "google_re" if google_re else "trex", relation, template,
                           facts, objects)
    reasons = lama.count_reasons(dropped)
    assert reasons["duplicate"] == lines - distinct
    assert len(kept) + len(dropped) == lines
    assert len(kept) == len({(f.sub_label, f.obj_label) for f in facts if f.obj_label.isalpha()})


def test_mrr_is_lamas_over_the_ranking_and_mrr_at_10_keeps_its_name():
    # LAMA: MRR = 1/rank wherever the object is found among the top 10,000 candidates
    rows = [{"relation": "P19", "rank": r} for r in (1, 4, 20, 10_001)]
    summary = lama.summarise(rows)
    assert summary["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 20) / 4)
    assert summary["mrr@10"] == pytest.approx((1 + 1 / 4) / 4)
    assert summary["p@10"] == 0.5


class FakeBert(torch.nn.Module):
    """A masked LM whose logits at every position rank ``winners`` first, in order."""

    def __init__(self, vocab_size: int, winners: list[int]):
        super().__init__()
        self.bias = torch.zeros(vocab_size)
        for place, token_id in enumerate(winners):
            self.bias[token_id] = float(len(winners) - place)

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1).clone())


def test_person_name_filter_compares_the_object_label_with_bert_token_strings(tmp_path):
    # create_lama_uhn.py lowercases both labels for an uncased BERT and tests
    # `obj_label in convert_ids_to_tokens(top_k_ids)`: "Zürich" is not the token "zurich"
    # (the tokenizer strips the accent, the filter does not), "Paris" is "paris".
    tokens = bert_tokens(tmp_path / "bert", ["zurich", "paris", "german", "hans"], lowercase=True)
    tokenizer = tokens.tokenizer
    winners = tokenizer.convert_tokens_to_ids(["zurich", "paris", "german"])
    person = lama.PersonNameFilter(FakeBert(len(tokenizer), winners), tokenizer, top_k=3)
    facts = [fact("P19", "Hans Meier", "Zürich"), fact("P19", "Hans Meier", "Paris"),
             fact("P1376", "Hans Meier", "Paris")]
    assert person.matches(facts) == [False, True, False]
    assert person.top_tokens([("hans", "city")])[("hans", "city")] == {"zurich", "paris", "german"}


def test_paper_preset_says_which_positions_the_original_scripts_ran(repo_root):
    line = next(line for line in (repo_root / "configs/paper.yaml").read_text().splitlines()
                if line.strip().startswith("positions:"))
    assert "[0, 11, 23]" in line and "0,11,22" in line and "original" in line
