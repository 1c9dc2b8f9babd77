"""The ``kadapter`` console command: ``kadapter <stage> [--config NAME|PATH] [--key value ...]``.

Each stage is one module of the pipelines package (``kadapter data-trex`` runs
``pipelines/data_trex.py``, installed as ``kadapter.pipelines.data_trex``), run exactly as
``python -m`` would run it, so ``kadapter pretrain --task fac`` and ``python -m
pipelines.pretrain --task fac`` are the same command. Stages added to the package (the
feature stage, the converter of original checkpoints) become subcommands by existing.
Presets are found by name (``--config paper``) among the shipped ones, or by path.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import pkgutil
import runpy
import sys
from types import ModuleType

# Modules of the pipelines package that are not stages.
NOT_STAGES = {"common"}


def stages_package() -> ModuleType:
    """``kadapter.pipelines`` when installed; ``pipelines`` in a source checkout on sys.path."""
    try:
        return importlib.import_module("kadapter.pipelines")
    except ModuleNotFoundError:
        return importlib.import_module("pipelines")


def stages() -> dict[str, str]:
    """Subcommand (``data-trex``) -> module name (``kadapter.pipelines.data_trex``)."""
    package = stages_package()
    return {info.name.replace("_", "-"): f"{package.__name__}.{info.name}"
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name)
            if info.name not in NOT_STAGES and not info.ispkg}


def summary(module: str) -> str:
    """The first sentence of a stage's docstring (read, not imported: no torch start-up)."""
    spec = importlib.util.find_spec(module)
    source = spec.loader.get_source(module) if spec and spec.loader else ""
    doc = ast.get_docstring(ast.parse(source or "")) or ""
    return " ".join(doc.split("\n\n", 1)[0].split()).split(": ", 1)[0].rstrip(".")


def usage(available: dict[str, str]) -> str:
    width = max(map(len, available)) + 2
    lines = ["usage: kadapter <stage> [--config NAME|PATH] [--key value ...]", "",
             "stages (kadapter <stage> --help lists its keys, with the preset's values):"]
    lines += [f"  {name:<{width}}{summary(module)}" for name, module in available.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = stages()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(available))
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in available:
        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"error: unknown stage {name!r}{hint}; stages: {', '.join(available)}",
              file=sys.stderr)
        raise SystemExit(2)
    sys.argv = ["kadapter", *rest]
    runpy.run_module(available[name], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
