"""T-REx stage: candidate rules, both filters, labels, split, bad input, determinism."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kadapter import trex
from kadapter.io import InputError, split_of
from kadapter.trex import TrexConfig, build_trex_rc, plain_documents, short_id

ENTITY = "http://www.wikidata.org/entity/"
PROP = "http://www.wikidata.org/prop/direct/"
MENTION = re.compile(r"\[([^|\]]+)\|([^\]]+)\]")


def make_doc(docid: str, sentences: list[str], triples: list[tuple], extra: dict | None = None):
    """A T-REx document from sentences with ``[surface|Q1]`` mentions.

    ``triples`` are ``(subject mention, P-id, object mention)`` indexes over the mentions
    in text order (sentence = the subject's), optionally with a dict of overrides.
    """
    text, mentions, bounds = "", [], []
    for sid, sentence in enumerate(sentences):
        if text:
            text += " "
        start = len(text)
        pos = 0
        for match in MENTION.finditer(sentence):
            text += sentence[pos:match.start()]
            surface, qid = match.groups()
            mentions.append({"boundaries": [len(text), len(text) + len(surface)],
                             "surfaceform": surface, "uri": ENTITY + qid,
                             "annotator": "test", "sentence": sid})
            text += surface
            pos = match.end()
        text += sentence[pos:]
        bounds.append([start, len(text)])
    entities = [{k: v for k, v in m.items() if k != "sentence"} for m in mentions]

    def arg(i):
        return {k: v for k, v in mentions[i].items() if k != "sentence"}

    out_triples = []
    for spec in triples:
        s, p, o = spec[:3]
        t = {"sentence_id": mentions[s]["sentence"], "subject": arg(s), "object": arg(o),
             "predicate": {"boundaries": None, "surfaceform": None, "uri": PROP + p,
                           "annotator": "test"},
             "annotator": "Simple-Aligner", "confidence": None, "dependency_path": None}
        for key, value in (spec[3] if len(spec) > 3 else {}).items():
            if key in ("subject", "object"):
                t[key] = {**t[key], **value}
                bounds_moved = value.get("boundaries")
                if (bounds_moved and "surfaceform" not in value  # a moved span keeps its text
                        and all(type(b) is int for b in bounds_moved)):
                    t[key]["surfaceform"] = text[bounds_moved[0]:bounds_moved[1]]
            else:
                t[key] = value
        out_triples.append(t)
    return {"docid": ENTITY + docid, "uri": ENTITY + docid, "title": docid, "text": text,
            "sentences_boundaries": bounds,
            "words_boundaries": [[m.start(), m.end()] for m in re.finditer(r"\w+", text)],
            "entities": entities, "triples": out_triples, **(extra or {})}


def write(path: Path, documents) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(documents), encoding="utf-8")
    return path


def run(tmp_path: Path, inputs, seed: int = 7, name: str = "out", **overrides):
    settings = {"min_entity_count": 1, "min_relation_pairs": 1, "dev_fraction": 0.0, **overrides}
    config = TrexConfig(input=[str(p) for p in inputs] if isinstance(inputs, list) else str(inputs),
                        **settings)
    out = tmp_path / name
    manifest = build_trex_rc(config, seed=seed, output_dir=out)
    rows = {split: pq.read_table(out / f"{split}.parquet").to_pylist() for split in ("train", "dev")}
    return manifest, rows, out


# One document: Paris/France in sentence 0, Berlin/Germany in sentence 1.
SENTENCES = ["[Paris|Q90] is the capital of [France|Q142].",
             "[Berlin|Q64] lies in [Germany|Q183], a neighbour of [France|Q142]."]


@pytest.mark.parametrize(
    ("triple", "reason"),
    [
        ((0, "P17", 1), None),
        ((0, "P17", 1, {"subject": {"boundaries": None}}), "missing_boundaries"),
        ((0, "P17", 1, {"object": {"boundaries": None}}), "missing_boundaries"),
        ((0, "P17", 3), "outside_sentence"),  # Paris (sentence 0) with Germany (sentence 1)
        ((2, "P17", 3, {"sentence_id": 0}), "outside_sentence"),
        ((0, "P17", 1, {"object": {"boundaries": [2, 8]}}), "overlapping_spans"),
        ((1, "P47", 4, {"sentence_id": 0, "object": {"boundaries": [24, 27]}}),
         "overlapping_spans"),
        # France (sentence 0) with the other France mention moved into sentence 0
        ((1, "P47", 4, {"sentence_id": 0, "object": {"boundaries": [0, 5]}}), "same_entity"),
        ((0, "P31", 1), "excluded_relation"),
    ],
)
def test_each_candidate_rule(tmp_path, triple, reason):
    doc = make_doc("Q1", SENTENCES, [triple])
    manifest, rows, _ = run(tmp_path, write(tmp_path / "in/a.json", [doc]))
    dropped = {k: v for k, v in manifest["counts"]["triples_dropped"].items() if v}
    if reason is None:
        assert dropped == {}
        assert rows["train"] == [{
            "docid": ENTITY + "Q1", "sentence": "Paris is the capital of France.",
            "subj_start": 0, "subj_end": 5, "obj_start": 24, "obj_end": 30,
            "subj_uri": "Q90", "obj_uri": "Q142", "relation": "P17", "label": 0}]
    else:
        assert dropped == {reason: 1}
        assert rows["train"] == []


def test_duplicates_from_several_aligners_are_kept_once(tmp_path):
    # The same triple under three aligners, plus one differing only in the predicate.
    doc = make_doc("Q1", SENTENCES, [(0, "P17", 1), (0, "P17", 1, {"annotator": "SPOAligner"}),
                                     (0, "P17", 1, {"annotator": "NoSubject"}), (0, "P1376", 1)])
    manifest, rows, _ = run(tmp_path, write(tmp_path / "in/a.json", [doc]))
    assert manifest["counts"]["triples_dropped"]["duplicate"] == 2
    assert [(r["relation"], r["label"]) for r in rows["train"]] == [("P1376", 0), ("P17", 1)]


def filter_corpus() -> list[dict]:
    """Mentions: Q90 x3, Q142 x3, Q64 x2, Q183 x2, Q1 x1 (counted over every document)."""
    return [
        make_doc("D1", ["[Paris|Q90] is in [France|Q142].", "[Paris|Q90] and [France|Q142]."],
                 [(0, "P17", 1), (2, "P17", 3), (1, "P36", 0)]),
        make_doc("D2", ["[Berlin|Q64] is in [Germany|Q183]; [Paris|Q90] in [France|Q142].",
                        "[Berlin|Q64], [Germany|Q183] and [Lonely|Q1]."],
                 [(0, "P17", 1), (2, "P17", 3), (4, "P17", 6), (5, "P47", 6)]),
    ]


@pytest.mark.parametrize(
    ("min_entity_count", "expected"),
    [
        # (document, relation, subject, object, object offset in its sentence)
        (1, {("D1", "P17", "Q90", "Q142", 12), ("D1", "P17", "Q90", "Q142", 10),
             ("D1", "P36", "Q142", "Q90", 0), ("D2", "P17", "Q64", "Q183", 13),
             ("D2", "P17", "Q90", "Q142", 31), ("D2", "P17", "Q64", "Q1", 20),
             ("D2", "P47", "Q183", "Q1", 20)}),
        (2, {("D1", "P17", "Q90", "Q142", 12), ("D1", "P17", "Q90", "Q142", 10),
             ("D1", "P36", "Q142", "Q90", 0), ("D2", "P17", "Q64", "Q183", 13),
             ("D2", "P17", "Q90", "Q142", 31)}),
        (3, {("D1", "P17", "Q90", "Q142", 12), ("D1", "P17", "Q90", "Q142", 10),
             ("D1", "P36", "Q142", "Q90", 0), ("D2", "P17", "Q90", "Q142", 31)}),
        (4, set()),  # Paris and France have 3 mentions each: no pair reaches 4
    ],
)
def test_entity_filter(tmp_path, min_entity_count, expected):
    manifest, rows, _ = run(tmp_path, write(tmp_path / "in/a.json", filter_corpus()),
                            min_entity_count=min_entity_count)
    got = {(r["docid"].rsplit("/", 1)[1], r["relation"], r["subj_uri"], r["obj_uri"],
            r["obj_start"]) for r in rows["train"]}
    assert got == expected
    counts = manifest["counts"]
    assert counts["candidates"] == 7
    assert counts["dropped_by_entity_filter"] == 7 - len(expected)
    assert counts["entity_mentions"] == 11 and counts["distinct_entities"] == 5


@pytest.mark.parametrize(
    ("min_entity_count", "min_relation_pairs", "relations"),
    [
        (1, 1, ["P17", "P36", "P47"]),
        (1, 2, ["P17"]),           # P17 has 3 pairs (Q90-Q142, Q64-Q183, Q64-Q1); others 1
        (1, 3, ["P17"]),
        (1, 4, []),
        (2, 2, ["P17"]),           # after the entity filter: Q90-Q142 and Q64-Q183
        (2, 3, []),                # ... only 2 pairs left, though 4 P17 examples remain
    ],
)
def test_relation_filter_counts_distinct_pairs_after_entity_filter(
        tmp_path, min_entity_count, min_relation_pairs, relations):
    manifest, rows, out = run(tmp_path, write(tmp_path / "in/a.json", filter_corpus()),
                              min_entity_count=min_entity_count,
                              min_relation_pairs=min_relation_pairs)
    assert json.loads((out / "relations.json").read_text()) == relations
    assert sorted({r["relation"] for r in rows["train"]}) == relations
    assert all(r["label"] == relations.index(r["relation"]) for r in rows["train"])


def test_labels_do_not_depend_on_file_order_or_names(tmp_path):
    corpus = filter_corpus()
    first = [write(tmp_path / "in1/a.json", corpus[:1]), write(tmp_path / "in1/b.json", corpus[1:])]
    second = [write(tmp_path / "in2/b.json", corpus[:1]), write(tmp_path / "in2/a.json", corpus[1:])]
    _, rows1, out1 = run(tmp_path, first, name="one")
    _, rows2, out2 = run(tmp_path, second, name="two")
    assert (out1 / "relations.json").read_bytes() == (out2 / "relations.json").read_bytes()
    labels = {(r["relation"], r["label"]) for r in rows1["train"] + rows2["train"]}
    assert labels == {("P17", 0), ("P36", 1), ("P47", 2)}


def test_split_is_by_seeded_hash_of_docid(tmp_path):
    docs = [make_doc(f"Q{i}", [f"[A{i}|Q{1000 + i}] is in [B|Q5]."], [(0, "P17", 1)])
            for i in range(200)]
    path = write(tmp_path / "in/a.json", docs)
    manifest, rows, _ = run(tmp_path, path, dev_fraction=0.25, seed=11)
    dev_docs = {r["docid"] for r in rows["dev"]}
    train_docs = {r["docid"] for r in rows["train"]}
    assert not dev_docs & train_docs and len(dev_docs | train_docs) == 200
    assert 30 <= len(dev_docs) <= 70
    assert dev_docs == {d["docid"] for d in docs if split_of(d["docid"], 11, 0.25) == "dev"}
    assert manifest["counts"]["documents_by_split"] == {"train": len(train_docs),
                                                       "dev": len(dev_docs)}
    _, reseeded, _ = run(tmp_path, path, dev_fraction=0.25, seed=12, name="reseeded")
    assert {r["docid"] for r in reseeded["dev"]} != dev_docs


def test_a_document_never_straddles_the_split(tmp_path, repo_root):
    manifest, rows, _ = run(tmp_path, repo_root / "data/sample/trex", dev_fraction=0.3,
                            min_entity_count=3, min_relation_pairs=3)
    assert rows["dev"] and rows["train"]
    assert not {r["docid"] for r in rows["dev"]} & {r["docid"] for r in rows["train"]}


def test_sample_preset_yields_a_learnable_set(tmp_path, repo_root):
    manifest, rows, _ = run(tmp_path, repo_root / "data/sample/trex", dev_fraction=0.1,
                            min_entity_count=3, min_relation_pairs=3, seed=42)
    counts = manifest["counts"]
    assert counts["files"] >= 3
    assert counts["after_relation_filter"] >= 300 and counts["relations_kept"] >= 8
    assert rows["dev"], "the sample needs a dev split"
    # every kept relation has examples and its pair count passes the threshold
    for relation, entry in manifest["relations"].items():
        assert entry["pairs"] >= 3 and entry["train"] + entry["dev"] > 0, relation
    # the sample exercises every candidate rule and both filters
    dropped = counts["triples_dropped"]
    for reason in ("missing_boundaries", "outside_sentence", "overlapping_spans", "same_entity",
                   "excluded_relation", "duplicate"):
        assert dropped[reason] > 0, reason
    assert counts["dropped_by_entity_filter"] > 0
    assert manifest["relations_dropped_by_pair_filter"] == {"P190": 2}  # Paris-Rome twins


def test_offsets_point_at_the_mentions(tmp_path, repo_root):
    _, rows, _ = run(tmp_path, repo_root / "data/sample/trex", dev_fraction=0.1)
    surfaces = {}
    for path in sorted((repo_root / "data/sample/trex").glob("*.json")):
        for doc in json.loads(path.read_text(encoding="utf-8")):
            for m in doc["entities"]:
                a, b = m["boundaries"]
                assert doc["text"][a:b] == m["surfaceform"]
                surfaces.setdefault(short_id(m["uri"]), set()).add(m["surfaceform"])
    for row in rows["train"] + rows["dev"]:
        assert row["sentence"][row["subj_start"]:row["subj_end"]] in surfaces[row["subj_uri"]]
        assert row["sentence"][row["obj_start"]:row["obj_end"]] in surfaces[row["obj_uri"]]


def test_manifest_accounts_for_every_triple(tmp_path, repo_root):
    manifest, rows, _ = run(tmp_path, repo_root / "data/sample/trex", dev_fraction=0.1,
                            min_entity_count=3, min_relation_pairs=30)
    c = manifest["counts"]
    assert c["triples_read"] == sum(c["triples_dropped"].values()) + c["candidates"]
    assert c["triples_read"] == sum(
        len(doc["triples"]) for p in sorted((repo_root / "data/sample/trex").glob("*.json"))
        for doc in json.loads(p.read_text(encoding="utf-8")))
    assert c["candidates"] == (c["dropped_by_entity_filter"] + c["dropped_by_relation_filter"]
                               + c["examples"]["train"] + c["examples"]["dev"])
    assert c["dropped_by_relation_filter"] > 0 and manifest["relations_dropped_by_pair_filter"]
    assert len(rows["train"]) == c["examples"]["train"] == sum(
        r["train"] for r in manifest["relations"].values())
    assert [i["path"] for i in manifest["inputs"]] == sorted(i["path"] for i in manifest["inputs"])
    assert all(i["bytes"] > 0 for i in manifest["inputs"])


def test_real_trex_sample(tmp_path, shared_real):
    """The T-REx project's own sample (Andorra, Catalan language), counted by hand:

    112 triples; 13 have a null subject span (NoSubject aligner, sentences without the
    document's own name): Andorra 6, Catalan 7. The other 99 all lie inside their
    sentence. Duplicates: in Andorra all 17 SPOAligner and all 6 spanned NoSubject
    triples repeat a Simple-Aligner one (23); in Catalan the 3 spanned NoSubject triples
    and both SPOAligner ones repeat Simple-Aligner ones (5): 28, leaving 60 + 11 = 71.
    Three of those triples (one kept, two of its repeats: P729 with the 1970-01-22 date)
    have a date value, not an entity, as object: dropped as literal_argument, so 70
    candidates and 26 duplicates.
    """
    path = shared_real / "trex-sample-output.json"
    manifest, rows, _ = run(tmp_path, path)
    c = manifest["counts"]
    assert (c["documents"], c["triples_read"], c["candidates"]) == (2, 112, 70)
    assert {k: v for k, v in c["triples_dropped"].items() if v} == {
        "missing_boundaries": 13, "literal_argument": 3, "duplicate": 26}
    assert c["entity_mentions"] == 127
    assert sorted(manifest["relations"]) == ["P17", "P2341", "P37", "P38", "P47", "P527",
                                             "P530"]
    # Mentions: Catalan 19, Andorra 11, Spain 6, France 6; Southwestern Europe, the Euro,
    # the EU and the 1970-01-22 date fewer. With 6+ mentions 7 candidates go (4 with
    # Southwestern Europe, 3 with the Euro or the EU; the date's is gone already); with 2+ pairs
    # P2341 (1 pair: Catalan-Andorra) goes too: 7 examples.
    manifest, rows, out = run(tmp_path, path, min_entity_count=6, min_relation_pairs=2,
                              name="filtered")
    c = manifest["counts"]
    assert (c["after_entity_filter"], c["after_relation_filter"]) == (63, 56)
    assert json.loads((out / "relations.json").read_text()) == ["P17", "P37", "P47", "P530"]
    assert {r: e["pairs"] for r, e in manifest["relations"].items()} == {
        "P17": 3, "P37": 2, "P47": 6, "P530": 2}
    first = rows["train"][0]
    assert first["sentence"][first["subj_start"]:first["subj_end"]] == "Andorra"
    assert first["sentence"].startswith("Andorra (/ænˈdɔːrə/;")


def test_same_inputs_same_bytes_whatever_the_workers(tmp_path, repo_root):
    outs = []
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        manifest, _, out = run(tmp_path, repo_root / "data/sample/trex", dev_fraction=0.1,
                               min_entity_count=3, min_relation_pairs=3, workers=workers,
                               name=name)
        outs.append(out)
    for name in ("train.parquet", "dev.parquet", "relations.json"):
        assert len({(out / name).read_bytes() for out in outs}) == 1, name
    manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
    for m in manifests:
        m["parameters"].pop("workers"), m["parameters"].pop("output_dir")
    assert manifests[0] == manifests[1] == manifests[2]


def bad_documents():
    good = make_doc("Q1", SENTENCES, [(0, "P17", 1)])
    missing = {k: v for k, v in good.items() if k != "sentences_boundaries"}
    outside = make_doc("Q2", SENTENCES, [(0, "P17", 1, {"object": {"boundaries": [60, 999]}})])
    sentence = make_doc("Q3", SENTENCES, [(0, "P17", 1, {"sentence_id": 7})])
    bad_sentence = {**good, "sentences_boundaries": [[0, 31], [32, 500]]}
    return {
        "missing field": (missing, "missing field 'sentences_boundaries'", "malformed_document"),
        "boundaries outside text": (outside, "outside the text", "boundaries_outside_text"),
        "sentence id out of range": (sentence, "sentence_id 7 out of range", "bad_sentence_id"),
        "sentence outside text": (bad_sentence, "sentence boundaries", "bad_sentence_boundaries"),
        "not an object": ([1, 2], "not an object", "malformed_document"),
    }


@pytest.mark.parametrize("case", list(bad_documents()))
def test_bad_document_raises_naming_file_and_document(tmp_path, case):
    bad, message, reason = bad_documents()[case]
    good = make_doc("Q9", SENTENCES, [(0, "P17", 1)])
    path = write(tmp_path / "in/a.json", [good, bad])
    with pytest.raises(InputError) as err:
        run(tmp_path, path)
    assert str(path) in str(err.value) and "document 1" in str(err.value)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "a failed run must leave nothing behind"

    manifest, rows, _ = run(tmp_path, path, on_error="skip")
    c = manifest["counts"]
    skipped = {**c["documents_skipped_by_reason"], **c["triples_dropped"]}
    assert skipped[reason] == 1
    assert c["triples_read"] == sum(c["triples_dropped"].values()) + c["candidates"]
    assert len(rows["train"]) == 1  # the good document's example survives


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'[{"docid": "x", ', "not valid JSON"),
        (b'{"docid": "x"}', "not valid JSON"),
        (b'[{"docid": "x", "words_boundaries": [[0, 1], [2 3]]}]', "not valid JSON"),
        (b'[{"docid": "x", "words_boundaries": [[0, 1], [02, 3]]}]', "not valid JSON"),
        (b'[{"docid": "x", "words_boundaries": [[0, 1],\x0b[2, 3]]}]', "not valid JSON"),
    ],
)
def test_invalid_json_file(tmp_path, content, problem):
    good = write(tmp_path / "in/a.json", [make_doc("Q1", SENTENCES, [(0, "P17", 1)])])
    bad = tmp_path / "in/b.json"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=problem) as err:
        run(tmp_path, [good, bad])
    assert str(bad) in str(err.value)
    manifest, rows, _ = run(tmp_path, [good, bad], on_error="skip")
    assert manifest["counts"]["files_skipped_invalid_json"] == 1
    assert len(rows["train"]) == 1


def test_failed_rerun_keeps_the_previous_output(tmp_path):
    good = write(tmp_path / "in/a.json", [make_doc("Q1", SENTENCES, [(0, "P17", 1)])])
    _, _, out = run(tmp_path, good)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "in/b.json").write_bytes(b"[{")
    with pytest.raises(InputError):
        run(tmp_path, tmp_path / "in")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("indent", [None, 3])
def test_word_boundaries_are_dropped_before_parsing(tmp_path, indent):
    doc = make_doc("Q1", SENTENCES, [(0, "P17", 1)])
    path = tmp_path / "a.json"
    path.write_text(json.dumps([doc], indent=indent), encoding="utf-8")
    (parsed,) = plain_documents(path.read_bytes())
    assert parsed["words_boundaries"] == []
    assert {k: v for k, v in parsed.items() if k != "words_boundaries"} == {
        k: v for k, v in doc.items() if k != "words_boundaries"}


def test_cli_on_the_sample_preset(tmp_path, repo_root):
    out = tmp_path / "trex_rc"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.data_trex", "--config", "configs/sample.yaml",
         "--output_dir", str(out)], cwd=repo_root, capture_output=True, text=True, check=True)
    assert "examples over" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        ".kadapter-output.json", "dev.parquet", "manifest.json", "relations.json", "train.parquet"]
    table = pq.read_table(out / "train.parquet")
    assert table.column_names == ["docid", "sentence", "subj_start", "subj_end", "obj_start",
                                  "obj_end", "subj_uri", "obj_uri", "relation", "label"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1]", encoding="utf-8")
    failed = subprocess.run(
        [sys.executable, "-m", "pipelines.data_trex", "--input", str(bad),
         "--output_dir", str(tmp_path / "x")], cwd=repo_root, capture_output=True, text=True)
    assert failed.returncode == 2
    assert f"error: {bad}, record document 0: document is a int" in failed.stderr


def test_typed_decoding_gives_what_plain_dicts_give(tmp_path, repo_root, monkeypatch):
    paths = sorted((repo_root / "data/sample/trex").glob("*.json"))
    assert all(type(trex.decode_documents(p.read_bytes())[0]) is trex._Document for p in paths)
    typed = [trex.scan_table(str(p), 3, 0.3, frozenset({"P31"}), "raise") for p in paths]
    monkeypatch.setattr(trex, "decode_documents", trex.plain_documents)
    plain = [trex.scan_table(str(p), 3, 0.3, frozenset({"P31"}), "raise") for p in paths]
    for (typed_scan, typed_table), (plain_scan, plain_table) in zip(typed, plain):
        assert typed_table.equals(plain_table) and typed_table.num_rows
        assert (typed_scan.entity_counts, typed_scan.stats, typed_scan.candidates) == (
            plain_scan.entity_counts, plain_scan.stats, plain_scan.candidates)
        assert typed_scan.docids.tolist() == plain_scan.docids.tolist()
        assert typed_scan.doc_indexes.tolist() == plain_scan.doc_indexes.tolist()


@pytest.mark.parametrize(("change", "reason", "message"), [
    ({"subject": {"surfaceform": "Berlin"}}, "surfaceform_mismatch",
     r"subject surfaceform 'Berlin' is not the text at \[\d+, \d+\]"),
    ({"object": {"uri": "http://example.org/x"}}, "not_an_entity",
     r"object uri 'http://example.org/x' is neither a Wikidata entity nor a typed value"),
    ({"object": {"uri": '"1990"^^http://www.w3.org/2001/XMLSchema#dateTime'}},
     "literal_argument", None),
])
@pytest.mark.parametrize("decoding", ["typed", "plain"])
def test_input_checks_hold_in_both_decodings(tmp_path, monkeypatch, change, reason, message,
                                             decoding):
    """11's argument checks on the typed fast path and on the plain-dict path alike."""
    doc = make_doc("Q1", SENTENCES, [(0, "P17", 1, change), (0, "P17", 1)])
    path = write(tmp_path / "in/a.json", [doc])
    assert type(trex.decode_documents(path.read_bytes())[0]) is trex._Document
    if decoding == "plain":
        monkeypatch.setattr(trex, "decode_documents", trex.plain_documents)
    if message is not None:
        with pytest.raises(InputError, match=r"document 0 \(docid .*Q1\), triple 0: " + message):
            run(tmp_path, path)
    manifest = run(tmp_path, path, name="skip", on_error="skip")[0]
    assert manifest["counts"]["triples_dropped"][reason] == 1
    assert manifest["counts"]["candidates"] == 1


@pytest.mark.parametrize("change", [
    {"object": {"boundaries": [60.0, 66]}},  # a float: the typed decoding refuses the file
    {"object": {"boundaries": [60, 999]}},  # typed, the range check finds it
])
def test_both_decodings_name_bad_boundaries_alike(tmp_path, change):
    doc = make_doc("Q1", SENTENCES, [(0, "P17", 1, change)])
    path = write(tmp_path / "in/a.json", [doc])
    with pytest.raises(InputError, match=r"document 0 \(docid .*Q1\), triple 0: boundaries "
                                         r"\[60(\.0)?, (66|999)\] outside the text"):
        run(tmp_path, path)


def test_docid_hash_collisions_are_not_repeats(tmp_path, monkeypatch):
    """Cross-file repeats are found by docid hash but confirmed on the docids: with every
    hash equal, only the docid really in two files is a duplicate."""
    first = write(tmp_path / "in/a.json", [make_doc("Q1", SENTENCES, [(0, "P17", 1)]),
                                           make_doc("Q2", SENTENCES, [(2, "P17", 3)])])
    second = write(tmp_path / "in/b.json", [make_doc("Q3", SENTENCES, [(0, "P17", 1)]),
                                            make_doc("Q2", SENTENCES, [(2, "P17", 3)])])
    expected = run(tmp_path, [first, second], name="hashed", on_error="skip")[0]["counts"]
    monkeypatch.setattr(trex, "docid_hash", lambda docid: 7)
    with pytest.raises(InputError, match=r"b.json, record document 1 \(docid .*Q2\): docid also "
                                         r"in .*a.json"):
        run(tmp_path, [first, second])
    counts = run(tmp_path, [first, second], name="collided", on_error="skip")[0]["counts"]
    assert counts == expected
    assert counts["documents_skipped_by_reason"]["duplicate_docid"] == 1


def test_docid_repeated_across_files_parses_only_that_file_again(tmp_path, monkeypatch):
    """With on_error: skip, a docid met again in a later file makes only that file be
    parsed again (twice: its earlier counts are taken back), not every file; the output
    and counts are those of a run without the copy."""
    docs = [make_doc(f"Q{n}", SENTENCES, [(0, "P17", 1), (2, "P17", 3)]) for n in range(1, 4)]
    alone = make_doc("Q9", ["[Rome|Q220] is in [Italy|Q38]."], [(0, "P17", 1)])
    without = run(tmp_path, [write(tmp_path / f"plain/{name}.json", documents) for name, documents
                             in zip("abcd", ([docs[0]], [docs[1]], [docs[2]], [alone]))],
                  name="without")
    paths = [write(tmp_path / f"in/{name}.json", documents) for name, documents
             in zip("abcd", ([docs[0]], [docs[1]], [docs[2]], [alone, docs[1]]))]
    parsed: list = []
    scan_table = trex.scan_table

    def counted(path, *args, **kwargs):
        parsed.append(Path(path).name)
        return scan_table(path, *args, **kwargs)

    monkeypatch.setattr(trex, "scan_table", counted)
    manifest, rows, _ = run(tmp_path, paths, name="repeated", on_error="skip")
    assert sorted(parsed) == ["a.json", "b.json", "c.json", "d.json", "d.json", "d.json"]
    assert rows == without[1]
    counts = manifest["counts"]
    assert counts["documents_skipped_by_reason"]["duplicate_docid"] == 1
    for key in ("entity_mentions", "distinct_entities", "entities_kept", "candidates",
                "examples", "documents_by_split"):
        assert counts[key] == without[0]["counts"][key], key
