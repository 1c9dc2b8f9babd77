"""Atomic outputs, input expansion, deterministic JSON, input errors."""

from __future__ import annotations

import os
import stat

import pytest

from kadapter.io import (
    OUTPUT_MARKER,
    InputError,
    atomic_output_dir,
    atomic_write_json,
    expand_inputs,
    fingerprint_of,
    json_dumps,
    read_json,
)


def test_atomic_output_dir_replaces_whole_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final, stage="s") as tmp:
        (tmp / "stale.txt").write_text("old")
    with atomic_output_dir(final, stage="s") as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (final / "new.txt").exists(), "nothing visible before success"
    assert sorted(p.name for p in final.iterdir()) == [OUTPUT_MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary left behind"


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    with atomic_output_dir(tmp_path / "out", stage="s") as tmp:
        atomic_write_json(tmp / "manifest.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "out/manifest.json").stat().st_mode) == 0o666 & ~mask


def test_atomic_output_dir_leaves_previous_output_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_output_dir(final, stage="s") as tmp:
        (tmp / "good.txt").write_text("good")
    with pytest.raises(RuntimeError), atomic_output_dir(final, stage="s") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed mid-way")
    assert sorted(p.name for p in final.iterdir()) == [OUTPUT_MARKER, "good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_json_is_deterministic(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    atomic_write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert json_dumps({"b": 1, "a": 2}).startswith(b'{\n  "a": 2')
    assert fingerprint_of({"x": 1, "y": 2}) == fingerprint_of({"y": 2, "x": 1})


@pytest.mark.parametrize("spec, expected", [
    ("dir", ["dir/a.json", "dir/sub/c.json"]),
    ("dir/a.json", ["dir/a.json"]),
    ("dir/**/*.json", ["dir/a.json", "dir/sub/c.json"]),
    (["dir/a.json", "dir/sub"], ["dir/a.json", "dir/sub/c.json"]),
])
def test_expand_inputs(tmp_path, spec, expected):
    (tmp_path / "dir/sub").mkdir(parents=True)
    for name in ("dir/a.json", "dir/b.txt", "dir/sub/c.json", "dir/.hidden.json"):
        (tmp_path / name).write_text("[]")
    spec = [str(tmp_path / s) for s in spec] if isinstance(spec, list) else str(tmp_path / spec)
    found = expand_inputs(spec, suffixes=(".json",))
    assert [str(p.relative_to(tmp_path)) for p in found] == expected


def test_expand_inputs_names_the_missing_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        expand_inputs(str(tmp_path / "nothing*.json"))


def test_input_error_names_file_and_record():
    err = InputError("data/x.json", 17, "missing field 'text'")
    assert str(err) == "data/x.json, record 17: missing field 'text'"
    assert str(InputError("data/x.json", None, "empty file")) == "data/x.json: empty file"


@pytest.mark.parametrize("content, error, message", [
    (b'{"a": [1, 2', InputError, r"bad\.json: not valid JSON"),
    (b'{"a": "\xff"}', InputError, r"bad\.json: not valid JSON"),
])
def test_read_json_names_the_file(tmp_path, content, error, message):
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(error, match=message):
        read_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json: cannot read"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "good.json").write_bytes(b'{"a": [1, 2]}')
    assert read_json(tmp_path / "good.json") == {"a": [1, 2]}
