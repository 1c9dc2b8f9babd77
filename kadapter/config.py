"""Typed configuration: dataclasses loaded from YAML, overridable from the command line.

A preset file (``configs/<preset>.yaml``) has two top-level scalars, ``preset`` and
``seed``, and one mapping per *section*. Each section is a dataclass defined beside
the code that uses it; ``SECTIONS`` maps section names to those classes (imported
lazily, so loading a config never imports torch unless a section needs it).

Rules:
- Every key must be a field of its dataclass: unknown keys are an error that names
  the file and the dotted key.
- Values are checked against the field's type annotation (``int``, ``float``, ``str``,
  ``bool``, ``list[...]``, ``dict[str, ...]``, ``X | None``, nested dataclasses,
  ``Literal[...]``).
- The string ``{preset}`` inside any string value, from the file or from a field's
  default, is replaced by the preset's name, so defaults like
  ``data/processed/{preset}/trex_rc`` follow the preset.
- Overrides are ``--section.field value`` or, for the pipeline's own section,
  ``--field value`` (``--field=value`` alike); values are parsed as YAML (``--workers 4``,
  ``--positions [0,11,23]``, booleans ``true`` / ``false``). A misspelt key or section is an
  error that suggests the closest known name.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

# section name -> "module:Class". Each stage owns its dataclass.
SECTIONS: dict[str, str] = {
    "model": "kadapter.modeling:ModelConfig",
    "adapter": "kadapter.modeling:AdapterConfig",
    "data_trex": "kadapter.trex:TrexConfig",
    "data_deps": "kadapter.deps:DepsConfig",
    "pretrain_fac": "kadapter.pretrain:PretrainConfig",
    "pretrain_lin": "kadapter.pretrain:PretrainConfig",
    "pretrain_multitask": "kadapter.multitask:MultitaskConfig",
    "serial_adapter": "kadapter.serial:SerialAdapterConfig",
    "finetune": "kadapter.finetune:FinetuneConfig",
    "adapterdrop": "kadapter.adapterdrop:AdapterDropConfig",
    "lama": "kadapter.lama:LamaConfig",
}
TOP_LEVEL = {"preset": str, "seed": int}


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message names where."""


