"""What every stage's entry point shares: argument parsing, help, error reporting."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path

import yaml

from kadapter.config import (
    Config,
    ConfigError,
    load_config,
    resolve_preset,
    section_class,
    to_plain,
)
from kadapter.io import InputError

DEFAULT_CONFIG = "sample"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (litgpt style),
    inherited fields included (a subclass's docstring wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body else []
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def usage(module: str, section: str | None, preset: Path | None = None) -> str:
    """Every key of ``section`` with its documentation, its code default and, when
    ``preset`` sets it, the preset's value (``--workers: 8 in configs/paper.yaml, default 1``)."""
    command = f"kadapter {module.rsplit('.', 1)[-1].replace('_', '-')}"
    lines = [
        f"usage: {command} [--config NAME|PATH] [--key value ...]   (or python -m {module})",
        "",
        f"--config NAME|PATH  a preset file, or a shipped preset's name (default {DEFAULT_CONFIG})",
        "--print_config      print the resolved configuration (YAML) and exit",
    ]
    if section is None:
        lines.append("Any key of the preset: --section.key value (values are YAML, booleans true / false).")
        return "\n".join(lines)
    lines += [
        f"Keys of section '{section}' (override with --key value, --key=value or --{section}.key value;",
        "other sections with --section.key value; values are YAML, booleans true / false):",
    ]
    values: dict = {}
    if preset is not None:
        raw = yaml.safe_load(preset.read_text(encoding="utf-8")) or {}
        values = raw.get(section) or {} if isinstance(raw, dict) else {}
    _describe_fields(section_class(section), "", lines, values, str(preset))
    return "\n".join(lines)


def _describe_fields(cls: type, prefix: str, lines: list[str], values: dict, preset: str) -> None:
    """One entry per field; a field that is itself a config dataclass is expanded."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    defaults = to_plain(cls()) if _has_all_defaults(cls) else {}
    indent = " " * (2 + 2 * prefix.count("."))
    for field in dataclasses.fields(cls):
        name = f"{prefix}{field.name}"
        nested = dataclasses.is_dataclass(hints[field.name])
        described = []
        if field.name in values and not nested:
            described.append(f"{_yaml_value(values[field.name])} in {preset}")
        if field.name in defaults and not nested:
            described.append(f"default {_yaml_value(defaults[field.name])}")
        lines.append(f"{indent}--{name}" + (": " + ", ".join(described) if described else ""))
        if field.name in docs:
            lines.append(textwrap.fill(docs[field.name], 88, initial_indent=indent + " " * 4,
                                       subsequent_indent=indent + " " * 4))
        if nested:
            nested_values = values.get(field.name)
            _describe_fields(hints[field.name], f"{name}.", lines,
                             nested_values if isinstance(nested_values, dict) else {}, preset)


def _yaml_value(value: object) -> str:
    """A value as it would be written on the command line (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def _has_all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def take_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name value`` or ``--name=value`` from ``argv``; return the value (None if absent)."""
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"command line: --{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(f"--{name}="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def parse_stage_args(module: str, section: str | None, argv: list[str] | None = None) -> Config:
    """``[--config NAME|PATH] [--key value ...]`` -> a validated Config. ``--help`` prints
    the keys (with the preset's values); ``--print_config`` prints the resolved config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = resolve_preset(take_option(argv, "config") or DEFAULT_CONFIG)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(module, section, config_path))
        raise SystemExit(0)
    print_config = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    config = load_config(config_path, argv, default_section=section)
    if print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), end="")
        raise SystemExit(0)
    return config


def run_stage(module: str, section: str | None, main: Callable[[Config], object],
              argv: list[str] | None = None) -> None:
    """Parse the command line, run ``main(config)``; report user errors without a traceback."""
    # transformers' load reports and weight-loading bars drown a stage's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        config = parse_stage_args(module, section, argv)
        main(config)
    except (ConfigError, InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, FileNotFoundError | InputError) and not Path("data").is_dir():
            print(f"note: relative paths in a preset resolve against the current directory "
                  f"({Path.cwd()}); run from the project's directory or pass absolute paths",
                  file=sys.stderr)
        raise SystemExit(2) from None
