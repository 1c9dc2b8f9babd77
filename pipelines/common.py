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

from kadapter.config import Config, ConfigError, load_config, section_class, to_plain
from kadapter.io import InputError

DEFAULT_CONFIG = "configs/sample.yaml"


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


def usage(module: str, section: str) -> str:
    lines = [
        f"usage: python -m {module} [--config PATH] [--key value ...]",
        "",
        f"--config PATH     preset file (default {DEFAULT_CONFIG})",
        f"Keys of section '{section}' (override with --key value or --{section}.key value;",
        "other sections with --section.key value; values are YAML):",
    ]
    _describe_fields(section_class(section), "", lines)
    return "\n".join(lines)


def _describe_fields(cls: type, prefix: str, lines: list[str]) -> None:
    """One entry per field; a field that is itself a config dataclass is expanded."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    defaults = to_plain(cls()) if _has_all_defaults(cls) else {}
    indent = " " * (2 + 2 * prefix.count("."))
    for field in dataclasses.fields(cls):
        name = f"{prefix}{field.name}"
        nested = dataclasses.is_dataclass(hints[field.name])
        default = "" if nested or field.name not in defaults else f" [default {defaults[field.name]!r}]"
        lines.append(f"{indent}--{name}{default}")
        if field.name in docs:
            lines.append(textwrap.fill(docs[field.name], 88, initial_indent=indent + " " * 4,
                                       subsequent_indent=indent + " " * 4))
        if nested:
            _describe_fields(hints[field.name], f"{name}.", lines)


def _has_all_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
    )


def parse_stage_args(module: str, section: str, argv: list[str] | None = None) -> Config:
    """``[--config PATH] [--key value ...]`` -> a validated Config."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(module, section))
        raise SystemExit(0)
    config_path = DEFAULT_CONFIG
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("command line: --config needs a path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    if not Path(config_path).is_file():
        raise ConfigError(f"config file {config_path!r} not found")
    return load_config(config_path, argv, default_section=section)


def run_stage(module: str, section: str, main: Callable[[Config], object],
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
        raise SystemExit(2) from None
