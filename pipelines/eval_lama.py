"""LAMA probe of the encoder and of K-Adapter: P@1 on Google-RE, T-REx and their UHN variants.

    python -m pipelines.eval_lama --config configs/sample.yaml [--key value ...]
    python -m pipelines.eval_lama --config configs/paper.yaml --lama_dir /data/LAMA/data \\
        --bert_model /models/bert-base-cased --lama.mlm_head.batch_size 16

Steps (sizes for the paper preset: roberta-large, LAMA's full release, WikiText-2):
1. the encoder with its own MLM head (``model`` section) and the adapters the variants
   need (fac: ``lama.fac_adapter``, lin: ``lama.lin_adapter``), all frozen;
2. the common vocabulary (21,018 words) -> the candidate tokens: the words that are one
   token of the model, in their mid-sentence form (" Paris" for RoBERTa);
3. facts -> queries per subset (T-REx: 41 relations, 34,039 facts; Google-RE: 3
   relations, ~5.5K facts), every dropped fact counted with its reason;
4. K-Adapter variants: the linear MLM mix ([identity, zero] at the start) trained on the
   raw text (WikiText-2 train: ~2M tokens, 2 epochs), through the shared training loop;
5. every query scored by every variant: one encoder + adapters pass per batch, each
   variant's head on the mask position, candidates ranked;
6. outputs, written into a temporary directory renamed over ``lama.output_dir`` at the end:

    results.json               subset -> variant -> P@1, P@10, MRR, MRR@10, facts kept and
                               dropped, per relation; "facts": per-subset accounting
    results.md                 the paper-style table (rows subsets, columns variants)
    p_at_1.png                 per-relation P@1, encoder vs K-Adapter, one panel per subset
    <subset>/<variant>/predictions.jsonl   one row per kept fact: subset, relation,
                               sub_label, obj_label, query, top10, rank (1-based, among
                               all candidates)
    <subset>/dropped.jsonl     one row per dropped fact with its reason (the same for every
                               variant: all share the encoder's tokenizer)
    mlm_head/                  mix.safetensors, metrics.jsonl, curves.png (when trained)
    manifest.json              inputs (with hashes), parameters, counts, versions, timings

The rules (filters, token forms, scoring) are in kadapter/lama.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from kadapter.config import Config, to_plain

from .common import run_stage


def main(config: Config) -> dict[str, Any]:
    import orjson
    import torch

    from kadapter import lama
    from kadapter.hub import resolve_adapter
    from kadapter.io import (
        InputError,
        atomic_output_dir,
        atomic_save_safetensors,
        atomic_write_bytes,
        atomic_write_json,
        expand_inputs,
        file_fingerprint,
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
    from kadapter.training import batch_plan, make_accelerator, precision_of, read_metrics, train

    cfg: lama.LamaConfig = config.lama
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
    encoder, lm_head = lama.split_masked_lm(masked_lm)
    hidden = encoder.config.hidden_size

    adapter_dirs = {"fac": cfg.fac_adapter, "lin": cfg.lin_adapter}
    needed = sorted({name for v in cfg.variants for name in lama.adapter_names(v)})
    adapters, adapter_inputs = {}, {}
    for name in needed:
        directory = resolve_adapter(adapter_dirs[name])
        if not (directory / ADAPTER_CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"the {name} adapter for variant(s) "
                f"{[v for v in cfg.variants if name in lama.adapter_names(v)]} is missing: "
                f"{directory} has no {ADAPTER_CONFIG_FILE}; build it with "
                f"`make {lama.ADAPTER_TARGETS[name]} PRESET={config.preset}` or set --{name}_adapter")
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
    tokens = lama.ProbeTokens(tokenizer)
    common_words = lama.read_common_vocab(cfg.common_vocab)
    try:
        vocabulary = lama.CommonVocabulary(common_words, tokens)
    except ValueError as err:  # no candidate at all: the vocabulary does not fit this model
        raise InputError(cfg.common_vocab, None, f"{err} ({model_path})") from None
    max_length = max_sequence_length(encoder, tokenizer)
    print(f"{len(vocabulary.candidate_ids)} candidate tokens from {len(vocabulary.words)} common "
          f"words ({len(vocabulary.not_single_token)} are not one token of {model_path}); "
          f"object tokens {'space-prefixed' if tokens.space_prefixed else 'as written'}")

    # ---- 3. facts -> queries, per subset, every drop with its reason
    lama_dir = Path(cfg.lama_dir)
    sources: dict[str, list[lama.Relation]] = {}
    input_files: list[Path] = [Path(cfg.common_vocab)]
    template_only: list[str] = []
    if {"google_re", "uhn_google_re"} & set(cfg.subsets):
        sources["google_re"] = lama.read_google_re(lama_dir)
        input_files += [lama_dir / "Google_RE" / f"{r}_test.jsonl" for r in lama.GOOGLE_RE_TEMPLATES]
    if {"trex", "uhn_trex"} & set(cfg.subsets):
        sources["trex"], template_only = lama.read_trex(lama_dir)
        input_files += [lama_dir / "relations.jsonl"]
        input_files += [lama_dir / "TREx" / f"{r.name}.jsonl" for r in sources["trex"]]
    empty = {name: lama.empty_relations(relations) for name, relations in sources.items()}
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
        person_filter = lama.PersonNameFilter(bert, bert_tokenizer, top_k=cfg.person_name_top_k,
                                              batch_size=cfg.batch_size, device=device)
        person_run["ran"] = True

    queries: dict[str, list[lama.Query]] = {}
    dropped: dict[str, list[dict[str, Any]]] = {}
    facts_summary: dict[str, Any] = {}
    for subset in [s for s in lama.SUBSETS if s in cfg.subsets]:
        relations = sources[subset.removeprefix("uhn_")]
        queries[subset], dropped[subset] = lama.select_queries(
            subset, relations, tokens, vocabulary, max_length, person_filter)
        per_relation = {}
        for relation in sorted(relations, key=lambda r: r.name):
            gone = [d for d in dropped[subset] if d["relation"] == relation.name]
            per_relation[relation.name] = {"read": len(relation.facts),
                                           "kept": len(relation.facts) - len(gone),
                                           "dropped_by_reason": lama.count_reasons(gone)}
        facts_summary[subset] = {
            "read": sum(len(r.facts) for r in relations), "kept": len(queries[subset]),
            "dropped": len(dropped[subset]), "dropped_by_reason": lama.count_reasons(dropped[subset]),
            "per_relation": per_relation}
        facts_summary[subset]["relations_with_empty_facts_file"] = empty[subset.removeprefix("uhn_")]
        if subset.endswith("trex"):
            facts_summary[subset]["relations_without_facts_file"] = template_only
        print(f"{subset}: {facts_summary[subset]['read']} facts -> {len(queries[subset])} kept; "
              f"dropped {facts_summary[subset]['dropped_by_reason']}")
    clock = lap("build_queries", clock)

    with atomic_output_dir(cfg.output_dir, stage="eval_lama") as out:
        # ---- 4. K-Adapter variants: train the MLM mix (encoder, adapters, LM head frozen)
        mixes = lama.VariantMixes(cfg.variants, hidden).to(device)
        head_cfg = cfg.mlm_head
        mlm_report: dict[str, Any] = {"trained": False}
        text_files: list[Path] = []
        if len(mixes.mixes) and cfg.train_mlm_head:
            text_files = expand_inputs(head_cfg.text)
            train_blocks = lama.text_blocks(text_files, tokenizer, head_cfg.max_length)
            dev_blocks = None
            if head_cfg.dev_text:
                dev_files = expand_inputs(head_cfg.dev_text)
                text_files += dev_files
                dev_blocks = lama.masked_once(
                    lama.text_blocks(dev_files, tokenizer, head_cfg.max_length), tokenizer,
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

            def loss_fn(trained: lama.VariantMixes, batch: dict[str, torch.Tensor],
                        features: dict[str, Any]) -> torch.Tensor:
                # the mixes are disjoint, so the summed loss trains each on its own loss
                mixed = trained(features["last"], features["adapters"])
                return sum(torch.nn.functional.cross_entropy(lama.lm_logits(lm_head, m).float(),
                                                             features["labels"])
                           for m in mixed.values())

            def predict_fn(trained: lama.VariantMixes, batch: dict[str, torch.Tensor],
                           features: dict[str, Any]) -> dict[str, torch.Tensor]:
                logits = lama.variant_logits(lm_head, trained, ["encoder", *trained.mixes],
                                             features["last"], features["adapters"])
                return lama.mlm_loss_sums(logits, features["labels"], features["rows"],
                                          batch["input_ids"].shape[0])

            result = train(
                head_cfg, model=mixes, train_data=train_blocks, dev_data=dev_blocks,
                collate=lama.MaskingCollator(tokenizer, head_cfg.mask_probability, config.seed),
                loss_fn=loss_fn, predict_fn=predict_fn, metrics_fn=lama.dev_losses,
                frozen=model, frozen_forward=frozen_forward, output_dir=out / "mlm_head",
                seed=config.seed, accelerator=accelerator, description="LAMA MLM mix",
                batch_key="lama.mlm_head.batch_size")
            mixes = result.model.eval()
            # per-variant curves (the loop's own plot shows the loss summed over the variants)
            lama.plot_mlm_curves(read_metrics(out / "mlm_head"), out / "mlm_head" / "curves.png")
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
            scored = lama.score_queries(
                model, lm_head, mixes, cfg.variants, everything, vocabulary.candidate_ids,
                batch_size=cfg.batch_size, pad_id=tokenizer.pad_token_id, device=device)
        clock = lap("score", clock)

        # ---- 6. predictions, dropped facts, results, plot, manifest
        results: dict[str, Any] = {
            "preset": config.preset, "model": model_path, "variants": list(cfg.variants),
            "metrics": "p@1, p@10: share of facts whose object ranks 1st / in the top 10 of "
                       "the common-vocabulary candidates; mrr: LAMA's mean reciprocal rank over "
                       f"the ranking (0 beyond rank {lama.MRR_DEPTH}); mrr@10: mean reciprocal "
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
                summary = lama.summarise(rows)
                summary["facts_dropped"] = facts_summary[subset]["dropped"]
                results["subsets"][subset][variant] = summary
        results["mlm_head"] = mlm_report
        atomic_write_json(out / "results.json", results)
        atomic_write_bytes(out / "results.md", lama.results_markdown(results).encode())
        lama.plot_per_relation(results, out / "p_at_1.png", lama.relation_labels(cfg.lama_dir))
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

    print(lama.results_markdown(results).split("\n\nP@10")[0])
    print(f"wrote {cfg.output_dir}")
    return results


if __name__ == "__main__":
    run_stage("pipelines.eval_lama", "lama", main)
