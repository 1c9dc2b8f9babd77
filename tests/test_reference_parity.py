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


# ---------------------------------------------------------------------- fine-tuning

GOOD_TYPING = {"sent": "Ada met Bob .", "start": 0, "end": 3, "labels": ["person"]}
GOOD_TACRED = {"id": "r1", "relation": "per:spouse", "token": ["Ada", "met", "Bob", "."],
               "subj_start": 0, "subj_end": 0, "obj_start": 2, "obj_end": 2}
GOOD_CSQA = {"id": "q1", "answerKey": "A", "question": {
    "stem": "Which?", "choices": [{"label": "A", "text": "this"}, {"label": "B", "text": "that"}]}}
COSMOS_ROW = {"id": "c1", "context": "Mei worked a double shift, then walked home.\nShe slept at once.",
              "question": "Why was Mei tired ?", "answer0": "She had worked a lot .",
              "answer1": "She had flown in .", "answer2": "None of the above choices .",
              "answer3": "The baby cried .", "label": "0"}


@pytest.mark.parametrize("logits, expected", [
    ([-1.0, -0.5, -0.5, -2.0], ["b", "c"]),       # no positive logit: every type tied at the top
    ([0.3, 2.0, 2.0, -1.0], ["a", "b", "c"]),     # positives, the tie at the top among them
    ([-1.0, -0.5, -0.7, -2.0], ["b"]),            # a single maximum
])
def test_figer_keeps_every_type_tied_at_the_maximum(logits, expected):
    from kadapter.tasks import TASKS

    # run_finetune_figer_adapter.py: `if x1[i] > 0 or x1[i] == top` with top = max(x1)
    assert TASKS["figer"].decode(torch.tensor(logits), ["a", "b", "c", "d"], None) == expected
    assert TASKS["typing"].decode(torch.tensor(logits), ["a", "b", "c", "d"], None) == [
        label for label, value in zip("abcd", logits) if value > 0]


def write_cosmos_csv(path: Path, rows: list[dict], fields: tuple[str, ...] | None = None) -> Path:
    import csv

    from kadapter.tasks import COSMOS_FIELDS

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields or COSMOS_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cosmosqa_release_csv_is_read(tmp_path):
    from kadapter.tasks import TASKS, read_cosmosqa

    path = write_cosmos_csv(tmp_path / "train.csv", [COSMOS_ROW, {**COSMOS_ROW, "id": "c2", "label": "3"}])
    first, second = read_cosmosqa(path)
    assert (first.id, first.answer, second.id, second.answer) == ("c1", "0", "c2", "3")
    assert first.context == COSMOS_ROW["context"]  # the quoted newline and comma survive
    assert first.choices[2] == "None of the above choices ."
    # a data directory holding the release: its CSV files are the defaults
    write_cosmos_csv(tmp_path / "valid.csv", [COSMOS_ROW])
    assert TASKS["cosmosqa"].default_files(tmp_path) == ("train.csv", "valid.csv", "test.jsonl")
    assert TASKS["cosmosqa"].default_files(tmp_path / "elsewhere") == ("train.jsonl", "valid.jsonl", "test.jsonl")


def test_cosmosqa_leaderboard_labels_come_from_the_lst_file(tmp_path):
    from kadapter.io import InputError
    from kadapter.tasks import read_cosmosqa

    unlabelled = {k: v for k, v in COSMOS_ROW.items() if k != "label"}
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps({**unlabelled, "id": f"c{i}"}) + "\n" for i in range(3)))
    assert [e.answer for e in read_cosmosqa(path)] == [None, None, None]  # a test file, say
    (tmp_path / "valid-labels.lst").write_text("2\n0\n3\n")
    assert [e.answer for e in read_cosmosqa(path)] == ["2", "0", "3"]
    (tmp_path / "valid-labels.lst").write_text("2\n0\n")
    with pytest.raises(InputError, match=r"valid-labels.lst: 2 labels for the 3 records of valid.jsonl"):
        read_cosmosqa(path)


@pytest.mark.parametrize("split, name, purpose", [("train", "train.jsonl", "train on"),
                                                  ("dev", "valid.jsonl", "select the model with")])
def test_an_unlabelled_split_used_for_training_or_selection_is_a_one_line_error(tmp_path, split, name,
                                                                                purpose):
    from kadapter.finetune import TaskConfig, data_files, read_splits
    from kadapter.io import InputError
    from kadapter.tasks import TASKS

    task = TASKS["cosmosqa"]
    unlabelled = {k: v for k, v in COSMOS_ROW.items() if k != "label"}
    for each in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        rows = [unlabelled if each == name or each == "test.jsonl" else COSMOS_ROW] * 2
        (tmp_path / each).write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = TaskConfig(data_dir=str(tmp_path))
    with pytest.raises(InputError) as info:
        read_splits(task, settings, data_files(task, settings, "cosmosqa"))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}: 2 of 2 records have no label, but this file is "
                              f"used to {purpose}") and "-labels.lst" in message and "\n" not in message


