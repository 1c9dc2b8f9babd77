"""LAMA probe: how many facts a masked LM fills in, for the encoder and for K-Adapter.

Data, in the layout of LAMA's release (Petroni et al., 2019; KADAPTER.md section 5):
- ``lama_dir/relations.jsonl``: one template per relation, ``[X] was born in [Y] .``;
- ``lama_dir/TREx/P*.jsonl``: facts ``{uuid, predicate_id, sub_label, obj_label, ...}``
  (41 relations with files, 34,039 facts in the full release);
- ``lama_dir/Google_RE/{place_of_birth,date_of_birth,place_of_death}_test.jsonl``: facts
  ``{pred, sub_label, obj_label, judgments, ...}`` with LAMA's three fixed templates;
- ``common_vocab_cased.txt``: 21,018 words, the only candidates any model may rank.

A fact becomes a query: the template with ``[X]`` = subject label and ``[Y]`` = the mask.
Each fact is kept or dropped for the first of these reasons that applies (every drop is
written out with its reason). The kept facts are exactly those LAMA's own code scores
(facebookresearch/LAMA ``scripts/batch_eval_KB_completion.py``, on the files LAMA-UHN's
``scripts/create_lama_uhn.py`` writes for the UHN subsets):

1. ``judgments_majority_no`` (Google-RE): dropped when the judgments that are not "yes"
   outnumber the "yes" ones, as LAMA's code does: ties and facts without any judgment
   are kept.
2. ``object_not_single_token``: the object must be exactly one token of the model's
   vocabulary, in the form it takes mid-sentence after a space. Whether that form keeps
   the space is read off the tokenizer (``space_prefixed``): byte-level BPE (RoBERTa)
   turns " Paris" into the single token "ĠParis", WordPiece (BERT) drops the space.
3. ``object_not_in_common_vocab``: the object must be a word of the common vocabulary.
4. ``extra_mask_token``: the query must hold exactly one mask token (a subject label that
   contains the tokenizer's mask token would make a query with two).
5. ``query_too_long``: the query must fit the model's maximum length.
6. ``uhn_object_in_subject`` (UHN subsets): LAMA-UHN's first filter drops facts whose
   lowercased object is a substring of the lowercased subject label ("Mexico City" ->
   "Mexico").
7. ``uhn_person_name`` (UHN subsets, only when ``bert_model`` is set): LAMA-UHN's second
   filter asks BERT "[name] is a common name in the following city/country/language :
   [MASK] ." for every word of a person's name, and drops the fact when the object is
   among BERT's top 3 (relations P19, P20, P27, P103, P1412 and Google-RE's birth and
   death places). The object must equal one of BERT's top-k token strings, as in
   LAMA-UHN. Without ``bert_model`` it does not run, and results.md says so.
7. ``duplicate``: LAMA scores one fact per distinct (subject, object) pair of a relation
   (the first in file order among those the filters above keep); later copies are
   dropped (Google-RE place_of_death: 766 lines, 765 distinct pairs).

Scoring: the model's logits at the mask, restricted to the common-vocabulary words that
are single tokens; candidates are ordered by score, ties by token id. Per relation P@1,
P@10 and MRR, LAMA's mean reciprocal rank of the object over the candidate ranking
(``lama/evaluation_metrics.py``; LAMA ranks the top 10,000 candidates, so a rank beyond
10,000 adds 0); MRR@10 (0 beyond rank 10) is reported under that name besides. Every
number is recomputed from the full ``rank`` of each fact in ``predictions.jsonl``; a
subset's score is the mean over its relations (macro), as in LAMA.

Variants: ``encoder`` uses the encoder's own MLM head. A K-Adapter variant (``fac``,
``lin``, ``fac+lin``) has no MLM head of its own; the paper trains a linear layer on
WikiText-2 with everything else frozen. Here a linear *mix* maps concat(encoder last
state, adapter outputs...) to the hidden size, initialised as [identity, zero], and
feeds the encoder's own LM head: untrained, it reproduces the encoder's predictions
exactly, so MLM training on raw text starts from the encoder's quality. Encoder,
adapters and LM head stay frozen; only the mixes train.

The stage (``python -m pipelines.eval_lama``) is ``run_lama``, at the end: its steps and
its output layout are in its docstring.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import torch
import torch.nn.functional as F
from torch import nn

from kadapter.config import Config, to_plain
from kadapter.hub import resolve_adapter
from kadapter.io import (
    InputError,
    atomic_output_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    expand_inputs,
    file_fingerprint,
    read_jsonl,
    versions,
)
from kadapter.modeling import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterLoadError,
    KAdapterModel,
    ModelNotAvailable,
    encoder_dtype,
    load_adapter,
    load_encoder,
    load_tokenizer,
    max_sequence_length,
    resolve_model_path,
)
from kadapter.progress import progress
from kadapter.training import (
    PadCollator,
    TrainingConfig,
    batch_plan,
    make_accelerator,
    precision_of,
    read_metrics,
    train,
)

SUBSETS = ("google_re", "uhn_google_re", "trex", "uhn_trex")
SUBSET_TITLES = {"google_re": "LAMA-Google-RE", "uhn_google_re": "LAMA-UHN-Google-RE",
                 "trex": "LAMA-T-REx", "uhn_trex": "LAMA-UHN-T-REx"}
VARIANTS = ("encoder", "fac", "lin", "fac+lin")
ADAPTER_TARGETS = {"fac": "pretrain-fac", "lin": "pretrain-lin"}  # make targets that build them

# LAMA's own templates for Google-RE (scripts/run_experiments.py), in LAMA's order.
GOOGLE_RE_TEMPLATES = {
    "place_of_birth": "[X] was born in [Y] .",
    "date_of_birth": "[X] (born [Y]).",
    "place_of_death": "[X] died in [Y] .",
}
# LAMA-UHN's person-name filter: relation -> the noun of its question (create_lama_uhn.py).
PERSON_NAME_NOUNS = {"place_of_birth": "city", "place_of_death": "city", "P19": "city",
                     "P20": "city", "P27": "country", "P1412": "language", "P103": "language"}
PERSON_NAME_TEMPLATE = "[X] is a common name in the following {noun} : [Y] ."

DROP_REASONS = (
    "judgments_majority_no",
    "object_not_single_token",
    "object_not_in_common_vocab",
    "extra_mask_token",
    "query_too_long",
    "uhn_object_in_subject",
    "uhn_person_name",
    "duplicate",
)
TOP_K = 10
MRR_DEPTH = 10_000
"""LAMA's MRR only looks this deep into the ranking (get_ranking(topk=10000))."""