def did_you_mean(name: str, known: list[str] | set[str], prefix: str = "") -> str:
    """``" (did you mean --data_trex?)"`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


@dataclasses.dataclass
class Config:
    """A whole preset: its name, the global seed and the sections present in the file."""

    preset: str
    seed: int
    sections: dict[str, Any]
    source: str

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        if name in SECTIONS:
            raise ConfigError(f"{self.__dict__.get('source')}: section '{name}' is missing")
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "seed": self.seed,
            **{k: to_plain(v) for k, v in self.sections.items()},
        }


def section_class(name: str) -> type:
    module_name, class_name = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively (for JSON manifests)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (nested dataclasses built)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {
            coerce(k, key_tp, where): coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "2e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type):
        if tp is int and isinstance(value, bool):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = get_type_hints(cls, vars(sys.modules[cls.__module__]))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}"
            f"{did_you_mean(unknown[0], set(fields))}; known: {sorted(fields)}"
        )
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _substitute(value: Any, preset: str) -> Any:
    """Replace ``{preset}`` in every string, also inside built dataclasses (their defaults)."""
    if isinstance(value, str):
        return value.replace("{preset}", preset)
    if isinstance(value, list):
        return [_substitute(v, preset) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, preset) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            setattr(value, f.name, _substitute(getattr(value, f.name), preset))
    return value


def parse_overrides(argv: list[str], default_section: str | None) -> dict[str, Any]:
    """``["--a.b", "3", "--c", "x"]`` -> ``{"a": {"b": 3}, default_section: {"c": "x"}}``.

    A key whose first part is a top-level key (``preset``, ``seed``) or a section name
    stays as written; any other key (``--epochs``, ``--mlm_head.epochs``) belongs to
    ``default_section``.
    """
    tree: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        key = argv[i]
        if not key.startswith("--") or len(key) <= 2:
            raise ConfigError(f"command line: expected --key value, got {key!r}")
        key = key[2:]
        if "=" in key:  # --key=value: the value is kept exactly as written
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"command line: --{key} needs a value")
            raw = argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"command line: --{key}: {err}") from err
        path = key.split(".")
        if path[0] not in TOP_LEVEL and path[0] not in SECTIONS:
            if default_section is None:
                raise ConfigError(f"command line: --{key} needs a section (--section.{key})"
                                  f"{did_you_mean(path[0], set(SECTIONS) | set(TOP_LEVEL), '--')}")
            _check_section_key(key, path[0], default_section)
            path = [default_section, *path]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: --{key} conflicts with another override")
        node[path[-1]] = value
    return tree


def _check_section_key(key: str, name: str, section: str) -> None:
    """``--data_tre.workers`` in the pretrain_fac stage: neither a section nor a field of
    pretrain_fac; say which name was meant (the closest field or section)."""
    fields = {f.name for f in dataclasses.fields(section_class(section))}
    if name in fields:
        return
    known = fields | set(SECTIONS) | set(TOP_LEVEL)
    hint = did_you_mean(name, known, "--")
    if "." in key and hint:
        hint = hint.replace("?)", f"{key[len(name):]}?)")
    raise ConfigError(f"command line: --{key}: unknown key(s) [{name!r}] for section "
                      f"{section!r}{hint}")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path, overrides: list[str] | None = None, default_section: str | None = None
) -> Config:
    """Load a preset file, apply command-line overrides, validate every section."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    raw = _merge(raw, parse_overrides(overrides or [], default_section))
    unknown = sorted(set(raw) - set(TOP_LEVEL) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {unknown}"
            f"{did_you_mean(unknown[0], set(TOP_LEVEL) | set(SECTIONS))}; "
            f"known: {sorted(TOP_LEVEL) + sorted(SECTIONS)}"
        )
    preset = raw.get("preset", path.stem)
    if not isinstance(preset, str) or not preset:
        raise ConfigError(f"{path}: preset must be a non-empty string")
    seed = coerce(raw.get("seed", 0), int, f"{path}:seed")
    # Errors name where a value came from: the file, or the file plus the command line.
    origin = f"{path} + command line" if overrides else str(path)
    sections = {
        name: _substitute(build(section_class(name), raw[name], f"{origin}:{name}"), preset)
        for name in SECTIONS
        if name in raw
    }
    return Config(preset=preset, seed=seed, sections=sections, source=str(path))


def shipped_presets() -> dict[str, Path]:
    """The presets shipped with the code, by name: ``kadapter/presets/*.yaml`` in an
    installed package (pyproject.toml maps ``configs/`` there), ``configs/*.yaml`` in a
    source checkout."""
    package = Path(__file__).resolve().parent
    for directory in (package / "presets", package.parent / "configs"):
        if directory.is_dir():
            return {p.stem: p for p in sorted(directory.glob("*.yaml"))}
    return {}


def resolve_preset(name_or_path: str) -> Path:
    """``--config`` value -> a preset file: an existing path, else a shipped preset's name
    (``paper``, ``sample``). Relative paths inside a preset resolve against the current
    directory, as every path on the command line does."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    presets = shipped_presets()
    if name_or_path in presets:
        shipped = presets[name_or_path]
        cwd = Path.cwd().resolve()
        return shipped.relative_to(cwd) if shipped.is_relative_to(cwd) else shipped
    hint = did_you_mean(name_or_path, set(presets))
    raise ConfigError(f"config {name_or_path!r} not found: neither a file nor a shipped preset "
                      f"({', '.join(presets) or 'none found'}){hint}")


def parse_bool(value: str, where: str) -> bool:
    """``true`` / ``false`` (any case) -> bool; anything else is an error."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or value.strip().lower() not in ("true", "false"):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value.strip().lower() == "true"


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """The default values of a config dataclass (for docs and tests)."""
    return to_plain(cls())


__all__ = [
    "Config",
    "ConfigError",
    "SECTIONS",
    "build",
    "coerce",
    "load_config",
    "parse_bool",
    "parse_overrides",
    "resolve_preset",
    "shipped_presets",
    "to_plain",
    "dataclass_defaults",
]