BAD_RECORDS = {
    # reader: (file name, write, good record, [(bad record, reason)])
    "typing": ("dev.json", [({**GOOD_TYPING, "end": 40}, "span_out_of_range"),
                            ({**GOOD_TYPING, "start": 2, "end": 2}, "empty_span"),
                            ({**GOOD_TYPING, "labels": ["persn"]}, "unknown_label")]),
    "figer": ("dev.json", [({**GOOD_TYPING, "start": -1}, "span_out_of_range")]),
    "tacred": ("dev.json", [({**GOOD_TACRED, "obj_start": 0, "obj_end": 1}, "overlapping_spans"),
                            ({**GOOD_TACRED, "obj_start": 3, "obj_end": 2}, "empty_span"),
                            ({**GOOD_TACRED, "obj_end": 9}, "span_out_of_range"),
                            ({**GOOD_TACRED, "relation": "per:wife"}, "unknown_label")]),
    "csqa": ("dev_rand_split.jsonl", [({**GOOD_CSQA, "answerKey": "E"}, "unknown_label"),
                                      ("{oops", "invalid_json")]),
    "cosmosqa": ("valid.jsonl", [({**COSMOS_ROW, "label": 7}, "unknown_label"),
                                 ({k: v for k, v in COSMOS_ROW.items() if k != "answer2"}, "missing_field")]),
}
GOOD = {"typing": GOOD_TYPING, "figer": GOOD_TYPING, "tacred": GOOD_TACRED, "csqa": GOOD_CSQA,
        "cosmosqa": COSMOS_ROW}


def write_split(path: Path, records: list) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


@pytest.mark.parametrize("task_name", sorted(BAD_RECORDS))
def test_on_error_skip_counts_bad_records_and_raise_names_them(tmp_path, task_name):
    from kadapter.finetune import TaskConfig, data_files, read_splits
    from kadapter.io import InputError
    from kadapter.tasks import TASKS, SkippedRecords

    task = TASKS[task_name]
    name, bad = BAD_RECORDS[task_name]
    for each in task.files:
        write_split(tmp_path / each, [GOOD[task_name]] * 2)
    # the good record first and between the bad ones: records 0, 2, 4... are good
    records = [GOOD[task_name]]
    for record, _ in bad:
        records += [record, GOOD[task_name]]
    write_split(tmp_path / name, records)
    # FIGER's types are checked against a configured vocabulary (issue 11)
    vocabulary = {"labels": GOOD_TYPING["labels"]} if task_name == "figer" else {}
    raising = TaskConfig(data_dir=str(tmp_path), **vocabulary)
    with pytest.raises(InputError) as info:
        read_splits(task, raising, data_files(task, raising, task_name))
    assert str(info.value).startswith(f"{tmp_path / name}, record ")
    assert str(info.value).endswith(f"set --finetune.{task_name}.on_error skip)")

    skipping = TaskConfig(data_dir=str(tmp_path), on_error="skip", **vocabulary)
    skipped = SkippedRecords()
    examples = read_splits(task, skipping, data_files(task, skipping, task_name), skipped)
    assert len(examples["dev"]) == len(bad) + 1 and len(examples["train"]) == 2
    summary = skipped.summary()
    reasons = [reason for _, reason in bad]
    assert summary["total"] == len(bad)
    assert summary["by_reason"] == {r: reasons.count(r) for r in sorted(set(reasons))}
    assert [(f["file"], f["reason"]) for f in summary["first"]] == [(str(tmp_path / name), r) for r in reasons]
    assert summary["by_file"] == {str(tmp_path / name): len(bad)}


def test_on_error_skip_lists_only_the_first_20_locations(tmp_path):
    from kadapter.tasks import SkippedRecords, read_tacred

    path = tmp_path / "train.json"
    path.write_text(json.dumps([{**GOOD_TACRED, "id": f"r{i}", "obj_end": 9} for i in range(25)] + [GOOD_TACRED]))
    skipped = SkippedRecords()
    assert len(read_tacred(path, skipped=skipped)) == 1
    summary = skipped.summary()
    assert summary["total"] == 25 and summary["by_reason"] == {"span_out_of_range": 25}
    assert [f["record"] for f in summary["first"]] == [f"{i} (id r{i})" for i in range(20)]


