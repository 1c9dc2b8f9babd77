"""One Markdown report of a preset's whole run: ``runs/<preset>/report.md``.

Everything in it is read from the files the stages wrote (manifests, metrics, tables,
figures); nothing is recomputed. Sections: the data stages' counts, both adapters' dev
metrics and curves, the fine-tuning table and chart, the LAMA table and charts, and the
environment (versions, devices, wall times). Every figure and table names the file it
came from, linked relative to the report. A stage that has not run is listed as such.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kadapter.config import Config
from kadapter.io import atomic_write_bytes, read_json

REPORT_FILE = "report.md"


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _figure(path: Path, base: Path, caption: str, data: Path | None = None) -> list[str]:
    """The image, then a caption naming the PNG and the file its values were drawn from."""
    if not path.is_file():
        return [f"({caption}: `{_link(path, base)}` not found)", ""]
    drawn = f", drawn from [`{_link(data, base)}`]({_link(data, base)})" if data else ""
    return [f"![{caption}]({_link(path, base)})", "",
            f"*{caption}*: [`{_link(path, base)}`]({_link(path, base)}){drawn}.", ""]


def _source(path: Path, base: Path) -> str:
    return f"From [`{_link(path, base)}`]({_link(path, base)})."


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _missing(what: str, target: str) -> list[str]:
    return [f"Not run yet (`make {target}`): no {what}.", ""]


def _data_section(config: Config, base: Path, wall: dict[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    trex = Path(config.data_trex.output_dir) / "manifest.json" if "data_trex" in config.sections else None
    lines += ["### T-REx relation classification (factual adapter)", ""]
    if trex is not None and trex.is_file():
        c = read_json(trex)["counts"]
        rows = [("documents", c.get("documents")), ("triples read", c.get("triples_read")),
                ("candidates (both mentions in one sentence)", c.get("candidates")),
                ("after the entity filter", c.get("after_entity_filter")),
                ("after the relation filter", c.get("after_relation_filter")),
                ("relations kept", c.get("relations_kept")),
                ("train / dev examples", f"{c['examples']['train']:,} / {c['examples']['dev']:,}")]
        lines += ["| step | count |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows
                                                      if v is not None]
        lines += ["", _source(trex, base), ""]
    else:
        lines += _missing("T-REx manifest", "data-trex")
    deps = Path(config.data_deps.output_dir) / "manifest.json" if "data_deps" in config.sections else None
    lines += ["### Dependency heads (linguistic adapter)", ""]
    if deps is not None and deps.is_file():
        manifest = read_json(deps)
        c = manifest["counts"]
        dropped = ", ".join(f"{k} {v:,}" for k, v in c["sentences"].get("dropped", {}).items()) or "none"
        parser = manifest.get("parser") or {}
        rows = [("parser", " ".join(str(parser.get(k, "")) for k in ("backend", "model", "model_version"))
                 if isinstance(parser, dict) else parser),
                ("lines read", c["lines"]["read"]), ("sentences parsed", c["sentences"]["parsed"]),
                ("sentences kept", c["sentences"]["kept"]), ("sentences dropped", dropped),
                ("train / dev sentences", f"{c['splits']['train']['sentences']:,} / "
                                          f"{c['splits']['dev']['sentences']:,}")]
        lines += ["| step | count |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
        lines += ["", _source(deps, base), ""]
    else:
        lines += _missing("dependency manifest", "data-deps")
    return lines


def _adapters_section(config: Config, base: Path, wall: dict[str, Any],
                      devices: set[str]) -> list[str]:
    lines = ["## Adapters", ""]
    serial = config.sections.get("serial_adapter")
    runs = []
    for task, title in (("fac", "Factual adapter (T-REx relation classification)"),
                        ("lin", "Linguistic adapter (dependency head prediction)")):
        section = config.sections.get(f"pretrain_{task}")
        runs.append((task, title, section and Path(section.output_dir)))
        if serial is not None:  # Houlsby et al.'s serial adapters, pretrained on the same task
            runs.append((f"serial-{task}", f"Serial adapters, {title[0].lower()}{title[1:]}",
                         serial.output_dir(task)))
    for task, title, run in runs:
        lines += [f"### {title}", ""]
        manifest = run / "manifest.json" if run else None
        if manifest is None or not manifest.is_file():
            lines += _missing(f"{task} adapter", f"pretrain-{task}")
            continue
        m = read_json(manifest)
        training = m["training"]
        wall[f"pretrain {task}"] = training.get("wall_seconds")
        devices.add(f"{training.get('device')} x {training.get('processes')} process(es), "
                    f"mixed precision {training.get('mixed_precision')}")
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (m.get("dev_metrics") or {}).items())
        lines.append(f"Dev: {metrics}.")
        if m.get("majority_baseline"):
            lines.append(f"Majority-class baseline: accuracy {m['majority_baseline']['accuracy']:.4f}.")
        parameters = m.get("parameters")
        trainable = (f"{parameters['trainable']:,} of {parameters['total']:,} parameters trained, "
                     if parameters else "")
        lines += [f"{trainable}{training['steps']:,} optimizer steps, {training['tokens']:,} training "
                  f"tokens at {training['tokens_per_s']:,.0f} tokens/s. {_source(manifest, base)}", ""]
        lines += _figure(manifest.parent / "curves.png", base,
                         f"{task} adapter: training loss and dev metrics per step",
                         manifest.parent / "metrics.jsonl")
    return lines


def _finetune_section(config: Config, base: Path, wall: dict[str, Any]) -> list[str]:
    lines = ["## Fine-tuning", ""]
    if "finetune" not in config.sections or not Path(config.finetune.results).is_file():
        return lines + _missing("results table", "finetune")
    results = Path(config.finetune.results)
    body = results.read_text(encoding="utf-8").split("\n", 1)[1]  # its own title dropped
    lines += [body.replace("\n## ", "\n#### ").strip(), "", _source(results, base), ""]
    lines += _figure(results.with_suffix(".png"), base, "main metric per task and variant",
                     Path(config.finetune.output_dir))
    seconds = []
    for manifest in sorted(Path(config.finetune.output_dir).glob("**/manifest.json")):
        seconds.append(read_json(manifest).get("training", {}).get("wall_seconds") or 0.0)
    if seconds:
        wall[f"fine-tuning ({len(seconds)} runs)"] = round(sum(seconds), 3)
    return lines


def _lama_section(config: Config, base: Path, wall: dict[str, Any]) -> list[str]:
    lines = ["## LAMA", ""]
    out = Path(config.lama.output_dir) if "lama" in config.sections else None
    if out is None or not (out / "results.md").is_file():
        return lines + _missing("LAMA results", "eval-lama")
    body = (out / "results.md").read_text(encoding="utf-8").split("\n", 1)[1]
    lines += [body.strip(), "", _source(out / "results.md", base), ""]
    lines += _figure(out / "p_at_1.png", base, "LAMA P@1 per relation", out / "results.json")
    lines += _figure(out / "mlm_head" / "curves.png", base, "MLM mix: dev loss per variant",
                     out / "mlm_head" / "metrics.jsonl")
    manifest = out / "manifest.json"
    if manifest.is_file():
        wall["LAMA"] = read_json(manifest).get("timings_s", {}).get("total")
    return lines


def _environment_section(config: Config, base: Path, wall: dict[str, Any],
                         devices: set[str]) -> list[str]:
    manifests = [p for p in (
        Path(config.data_trex.output_dir) / "manifest.json" if "data_trex" in config.sections else None,
        Path(config.data_deps.output_dir) / "manifest.json" if "data_deps" in config.sections else None,
        *(Path(s.output_dir) / "manifest.json" for n, s in config.sections.items()
          if n.startswith("pretrain_")),
        Path(config.lama.output_dir) / "manifest.json" if "lama" in config.sections else None,
    ) if p is not None and p.is_file()]
    lines = ["## Environment", ""]
    versions: dict[str, set[str]] = {}
    for manifest in manifests:
        for name, version in (read_json(manifest).get("versions") or {}).items():
            versions.setdefault(name, set()).add(str(version))
    if versions:
        lines += ["| package | version |", "|---|---|"]
        lines += [f"| {name} | {', '.join(sorted(v))} |" for name, v in sorted(versions.items())]
        lines.append("")
    if devices:
        lines += ["Devices: " + "; ".join(sorted(devices)) + ".", ""]
    recorded = {k: v for k, v in wall.items() if v}
    if recorded:
        lines += ["| stage | wall time (s) |", "|---|---:|"]
        lines += [f"| {k} | {v:,.1f} |" for k, v in recorded.items()]
        lines += ["", "Data stages print their time but do not record it in their manifests.", ""]
    lines.append("Manifests read: " + ", ".join(f"[`{_link(p, base)}`]({_link(p, base)})"
                                                for p in manifests) + ".")
    return lines


def build_report(config: Config, path: str | Path | None = None) -> Path:
    """Write the report of ``config``'s preset (default ``runs/<preset>/report.md``)."""
    path = Path(path or Path("runs") / config.preset / REPORT_FILE)
    base = path.parent
    wall: dict[str, Any] = {}
    devices: set[str] = set()
    lines = [f"# kadapter report: preset `{config.preset}`", "",
             f"Configuration: `{config.source}`, seed {config.seed}. Figures and tables are "
             "linked to the files they come from.", ""]
    lines += _data_section(config, base, wall)
    lines += _adapters_section(config, base, wall, devices)
    lines += _finetune_section(config, base, wall)
    lines += _lama_section(config, base, wall)
    lines += _environment_section(config, base, wall, devices)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