@dataclass
class MlmHeadConfig(TrainingConfig):
    """Training of the K-Adapter variants' MLM mix on raw text (the shared training loop's
    settings plus the text). Defaults follow the paper: 2 epochs over WikiText-2. Its
    ``bf16`` sets the precision of the whole LAMA stage, scoring included."""

    text: str = "data/sample/text/wiki.train.txt"
    """Raw training text (file, directory or glob), WikiText-2 style: one paragraph per
    line; blank lines are skipped, the rest is tokenized, concatenated and cut into blocks."""
    dev_text: str | None = "data/sample/text/wiki.valid.txt"
    """Raw held-out text for the MLM loss of every variant after each epoch (the encoder's
    loss on the same masked tokens is the baseline); null = no evaluation."""
    max_length: int = 128
    """Tokens per training block, special tokens included."""
    mask_probability: float = 0.15
    """Share of tokens chosen for prediction (of those, 80% become the mask token, 10% a
    random token, 10% stay), as in BERT/RoBERTa."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (a small one keeps the mix near its start)."""
    batch_size: int = 32
    """Text blocks per optimizer step over all processes (the global batch: each process
    takes batch_size / (processes x grad_accumulation) blocks a micro-batch)."""
    epochs: int = 2
    """Passes over the text (the paper: 2 over WikiText-2)."""
    weight_decay: float = 0.0
    """AdamW weight decay (a decay pulls the mix away from [identity, zero])."""
    warmup_ratio: float = 0.06
    """Share of the steps over which the learning rate rises from 0."""
    log_every: int = 10
    """Log the loss every this many optimizer steps."""
    save_every: int = 0
    """0: one checkpoint at the end (deleted once the mix weights are saved)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if not 0.0 < self.mask_probability < 1.0:
            raise ValueError(f"mask_probability must be in (0, 1), got {self.mask_probability}")


@dataclass
class LamaConfig:
    """The LAMA probe (``python -m pipelines.eval_lama``)."""

    lama_dir: str = "data/sample/lama"
    """LAMA's data directory: relations.jsonl, TREx/P*.jsonl, Google_RE/*_test.jsonl."""
    common_vocab: str = "data/sample/lama/common_vocab_cased.txt"
    """The common vocabulary, one word per line (LAMA's common_vocab_cased.txt)."""
    subsets: list[Literal["google_re", "uhn_google_re", "trex", "uhn_trex"]] = field(
        default_factory=lambda: list(SUBSETS))
    """Subsets to probe (UHN = LAMA-UHN's filters on top of the subset's own)."""
    variants: list[Literal["encoder", "fac", "lin", "fac+lin"]] = field(
        default_factory=lambda: list(VARIANTS))
    """Models to probe: the encoder alone, or K-Adapter with these adapters."""
    fac_adapter: str = "runs/{preset}/fac-adapter"
    """The factual adapter: its directory (``make pretrain-fac``) or a Hub id (``owner/name``)."""
    lin_adapter: str = "runs/{preset}/lin-adapter"
    """The linguistic adapter: its directory (``make pretrain-lin``) or a Hub id."""
    output_dir: str = "runs/{preset}/lama"
    """Where results.json, results.md, the plot and per-subset predictions go."""
    batch_size: int = 64
    """Queries per forward pass when scoring."""
    train_mlm_head: bool = True
    """Train the K-Adapter variants' MLM mix on ``mlm_head.text``; false keeps the
    [identity, zero] initialisation (K-Adapter variants then score like the encoder)."""
    mlm_head: MlmHeadConfig = field(default_factory=MlmHeadConfig)
    """MLM-mix training: text, epochs, learning rate, batch size (``--lama.mlm_head.KEY``)."""
    bert_model: str | None = None
    """BERT (hub name or directory, LAMA-UHN used bert-base-cased) for LAMA-UHN's
    person-name filter; null = that filter is skipped and reported as skipped."""
    person_name_top_k: int = 3
    """The person-name filter drops a fact when its object is among BERT's top k."""

    def __post_init__(self) -> None:
        if not self.subsets or not self.variants:
            raise ValueError("subsets and variants must not be empty")
        for name, values in (("subsets", self.subsets), ("variants", self.variants)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
        if self.batch_size < 1 or self.person_name_top_k < 1:
            raise ValueError("batch_size and person_name_top_k must be >= 1")


def adapter_names(variant: str) -> list[str]:
    """``"fac+lin"`` -> ``["fac", "lin"]``; ``"encoder"`` -> ``[]``."""
    return [] if variant == "encoder" else sorted(variant.split("+"))


# ------------------------------------------------------------------------------ readers


@dataclass(frozen=True)
class Fact:
    relation: str
    sub_label: str
    obj_label: str
    where: str
    """``file:line``, for messages."""
    yes_votes: int | None = None
    """Google-RE: judgments that are "yes" / that are not; None elsewhere."""
    other_votes: int | None = None


@dataclass
class Relation:
    name: str
    template: str
    facts: list[Fact]


def check_template(template: Any, path: Path, record: str) -> str:
    if not isinstance(template, str) or template.count("[X]") != 1 or template.count("[Y]") != 1:
        raise InputError(path, record, f"template must hold [X] and [Y] once each, got {template!r}")
    return template


def read_templates(path: Path) -> dict[str, str]:
    """relations.jsonl -> {relation id: template}."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LAMA relations file not found (set --lama_dir)")
    templates: dict[str, str] = {}
    for number, record in read_jsonl(path):
        relation = record.get("relation")
        if not isinstance(relation, str) or not relation:
            raise InputError(path, f"line {number}", "missing 'relation'")
        if relation in templates:
            raise InputError(path, f"line {number}", f"relation {relation} listed twice")
        templates[relation] = check_template(record.get("template"), path, f"line {number}")
    return templates


def read_fact(record: dict[str, Any], path: Path, number: int, relation: str,
              google_re: bool) -> Fact:
    labels = []
    for key in ("sub_label", "obj_label"):
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(path, f"line {number}", f"'{key}' must be a non-empty string, got {value!r}")
        labels.append(value.strip())
    if not google_re:
        predicate = record.get("predicate_id", relation)
        if predicate != relation:
            raise InputError(path, f"line {number}",
                             f"predicate_id {predicate!r} does not match the file's relation {relation}")
        return Fact(relation, labels[0], labels[1], f"{path}:{number}")
    judgments = record.get("judgments", [])
    if not isinstance(judgments, list) or not all(
            isinstance(j, dict) and isinstance(j.get("judgment"), str) for j in judgments):
        raise InputError(path, f"line {number}", "'judgments' must be a list of {judgment: str}")
    yes = sum(j["judgment"] == "yes" for j in judgments)
    return Fact(relation, labels[0], labels[1], f"{path}:{number}", yes, len(judgments) - yes)


def read_trex(lama_dir: str | Path) -> tuple[list[Relation], list[str]]:
    """T-REx relations that have a facts file (sorted by id), and the template-only ones.

    A facts file whose relation has no template is an error; relations.jsonl listing more
    relations than there are files is normal (LAMA's does). An empty facts file gives a
    relation with no facts (``empty_relations`` reports them; they are not probed).
    """
    lama_dir = Path(lama_dir)
    templates = read_templates(lama_dir / "relations.jsonl")
    files = sorted((lama_dir / "TREx").glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{lama_dir / 'TREx'}: no T-REx facts files (*.jsonl)")
    relations = []
    for path in files:
        name = path.stem
        if name not in templates:
            raise InputError(path, None, f"relation {name} has no template in {lama_dir / 'relations.jsonl'}")
        facts = [read_fact(r, path, n, name, google_re=False) for n, r in read_jsonl(path)]
        relations.append(Relation(name, templates[name], facts))
    with_files = {r.name for r in relations}
    return relations, sorted(set(templates) - with_files)


def empty_relations(relations: list[Relation]) -> list[str]:
    """Names of the relations whose facts file holds no fact."""
    return sorted(r.name for r in relations if not r.facts)


def read_google_re(lama_dir: str | Path) -> list[Relation]:
    lama_dir = Path(lama_dir)
    relations = []
    for name, template in GOOGLE_RE_TEMPLATES.items():
        path = lama_dir / "Google_RE" / f"{name}_test.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Google-RE facts file not found")
        facts = [read_fact(r, path, n, name, google_re=True) for n, r in read_jsonl(path)]
        relations.append(Relation(name, template, facts))
    return relations


def read_common_vocab(path: str | Path) -> list[str]:
    """One word per line (blank lines skipped), in file order, duplicates removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: common vocabulary file not found (set --common_vocab)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(path, f"line {line}", f"not UTF-8 (byte offset {err.start}: "
                         f"{raw[err.start:err.start + 1]!r})") from None
    words = dict.fromkeys(w.strip() for w in text.splitlines())
    words.pop("", None)
    if not words:
        raise InputError(path, None, "the common vocabulary is empty")
    return list(words)


# ------------------------------------------------------------------ tokens and queries


class ProbeTokens:
    """How a tokenizer writes probe words and queries.

    - ``space_prefixed``: True when a word after a space is a different token from the
      same word at the start of a text (" a" -> "Ġa" vs "a": byte-level BPE, RoBERTa);
      False when the space is dropped (WordPiece, BERT). Objects and candidates take the
      mid-sentence form: " Paris" for the former, "Paris" for the latter.
    - Queries are tokenized in three pieces, as LAMA does: the text before the mask
      (trailing space removed), the mask token, the text after. So the space before the
      mask never becomes a token of its own, whether or not the tokenizer's mask token
      absorbs the space to its left (roberta-large's does, a tokenizer built from bare
      vocab/merges files may not).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token: not a masked language model")
        self.mask_id = tokenizer.mask_token_id
        self.special_ids = set(tokenizer.all_special_ids)
        self.space_prefixed = tokenizer.tokenize(" a") != tokenizer.tokenize("a")
        probe = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
        content = [i for i, special in enumerate(probe) if not special]
        if len(content) != 1:
            raise ValueError(f"unexpected special-token layout {probe} for the text 'a'")
        self.specials_before = content[0]
        self.specials_after = len(probe) - 1 - content[0]

    def word_form(self, word: str) -> str:
        return f" {word}" if self.space_prefixed else word

    def word_ids(self, words: list[str]) -> list[int | None]:
        """Each word's token id mid-sentence, or None when it is not exactly one ordinary
        token (several pieces, or an unknown/special token)."""
        if not words:
            return []
        encoded = self.tokenizer([self.word_form(w) for w in words], add_special_tokens=False)
        return [ids[0] if len(ids) == 1 and ids[0] not in self.special_ids else None
                for ids in encoded["input_ids"]]

    def query(self, template: str, subject: str) -> tuple[str, list[int], int]:
        """(query text, token ids with special tokens, index of the mask)."""
        before, after = (part.replace("[X]", subject) for part in template.split("[Y]"))
        head = self.tokenizer(before.rstrip())["input_ids"]
        tail = self.tokenizer(after)["input_ids"]
        head = head[: len(head) - self.specials_after]
        ids = head + [self.mask_id] + tail[self.specials_before:]
        return before + self.tokenizer.mask_token + after, ids, len(head)


class CommonVocabulary:
    """The candidates: common-vocabulary words that are one token, as sorted unique ids."""

    def __init__(self, words: list[str], tokens: ProbeTokens):
        ids = tokens.word_ids(words)
        self.words = set(words)
        self.not_single_token = [w for w, i in zip(words, ids) if i is None]
        self.candidate_ids = torch.tensor(sorted({i for i in ids if i is not None}), dtype=torch.long)
        if len(self.candidate_ids) == 0:
            raise ValueError("no word of the common vocabulary is a single token of this model")
        decode = tokens.tokenizer.decode
        self.decoded = {int(i): decode([int(i)]).strip() for i in self.candidate_ids}


# ------------------------------------------------------------------------------ filters


@dataclass
class Query:
    """A kept fact, ready to score."""

    subset: str
    relation: str
    sub_label: str
    obj_label: str
    text: str
    ids: tuple[int, ...]
    mask_index: int
    object_id: int


def object_in_subject(fact: Fact) -> bool:
    """LAMA-UHN filter 1: the lowercased object is a substring of the lowercased subject."""
    return fact.obj_label.lower() in fact.sub_label.lower()


class PersonNameFilter:
    """LAMA-UHN filter 2 (Poerner et al., 2020): is the object guessable from one word of
    a person's name alone? Runs a BERT MLM on "[name] is a common name in the following
    {city|country|language} : [MASK] ." and drops the fact when the object label equals
    one of the top k tokens (as strings, as ``create_lama_uhn.py`` compares them; an
    uncased BERT compares lowercased labels); every (name, noun) question is asked once."""

    def __init__(self, model: nn.Module, tokenizer: Any, top_k: int = 3, batch_size: int = 64,
                 device: torch.device | str = "cpu"):
        self.model = model.eval().to(device)
        self.tokens = ProbeTokens(tokenizer)
        self.top_k, self.batch_size, self.device = top_k, batch_size, torch.device(device)
        self.lowercase = bool(getattr(tokenizer, "do_lower_case", False))

    @staticmethod
    def applies(fact: Fact) -> bool:
        return fact.relation in PERSON_NAME_NOUNS

    @torch.no_grad()
    def top_tokens(self, questions: list[tuple[str, str]]) -> dict[tuple[str, str], set[str]]:
        """(name, noun) -> the model's top k tokens at the mask, as token strings."""
        encoded = [self.tokens.query(PERSON_NAME_TEMPLATE.format(noun=noun), name)
                   for name, noun in questions]
        pad = self.tokens.tokenizer.pad_token_id or 0
        found = {}
        for start in range(0, len(questions), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            ids, mask = pad_batch([e[1] for e in chunk], pad)
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
            rows = torch.arange(len(chunk), device=self.device)
            at_mask = logits[rows, torch.tensor([e[2] for e in chunk], device=self.device)]
            top = at_mask.float().topk(self.top_k, dim=-1).indices.cpu().tolist()
            for question, ids_top in zip(questions[start:start + self.batch_size], top):
                found[question] = set(self.tokens.tokenizer.convert_ids_to_tokens(ids_top))
        return found

    def matches(self, facts: list[Fact]) -> list[bool]:
        """For each fact: True when LAMA-UHN's person-name filter drops it."""
        def names(fact: Fact) -> list[str]:
            return (fact.sub_label.lower() if self.lowercase else fact.sub_label).split()

        questions = {(name, PERSON_NAME_NOUNS[f.relation])
                     for f in facts if self.applies(f) for name in names(f)}
        top = self.top_tokens(sorted(questions))
        return [
            self.applies(f) and any(
                (f.obj_label.lower() if self.lowercase else f.obj_label)
                in top[(name, PERSON_NAME_NOUNS[f.relation])] for name in names(f))
            for f in facts
        ]


def select_queries(subset: str, relations: list[Relation], tokens: ProbeTokens,
                   vocabulary: CommonVocabulary, max_length: int,
                   person_filter: PersonNameFilter | None = None
                   ) -> tuple[list[Query], list[dict[str, Any]]]:
    """Apply the filters of ``subset`` (module docstring, in order) to every fact.

    Returns the kept facts as queries and one row per dropped fact (``subset``,
    ``relation``, ``sub_label``, ``obj_label``, ``reason``), both in input order.
    """
    uhn = subset.startswith("uhn_")
    facts = [f for r in relations for f in r.facts]
    templates = {r.name: r.template for r in relations}
    object_ids = tokens.word_ids([f.obj_label for f in facts])
    reasons: list[str | None] = []
    built: list[tuple[str, list[int], int] | None] = []
    for fact, object_id in zip(facts, object_ids):
        reason, query = None, None
        if fact.yes_votes is not None and fact.other_votes > fact.yes_votes:
            reason = "judgments_majority_no"
        elif object_id is None:
            reason = "object_not_single_token"
        elif fact.obj_label not in vocabulary.words:
            reason = "object_not_in_common_vocab"
        else:
            query = tokens.query(templates[fact.relation], fact.sub_label)
            if query[1].count(tokens.mask_id) != 1:
                reason = "extra_mask_token"
            elif len(query[1]) > max_length:
                reason = "query_too_long"
            elif uhn and object_in_subject(fact):
                reason = "uhn_object_in_subject"
        reasons.append(reason)
        built.append(query)
    if uhn and person_filter is not None:
        alive = [i for i, reason in enumerate(reasons) if reason is None]
        for i, drop in zip(alive, person_filter.matches([facts[i] for i in alive])):
            if drop:
                reasons[i] = "uhn_person_name"
    seen: set[tuple[str, str, str]] = set()
    for i, fact in enumerate(facts):
        if reasons[i] is None:
            pair = (fact.relation, fact.sub_label, fact.obj_label)
            if pair in seen:
                reasons[i] = "duplicate"
            seen.add(pair)
    kept, dropped = [], []
    for fact, object_id, reason, query in zip(facts, object_ids, reasons, built):
        if reason is None:
            text, ids, mask_index = query
            kept.append(Query(subset, fact.relation, fact.sub_label, fact.obj_label, text,
                              tuple(ids), mask_index, object_id))
        else:
            dropped.append({"subset": subset, "relation": fact.relation, "sub_label": fact.sub_label,
                            "obj_label": fact.obj_label, "reason": reason})
    return kept, dropped


# ------------------------------------------------------------------------------ scoring


def pad_batch(sequences: list[list[int]] | list[tuple[int, ...]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences -> (input_ids, attention_mask), padded to the longest."""
    batch = PadCollator({"input_ids": pad_id})([{"input_ids": seq} for seq in sequences])
    return batch["input_ids"], batch["attention_mask"]


def rank_candidates(scores: torch.Tensor, candidate_ids: torch.Tensor, object_ids: torch.Tensor,
                    k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the candidates of each row by score (ties: smaller token id first).

    scores: (B, C), column j scoring token ``candidate_ids[j]`` (sorted ascending);
    object_ids: (B,) token ids, each one of the candidates. Returns the top-k token ids
    (B, k) and the 1-based rank of each row's object (B,).
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    top = candidate_ids[order[:, :k]]
    column = torch.searchsorted(candidate_ids, object_ids)
    if not bool((candidate_ids[column.clamp(max=len(candidate_ids) - 1)] == object_ids).all()):
        raise ValueError("an object id is not among the candidates")
    own = scores.gather(1, column[:, None])
    before = (scores > own) | ((scores == own) & (torch.arange(scores.shape[1], device=scores.device)[None, :] < column[:, None]))
    return top, 1 + before.sum(dim=1)


def relation_metrics(ranks: list[int]) -> dict[str, float | int]:
    """P@1, P@10, MRR (LAMA's, to rank MRR_DEPTH) and MRR@10 of one relation from its
    facts' 1-based ranks among the candidates."""
    n = len(ranks)
    return {
        "facts": n,
        "p@1": sum(r == 1 for r in ranks) / n,
        "p@10": sum(r <= 10 for r in ranks) / n,
        "mrr": sum(1.0 / r for r in ranks if r <= MRR_DEPTH) / n,
        "mrr@10": sum(1.0 / r for r in ranks if r <= 10) / n,
    }


def summarise(predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """predictions.jsonl rows of one subset and variant -> per-relation metrics and their
    means over relations (macro, as LAMA). Recomputes everything from ``rank`` alone."""
    by_relation: dict[str, list[int]] = {}
    for row in predictions:
        by_relation.setdefault(row["relation"], []).append(row["rank"])
    per_relation = {name: relation_metrics(ranks) for name, ranks in sorted(by_relation.items())}
    count = len(per_relation)
    summary: dict[str, Any] = {
        metric: (sum(m[metric] for m in per_relation.values()) / count if count else None)
        for metric in ("p@1", "p@10", "mrr", "mrr@10")
    }
    summary.update(relations=count, facts_kept=len(predictions), per_relation=per_relation)
    return summary


@torch.no_grad()
def score_queries(model: nn.Module, lm_head: nn.Module, mixes: VariantMixes, variants: list[str],
                  queries: list[Query], candidate_ids: torch.Tensor, *, batch_size: int,
                  pad_id: int, device: torch.device | str = "cpu"
                  ) -> dict[str, list[tuple[list[int], int]]]:
    """Score every query with every variant: variant -> per query (top-k ids, rank).

    ``model`` is the ``KAdapterModel`` holding the adapters of all variants: one encoder
    and adapter pass per batch serves every variant. Identical queries (a subject with
    several objects, or a fact in both a subset and its UHN version) run once. Batches
    hold queries of similar length (sorted, stable), so padding stays small.
    """
    device = torch.device(device)
    slots: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for index, query in enumerate(queries):
        slots.setdefault((query.ids, query.mask_index), []).append(index)
    keys = sorted(slots, key=lambda key: len(key[0]))
    candidates = candidate_ids.to(device)
    results: dict[str, list[Any]] = {v: [None] * len(queries) for v in variants}
    for start in progress(range(0, len(keys), batch_size), desc="LAMA scoring", unit="batch"):
        chunk = keys[start:start + batch_size]
        ids, mask = pad_batch([key[0] for key in chunk], pad_id)
        out = model(ids.to(device), mask.to(device))
        rows = torch.arange(len(chunk), device=device)
        at_mask = torch.tensor([key[1] for key in chunk], device=device)
        last = out.last_hidden_state[rows, at_mask]
        adapters = {n: o[rows, at_mask] for n, o in out.adapter_outputs.items()}
        fact_rows = [(row, index) for row, key in enumerate(chunk) for index in slots[key]]
        row_of_fact = torch.tensor([row for row, _ in fact_rows], device=device)
        objects = torch.tensor([queries[index].object_id for _, index in fact_rows], device=device)
        for variant, logits in variant_logits(lm_head, mixes, variants, last, adapters).items():
            scores = logits.float()[:, candidates][row_of_fact]
            top, ranks = rank_candidates(scores, candidates, objects)
            for (_, index), top_ids, rank in zip(fact_rows, top.tolist(), ranks.tolist()):
                results[variant][index] = (top_ids, rank)
    return results


# ------------------------------------------------------------------------ the MLM mix


def split_masked_lm(masked_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A Hugging Face ``*ForMaskedLM`` -> (its encoder, its LM head)."""
    prefix = masked_lm.base_model_prefix
    heads = [module for name, module in masked_lm.named_children() if name != prefix]
    if not hasattr(masked_lm, prefix) or len(heads) != 1:
        raise ValueError(f"{type(masked_lm).__name__}: expected an encoder '{prefix}' and one LM "
                         f"head, found children {[n for n, _ in masked_lm.named_children()]}")
    return getattr(masked_lm, prefix), heads[0]


class FeatureMix(nn.Module):
    """concat(encoder_last, adapter outputs in name order) -> hidden size, initialised
    [identity, zero]: untrained, it returns encoder_last unchanged."""

    def __init__(self, names: list[str], hidden_size: int):
        super().__init__()
        self.names = sorted(names)
        self.linear = nn.Linear((1 + len(self.names)) * hidden_size, hidden_size)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
            self.linear.bias.zero_()

    def forward(self, last: torch.Tensor, adapter_outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.linear.weight.dtype  # the encoder may run in bf16, the mix stays fp32
        features = torch.cat([last.to(dtype)] + [adapter_outputs[n].to(dtype) for n in self.names], -1)
        return self.linear(features).to(last.dtype)


class VariantMixes(nn.Module):
    """One FeatureMix per K-Adapter variant; the module the MLM training trains."""

    def __init__(self, variants: list[str], hidden_size: int):
        super().__init__()
        self.mixes = nn.ModuleDict({v: FeatureMix(adapter_names(v), hidden_size)
                                    for v in variants if v != "encoder"})

    def forward(self, last: torch.Tensor, adapter_outputs: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        return {v: mix(last, adapter_outputs) for v, mix in self.mixes.items()}


def lm_logits(lm_head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The frozen LM head on ``features``, cast to the head's own dtype: the mix computes
    in fp32 (or autocast's dtype) beside an encoder and head that may hold bf16 weights."""
    return lm_head(features.to(next(lm_head.parameters()).dtype))


def variant_logits(lm_head: nn.Module, mixes: VariantMixes, variants: list[str],
                   last: torch.Tensor, adapter_outputs: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Vocabulary logits of every variant: the encoder's LM head on the encoder's last
    state, or on a K-Adapter variant's mix of it with the adapter outputs."""
    mixed = mixes(last, adapter_outputs)
    return {v: lm_logits(lm_head, last if v == "encoder" else mixed[v]) for v in variants}


def text_blocks(paths: list[Path], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Raw text -> blocks of ``max_length`` tokens (special tokens included): non-blank
    lines tokenized, concatenated and cut, the last block possibly shorter."""
    lines = [line for path in paths for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    if not lines:
        raise InputError(paths[0], None, "no text to train on (every line is blank)")
    stream = [t for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in ids]
    probe = tokenizer("a", return_special_tokens_mask=True)
    first = probe["special_tokens_mask"].index(0)
    start, end = probe["input_ids"][:first], probe["input_ids"][first + 1:]
    inner = max_length - len(start) - len(end)
    return [{"input_ids": start + stream[i:i + inner] + end} for i in range(0, len(stream), inner)]


class MaskingCollator:
    """Pads a batch of blocks and masks it for MLM (seeded, so a run repeats exactly).
    Besides ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not masked) it
    returns ``masked_rows`` / ``masked_cols``: the masked positions in row-major order.
    Blocks that carry their own ``labels`` (masked once by ``masked_once``) are only padded."""

    def __init__(self, tokenizer: Any, probability: float, seed: int):
        self.pad = PadCollator({"input_ids": tokenizer.pad_token_id})
        self.pad_masked = PadCollator({"input_ids": tokenizer.pad_token_id, "labels": -100})
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(tokenizer.all_special_ids))
        self.probability = probability
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "labels" in items[0]:
            batch = self.pad_masked(items)
            rows, cols = (batch["labels"] != -100).nonzero().unbind(1)
            return {**batch, "masked_rows": rows, "masked_cols": cols}
        batch = self.pad(items)
        ids = batch["input_ids"]
        maskable = batch["attention_mask"].bool() & ~torch.isin(ids, self.special_ids)
        chosen = (torch.rand(ids.shape, generator=self.generator) < self.probability) & maskable
        if not bool(chosen.any()):  # a tiny batch may draw nothing: predict its first token
            chosen[maskable.nonzero()[0].unbind()] = True
        action = torch.rand(ids.shape, generator=self.generator)
        replacement = torch.randint(self.vocab_size, ids.shape, generator=self.generator)
        inputs = torch.where(chosen & (action < 0.8), self.mask_id, ids)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), replacement, inputs)
        labels = torch.where(chosen, ids, -100)
        # the masked positions, found here on the host: selecting them on the device with a
        # boolean mask would make every step wait for the device (a data-dependent shape)
        rows, cols = chosen.nonzero().unbind(1)
        return {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels,
                "masked_rows": rows, "masked_cols": cols}


def masked_once(blocks: list[dict[str, Any]], tokenizer: Any, probability: float, seed: int
                ) -> list[dict[str, Any]]:
    """Dev blocks masked once, with their own generator: every evaluation scores the same
    masked positions (a curve of dev losses compares like with like), and evaluating
    draws nothing from the training masks' generator."""
    collator = MaskingCollator(tokenizer, probability, seed)
    masked = []
    for block in blocks:
        batch = collator([block])
        masked.append({"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
    return masked


def mlm_loss_sums(logits: dict[str, torch.Tensor], labels: torch.Tensor, rows: torch.Tensor,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Per-example sums of the MLM loss of every variant (for the dev loss)."""
    sums = {}
    for variant, values in logits.items():
        nll = F.cross_entropy(values.float(), labels, reduction="none")
        sums[f"nll/{variant}"] = torch.zeros(batch_size, device=nll.device).index_add_(0, rows, nll)
    sums["masked"] = torch.zeros(batch_size, device=labels.device).index_add_(
        0, rows, torch.ones_like(labels, dtype=torch.float))
    return sums


def dev_losses(merged: dict[str, Any]) -> dict[str, float]:
    masked = float(merged["masked"].sum())
    return {f"mlm_loss/{key.split('/', 1)[1]}": float(values.sum()) / max(masked, 1.0)
            for key, values in merged.items() if key.startswith("nll/")}


# ------------------------------------------------------------------------------ reports


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def results_markdown(results: dict[str, Any]) -> str:
    """The paper-style tables (rows subsets, columns variants) and the facts accounting."""
    subsets = [s for s in SUBSETS if s in results["subsets"]]
    variants = results["variants"]
    facts = results["facts"]
    lines = [f"# LAMA probe ({results['preset']} preset, model {results['model']})", "",
             "P@1 (%), mean over relations (macro); columns are the probed models.", "",
             "| subset | relations | facts kept / read | " + " | ".join(variants) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in variants) + " |"]
    for subset in subsets:
        scores = " | ".join(percent(results["subsets"][subset][v]["p@1"]) for v in variants)
        lines.append(f"| {SUBSET_TITLES[subset]} | {results['subsets'][subset][variants[0]]['relations']} | "
                     f"{facts[subset]['kept']} / {facts[subset]['read']} | {scores} |")
    for metric, title in (("p@10", "P@10 (%)"),
                          ("mrr", "MRR (x100; LAMA's mean reciprocal rank over the candidate ranking)"),
                          ("mrr@10", "MRR@10 (x100; reciprocal rank, 0 beyond rank 10)")):
        lines += ["", f"{title}:", "", "| subset | " + " | ".join(variants) + " |",
                  "| --- | " + " | ".join("---:" for _ in variants) + " |"]
        for subset in subsets:
            lines.append(f"| {SUBSET_TITLES[subset]} | " + " | ".join(
                percent(results["subsets"][subset][v][metric]) for v in variants) + " |")
    lines += ["", "Facts dropped, by the first reason that applies:", "",
              "| subset | " + " | ".join(DROP_REASONS) + " |",
              "| --- | " + " | ".join("---:" for _ in DROP_REASONS) + " |"]
    for subset in subsets:
        counts = facts[subset]["dropped_by_reason"]
        lines.append(f"| {SUBSET_TITLES[subset]} | "
                     + " | ".join(str(counts.get(r, 0)) for r in DROP_REASONS) + " |")
    empty = {s: facts[s].get("relations_with_empty_facts_file") for s in subsets}
    if any(empty.values()):
        lines += ["", "Not probed, their facts file is empty: " + "; ".join(
            f"{SUBSET_TITLES[s]} {', '.join(names)}" for s, names in empty.items() if names) + "."]
    lines += ["", person_filter_line(results), "",
              "For comparison, the paper's P@1 (RoBERTa-large -> K-Adapter): Google-RE 4.8 -> 7.0, "
              "UHN-Google-RE 2.5 -> 3.7, T-REx 27.1 -> 29.1, UHN-T-REx 20.1 -> 23.0.", ""]
    return "\n".join(lines)


def person_filter_line(results: dict[str, Any]) -> str:
    """Whether LAMA-UHN's person-name filter ran in this run, and how many facts it removed."""
    uhn = [s for s in SUBSETS if s.startswith("uhn_") and s in results["subsets"]]
    run = results["person_name_filter"]
    if not uhn:
        return "LAMA-UHN person-name filter: not applicable (no UHN subset probed)."
    if not run["ran"]:
        return ("LAMA-UHN person-name filter: did not run (no lama.bert_model configured), so the "
                "UHN subsets keep facts that LAMA-UHN's released files remove.")
    removed = {s: results["facts"][s]["dropped_by_reason"].get("uhn_person_name", 0) for s in uhn}
    parts = ", ".join(f"{SUBSET_TITLES[s]} {n}" for s, n in removed.items())
    return (f"LAMA-UHN person-name filter: ran with {run['bert_model']} (top {run['top_k']}) and "
            f"removed {sum(removed.values())} facts ({parts}).")


def relation_order(name: str) -> tuple[int, str]:
    """P-ids in numeric order (P19 before P103), other names after them."""
    return (int(name[1:]), "") if name[:1] == "P" and name[1:].isdigit() else (1 << 30, name)


def relation_labels(lama_dir: str | Path) -> dict[str, str]:
    """Relation id -> readable name: relations.jsonl's ``label`` (P19 -> place of birth),
    Google-RE's file names in words (place_of_birth -> place of birth)."""
    labels = {name: name.replace("_", " ") for name in GOOGLE_RE_TEMPLATES}
    path = Path(lama_dir) / "relations.jsonl"
    if path.is_file():
        for _, record in read_jsonl(path):
            if isinstance(record.get("relation"), str) and isinstance(record.get("label"), str):
                labels[record["relation"]] = record["label"]
    return labels


def plot_per_relation(results: dict[str, Any], path: str | Path,
                      labels: dict[str, str] | None = None) -> None:
    """Bars of per-relation P@1: the encoder beside each K-Adapter variant, one panel per
    subset; each bar's value printed on it, the axis scaled to the data, each P-id with
    its relation's name (``labels``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    subsets = [s for s in SUBSETS if s in results["subsets"]]
    variants = results["variants"]
    fig, axes = plt.subplots(len(subsets), 1, figsize=(13, 3.8 * len(subsets)), squeeze=False)
    width = 0.8 / len(variants)
    for ax, subset in zip(axes[:, 0], subsets):
        per_variant = results["subsets"][subset]
        relations = sorted(per_variant[variants[0]]["per_relation"], key=relation_order)
        top = 0.0
        for i, variant in enumerate(variants):
            values = [100 * per_variant[variant]["per_relation"][r]["p@1"] for r in relations]
            top = max([top, *values])
            bars = ax.bar([x + (i - (len(variants) - 1) / 2) * width for x in range(len(relations))],
                          values, width,
                          label="encoder" if variant == "encoder" else f"K-Adapter ({variant})")
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=6, padding=1)
        ax.set_xticks(range(len(relations)))
        # a P-id with its name beside it (P19 place of birth); Google-RE's names alone
        ax.set_xticklabels([f"{r} {labels[r]}" if r[:1] == "P" and r[1:].isdigit() and r in labels
                            else labels.get(r, r) for r in relations],
                           rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, max(1.0, min(100.0, top * 1.2)))
        ax.set_ylabel("P@1 (%)")
        ax.set_title(f"{SUBSET_TITLES[subset]}: P@1 per relation ({results['preset']} preset)")
        ax.legend(fontsize=8, ncols=len(variants))
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def plot_mlm_curves(records: list[dict[str, Any]], path: str | Path) -> None:
    """The MLM mix's training: dev MLM loss per variant (one line each, from the loop's
    ``mlm_loss/<variant>`` records) against the optimizer step. The encoder's own head
    is not trained: its line is the reference the mixes start from (they begin as the
    identity) and should go below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dev = [r for r in records if r["kind"] == "dev"]
    names = sorted({k.split("/", 1)[1] for r in dev for k in r if k.startswith("mlm_loss/")},
                   key=lambda n: (n != "encoder", n))
    figure, axes = plt.subplots(figsize=(7, 4))
    for name in names:
        points = [(r["step"], r[f"mlm_loss/{name}"]) for r in dev if f"mlm_loss/{name}" in r]
        axes.plot(*zip(*points), marker="o",
                  **({"color": "black", "linestyle": "--", "label": "encoder (its own head, not trained)"}
                     if name == "encoder" else {"label": f"K-Adapter ({name})"}))
    axes.set(xlabel="optimizer step", ylabel="dev MLM loss (per masked token)",
             title="LAMA: MLM mix per variant, dev loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if names:
        axes.legend(fontsize=8)
    figure.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


def count_reasons(dropped: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(row["reason"] for row in dropped)
    return {reason: counts[reason] for reason in DROP_REASONS if counts[reason]}


# ------------------------------------------------------------------------------ the run


def run_lama(config: Config) -> dict[str, Any]:
    """Probe the encoder and the K-Adapter variants as configured (``config.lama``); returns
    the results written to results.json.

    Steps (sizes for the paper preset: roberta-large, LAMA's full release, WikiText-2):

    1. the encoder with its own MLM head (``model`` section) and the adapters the variants
       need (fac: ``lama.fac_adapter``, lin: ``lama.lin_adapter``), all frozen;
    2. the common vocabulary (21,018 words) -> the candidate tokens: the words that are
       one token of the model, in their mid-sentence form (" Paris" for RoBERTa);
    3. facts -> queries per subset (T-REx: 41 relations, 34,039 facts; Google-RE: 3
       relations, ~5.5K facts), every dropped fact counted with its reason;
    4. K-Adapter variants: the linear MLM mix ([identity, zero] at the start) trained on
       the raw text (WikiText-2 train: ~2M tokens, 2 epochs), through the shared training
       loop;
    5. every query scored by every variant: one encoder + adapters pass per batch, each
       variant's head on the mask position, candidates ranked;
    6. outputs, written into a temporary directory renamed over ``lama.output_dir`` at
       the end::

        results.json               subset -> variant -> P@1, P@10, MRR, MRR@10, facts kept
                                   and dropped, per relation; "facts": per-subset accounting
        results.md                 the paper-style table (rows subsets, columns variants)
        p_at_1.png                 per-relation P@1, encoder vs K-Adapter, one panel per subset
        <subset>/<variant>/predictions.jsonl   one row per kept fact: subset, relation,
                                   sub_label, obj_label, query, top10, rank (1-based, among
                                   all candidates)
        <subset>/dropped.jsonl     one row per dropped fact with its reason (the same for
                                   every variant: all share the encoder's tokenizer)
        mlm_head/                  mix.safetensors, metrics.jsonl, curves.png (when trained)
        manifest.json              inputs (with hashes), parameters, counts, versions, timings
    """
    cfg: LamaConfig = config.lama
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    # ---- 1. encoder + LM head + adapters, frozen, on the device
    accelerator = make_accelerator(cfg.mlm_head)
    device = accelerator.device
    if cfg.train_mlm_head:  # a batch that cannot split fails before any model is loaded
        batch_plan(cfg.mlm_head, accelerator.num_processes, "lama.mlm_head.batch_size")
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    masked_lm = load_encoder(model_path, masked_lm=True,
                             dtype=encoder_dtype(config.model, device, accelerator.mixed_precision))
    encoder, lm_head = split_masked_lm(masked_lm)
    hidden = encoder.config.hidden_size

    adapter_dirs = {"fac": cfg.fac_adapter, "lin": cfg.lin_adapter}
    needed = sorted({name for v in cfg.variants for name in adapter_names(v)})
    adapters, adapter_inputs = {}, {}
    for name in needed:
        directory = resolve_adapter(adapter_dirs[name])
        if not (directory / ADAPTER_CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"the {name} adapter for variant(s) "
                f"{[v for v in cfg.variants if name in adapter_names(v)]} is missing: "
                f"{directory} has no {ADAPTER_CONFIG_FILE}; build it with "
                f"`make {ADAPTER_TARGETS[name]} PRESET={config.preset}` or set --{name}_adapter")
        try:
            adapters[name] = load_adapter(directory, encoder.config).adapter
        except AdapterLoadError as err:
            raise InputError(directory, None, str(err).removeprefix(f"{directory}: ")) from None
        adapter_inputs[name] = [file_fingerprint(directory / ADAPTER_CONFIG_FILE),
                                file_fingerprint(directory / ADAPTER_WEIGHTS_FILE)]
    model = KAdapterModel(encoder, adapters, freeze_encoder=True, frozen_adapters=tuple(adapters))
    masked_lm.to(device).eval()
    model.to(device).eval()
    lm_head.requires_grad_(False)
    clock = lap("load_models", started)

    # ---- 2. candidates: the common-vocabulary words that are one token of the model
    tokens = ProbeTokens(tokenizer)
    common_words = read_common_vocab(cfg.common_vocab)
    try:
        vocabulary = CommonVocabulary(common_words, tokens)
    except ValueError as err:  # no candidate at all: the vocabulary does not fit this model
        raise InputError(cfg.common_vocab, None, f"{err} ({model_path})") from None
    max_length = max_sequence_length(encoder, tokenizer)
    print(f"{len(vocabulary.candidate_ids)} candidate tokens from {len(vocabulary.words)} common "
          f"words ({len(vocabulary.not_single_token)} are not one token of {model_path}); "
          f"object tokens {'space-prefixed' if tokens.space_prefixed else 'as written'}")

    # ---- 3. facts -> queries, per subset, every drop with its reason
    lama_dir = Path(cfg.lama_dir)
    sources: dict[str, list[Relation]] = {}
    input_files: list[Path] = [Path(cfg.common_vocab)]
    template_only: list[str] = []
    if {"google_re", "uhn_google_re"} & set(cfg.subsets):
        sources["google_re"] = read_google_re(lama_dir)
        input_files += [lama_dir / "Google_RE" / f"{r}_test.jsonl" for r in GOOGLE_RE_TEMPLATES]
    if {"trex", "uhn_trex"} & set(cfg.subsets):
        sources["trex"], template_only = read_trex(lama_dir)
        input_files += [lama_dir / "relations.jsonl"]
        input_files += [lama_dir / "TREx" / f"{r.name}.jsonl" for r in sources["trex"]]
    empty = {name: empty_relations(relations) for name, relations in sources.items()}
    for name, relations in sources.items():
        if empty[name]:
            print(f"{name}: not probed, empty facts file: {', '.join(empty[name])}")
        sources[name] = [r for r in relations if r.facts]

    person_filter = None
    person_run = {"ran": False, "bert_model": cfg.bert_model, "top_k": cfg.person_name_top_k}
    if cfg.bert_model and any(s.startswith("uhn_") for s in cfg.subsets):
        try:
            bert = load_encoder(cfg.bert_model, masked_lm=True)
            bert_tokenizer = load_tokenizer(cfg.bert_model)
        except ModelNotAvailable:
            raise ModelNotAvailable(
                f"lama.bert_model {cfg.bert_model!r} (LAMA-UHN's person-name filter) is not "
                "available: not a local model directory, and the Hugging Face hub could not "
                "provide it. Download it (e.g. `huggingface-cli download bert-base-cased --local-dir /path/to/bert-base-cased`) "
                "and set --lama.bert_model /path/to/bert-base-cased, or set --lama.bert_model null "
                "to run without the filter (the UHN subsets are then larger than LAMA-UHN's)") from None
        person_filter = PersonNameFilter(bert, bert_tokenizer, top_k=cfg.person_name_top_k,
                                         batch_size=cfg.batch_size, device=device)
        person_run["ran"] = True

    queries: dict[str, list[Query]] = {}
    dropped: dict[str, list[dict[str, Any]]] = {}
    facts_summary: dict[str, Any] = {}
    for subset in [s for s in SUBSETS if s in cfg.subsets]:
        relations = sources[subset.removeprefix("uhn_")]
        queries[subset], dropped[subset] = select_queries(
            subset, relations, tokens, vocabulary, max_length, person_filter)
        per_relation = {}
        for relation in sorted(relations, key=lambda r: r.name):
            gone = [d for d in dropped[subset] if d["relation"] == relation.name]
            per_relation[relation.name] = {"read": len(relation.facts),
                                           "kept": len(relation.facts) - len(gone),
                                           "dropped_by_reason": count_reasons(gone)}
        facts_summary[subset] = {
            "read": sum(len(r.facts) for r in relations), "kept": len(queries[subset]),
            "dropped": len(dropped[subset]), "dropped_by_reason": count_reasons(dropped[subset]),
            "per_relation": per_relation}
        facts_summary[subset]["relations_with_empty_facts_file"] = empty[subset.removeprefix("uhn_")]
        if subset.endswith("trex"):
            facts_summary[subset]["relations_without_facts_file"] = template_only
        print(f"{subset}: {facts_summary[subset]['read']} facts -> {len(queries[subset])} kept; "
              f"dropped {facts_summary[subset]['dropped_by_reason']}")
    clock = lap("build_queries", clock)

    with atomic_output_dir(cfg.output_dir, stage="eval_lama") as out:
        # ---- 4. K-Adapter variants: train the MLM mix (encoder, adapters, LM head frozen)
        mixes = VariantMixes(cfg.variants, hidden).to(device)
        head_cfg = cfg.mlm_head
        mlm_report: dict[str, Any] = {"trained": False}
        text_files: list[Path] = []
        if len(mixes.mixes) and cfg.train_mlm_head:
            text_files = expand_inputs(head_cfg.text)
            train_blocks = text_blocks(text_files, tokenizer, head_cfg.max_length)
            dev_blocks = None
            if head_cfg.dev_text:
                dev_files = expand_inputs(head_cfg.dev_text)
                text_files += dev_files
                dev_blocks = masked_once(
                    text_blocks(dev_files, tokenizer, head_cfg.max_length), tokenizer,
                    head_cfg.mask_probability, config.seed + 1)
            print(f"MLM mix: {len(train_blocks)} training blocks of <= {head_cfg.max_length} "
                  f"tokens from {len(text_files)} file(s); variants {sorted(mixes.mixes)}")

            def frozen_forward(frozen: KAdapterModel, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
                # features of the masked positions only: the heads never need the others
                out_ = frozen(batch["input_ids"], batch["attention_mask"])
                rows, cols = batch["masked_rows"], batch["masked_cols"]  # from the collator
                return {"last": out_.last_hidden_state[rows, cols],
                        "adapters": {n: o[rows, cols] for n, o in out_.adapter_outputs.items()},
                        "labels": batch["labels"][rows, cols], "rows": rows}

            def loss_fn(trained: VariantMixes, batch: dict[str, torch.Tensor],
                        features: dict[str, Any]) -> torch.Tensor:
                # the mixes are disjoint, so the summed loss trains each on its own loss
                mixed = trained(features["last"], features["adapters"])
                return sum(torch.nn.functional.cross_entropy(lm_logits(lm_head, m).float(),
                                                             features["labels"])
                           for m in mixed.values())

            def predict_fn(trained: VariantMixes, batch: dict[str, torch.Tensor],
                           features: dict[str, Any]) -> dict[str, torch.Tensor]:
                logits = variant_logits(lm_head, trained, ["encoder", *trained.mixes],
                                        features["last"], features["adapters"])
                return mlm_loss_sums(logits, features["labels"], features["rows"],
                                     batch["input_ids"].shape[0])

            result = train(
                head_cfg, model=mixes, train_data=train_blocks, dev_data=dev_blocks,
                collate=MaskingCollator(tokenizer, head_cfg.mask_probability, config.seed),
                loss_fn=loss_fn, predict_fn=predict_fn, metrics_fn=dev_losses,
                frozen=model, frozen_forward=frozen_forward, output_dir=out / "mlm_head",
                seed=config.seed, accelerator=accelerator, description="LAMA MLM mix",
                batch_key="lama.mlm_head.batch_size")
            mixes = result.model.eval()
            # per-variant curves (the loop's own plot shows the loss summed over the variants)
            plot_mlm_curves(read_metrics(out / "mlm_head"), out / "mlm_head" / "curves.png")
            shutil.rmtree(out / "mlm_head" / "checkpoints", ignore_errors=True)  # weights below
            atomic_save_safetensors({k: v.detach().cpu().contiguous() for k, v in mixes.state_dict().items()},
                                    out / "mlm_head" / "mix.safetensors")
            mlm_report = {"trained": True, "steps": result.global_step,
                          "batch": {**result.batch.to_dict(),
                                    "examples_left_per_epoch": result.examples_left_per_epoch},
                          "train_blocks": len(train_blocks),
                          "dev_blocks": len(dev_blocks) if dev_blocks else 0,
                          "dev_mlm_loss": result.dev_metrics}
            timings["mlm_mix_tokens_per_s"] = round(result.tokens_per_s, 1)
            if result.dev_metrics:
                print("MLM dev loss: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}"
                                                   for k, v in sorted(result.dev_metrics.items())))
        clock = lap("train_mlm_mix", clock)

        # ---- 5. score every query with every variant
        everything = [q for subset in queries for q in queries[subset]]
        with accelerator.autocast():  # the precision of lama.mlm_head.bf16, as in training
            scored = score_queries(
                model, lm_head, mixes, cfg.variants, everything, vocabulary.candidate_ids,
                batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id, device=device)
        clock = lap("score", clock)

        # ---- 6. predictions, dropped facts, results, plot, manifest
        results: dict[str, Any] = {
            "preset": config.preset, "model": model_path, "variants": list(cfg.variants),
            "metrics": "p@1, p@10: share of facts whose object ranks 1st / in the top 10 of "
                       "the common-vocabulary candidates; mrr: LAMA's mean reciprocal rank over "
                       f"the ranking (0 beyond rank {MRR_DEPTH}); mrr@10: mean reciprocal "
                       "rank, 0 beyond rank 10; a subset's value is the mean over its relations",
            "person_name_filter": person_run, "subsets": {}, "facts": facts_summary}
        position = 0
        for subset, subset_queries in queries.items():
            indices = range(position, position + len(subset_queries))
            position += len(subset_queries)
            atomic_write_bytes(out / subset / "dropped.jsonl",
                               b"".join(orjson.dumps(row) + b"\n" for row in dropped[subset]))
            results["subsets"][subset] = {}
            for variant in cfg.variants:
                rows = []
                for query, index in zip(subset_queries, indices):
                    top_ids, rank = scored[variant][index]
                    rows.append({"subset": subset, "relation": query.relation,
                                 "sub_label": query.sub_label, "obj_label": query.obj_label,
                                 "query": query.text,
                                 "top10": [vocabulary.decoded[i] for i in top_ids],
                                 "rank": rank})
                atomic_write_bytes(out / subset / variant / "predictions.jsonl",
                                   b"".join(orjson.dumps(row) + b"\n" for row in rows))
                summary = summarise(rows)
                summary["facts_dropped"] = facts_summary[subset]["dropped"]
                results["subsets"][subset][variant] = summary
        results["mlm_head"] = mlm_report
        atomic_write_json(out / "results.json", results)
        atomic_write_bytes(out / "results.md", results_markdown(results).encode())
        plot_per_relation(results, out / "p_at_1.png", relation_labels(cfg.lama_dir))
        lap("write", clock)
        timings["total"] = round(time.perf_counter() - started, 3)
        atomic_write_json(out / "manifest.json", {
            "stage": "eval_lama",
            "inputs": {"lama": [file_fingerprint(p) for p in input_files],
                       "mlm_text": [file_fingerprint(p) for p in text_files],
                       "model": model_path, "adapters": adapter_inputs,
                       "bert_model": cfg.bert_model},
            "parameters": {"seed": config.seed, "lama": to_plain(cfg), "model": to_plain(config.model),
                           "device": str(device), "max_query_length": max_length,
                           "precision": precision_of(cfg.mlm_head).to_dict(),
                           "mlm_head_batch": mlm_report.get("batch")},
            "counts": {"common_vocab_words": len(vocabulary.words),
                       "candidates": len(vocabulary.candidate_ids),
                       "common_words_not_single_token": len(vocabulary.not_single_token),
                       "object_token_form": "space-prefixed" if tokens.space_prefixed else "as written",
                       "facts": {s: {k: v for k, v in f.items() if k != "per_relation"}
                                 for s, f in facts_summary.items()},
                       "unique_queries": len({(q.ids, q.mask_index) for q in everything})},
            "versions": versions(),
            "timings_s": timings,
        })

    print(results_markdown(results).split("\n\nP@10")[0])
    print(f"wrote {cfg.output_dir}")
    return results