@pytest.mark.parametrize("classifier", ["linear", "original"])
def test_mention_head_classifier(classifier):
    from kadapter.tasks import MentionHead

    torch.manual_seed(0)
    head = MentionHead(8, 5, 2, 0.1, "marker", classifier).eval()
    features = torch.randn(3, 6, 8)
    batch = {"span_start": torch.tensor([[1, 3]] * 3), "span_end": torch.tensor([[2, 4]] * 3),
             "marker": torch.tensor([[0, 2]] * 3)}
    pooled = torch.cat([features[:, 0], features[:, 2]], dim=-1)
    if classifier == "original":
        # the original: out_proj(dropout(dense(x))), dense 2H -> H, no nonlinearity
        assert (head.dense.weight.shape, head.out_proj.weight.shape) == ((8, 16), (5, 8))
        expected = head.out_proj(head.dense(pooled))
    else:
        assert head.out.weight.shape == (5, 16) and not hasattr(head, "dense")
        expected = head.out(pooled)
    torch.testing.assert_close(head(features, batch), expected)


def test_single_adapter_concat_has_only_the_per_adapter_layer():
    from kadapter.modeling import Combiner

    torch.manual_seed(0)
    one = Combiner(["fac"], 8, "concat")
    assert not hasattr(one, "out") and sorted(n for n, _ in one.named_parameters()) == [
        "per_adapter.fac.bias", "per_adapter.fac.weight"]
    last, fac = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(one(last, {"fac": fac}), one.per_adapter["fac"](torch.cat([last, fac], -1)))
    assert Combiner(["fac", "lin"], 8, "concat").out.weight.shape == (8, 16)


@pytest.mark.parametrize("adapter_dropout", [False, True])
def test_adapter_dropout_option(adapter_dropout):
    from transformers import RobertaConfig, RobertaModel

    from kadapter.finetune import FinetuneModel
    from kadapter.modeling import AdapterConfig, KnowledgeAdapter
    from kadapter.tasks import ChoiceHead

    encoder = RobertaModel(RobertaConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=32), add_pooling_layer=False)
    adapter = KnowledgeAdapter(AdapterConfig(positions=[0, 2], adapter_size=16, num_transformer_layers=1), 16, 2)
    model = FinetuneModel(encoder, {"fac": adapter}, ChoiceHead(16, 0.1), "concat", adapter_dropout).train()
    # the original never puts its frozen adapters in eval mode: their dropout stays on
    assert all(m.training == adapter_dropout for m in adapter.modules())
    assert encoder.training and not any(p.requires_grad for p in adapter.parameters())
    model.eval()
    assert not any(m.training for m in model.modules())


def test_figer_run_manifest_counts_types_truncation_and_skipped_records(tmp_path, repo_root, tiny_model_dir):
    import yaml
    from safetensors.torch import load_file

    from kadapter.config import load_config
    from kadapter.finetune import run_finetune

    data = tmp_path / "figer"
    data.mkdir()
    sample = {name: json.loads((repo_root / "data/sample/figer" / name).read_text())
              for name in ("train.json", "dev.json", "test.json")}
    long = {**sample["dev.json"][0], "sent": sample["dev.json"][0]["sent"] + " and then" * 20}
    bad = {**sample["dev.json"][1], "end": 999}
    splits = {"train.json": sample["train.json"][:16], "dev.json": [*sample["dev.json"][:6], long, bad],
              "test.json": sample["test.json"][:4]}
    for name, records in splits.items():
        (data / name).write_text(json.dumps(records))
    types = {label for records in splits.values() for r in records if r is not bad for label in r["labels"]}
    preset = {"preset": "test", "seed": 3,
              "model": {"name_or_path": "tiny", "tiny_dir": str(tiny_model_dir),
                        "tiny_corpus": str(repo_root / "data/sample")},
              "finetune": {"output_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "features"),
                           "figer": {
                  "data_dir": str(data), "max_length": 24, "batch_size": 8, "max_steps": 2,
                  "eval_every": 2, "log_every": 1, "save_every": 0, "on_error": "skip",
                  "classifier": "original", "labels": sorted(types)}}}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(preset))
    run_finetune(load_config(tmp_path / "test.yaml", [], default_section="finetune"), "figer", "none")
    out = tmp_path / "runs/figer/encoder"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels_found"] == len(types) == len(manifest["labels"])
    assert manifest["counts"]["dev"]["truncated"] == 1 and manifest["counts"]["dev"]["examples"] == 7
    assert manifest["skipped_records"]["by_reason"] == {"span_out_of_range": 1}
    assert manifest["skipped_records"]["first"][0]["file"] == str(data / "dev.json")
    assert manifest["skipped_records"]["first"][0]["record"] == 7
    weights = load_file(str(out / "best/model.safetensors"))
    assert {"head.dense.weight", "head.out_proj.weight"} <= set(weights)
