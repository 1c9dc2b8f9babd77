"""The command line as a user types it: option forms, booleans, "did you mean", --help with
the preset's values, --print_config, the ``kadapter`` console command and its wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

from kadapter.config import ConfigError, load_config, parse_overrides, resolve_preset
from pipelines.common import parse_stage_args


@pytest.mark.parametrize("argv", [
    ["--workers", "3", "--input", "data/a-b_c"],
    ["--workers=3", "--input=data/a-b_c"],
    ["--data_trex.workers=3", "--data-trex.input", "data/a-b_c"],
])
def test_both_option_forms_mean_the_same(argv):
    # --key=value keeps hyphens inside the value (they used to become underscores)
    assert parse_overrides(argv, "data_trex") == {"data_trex": {"workers": 3, "input": "data/a-b_c"}}


@pytest.mark.parametrize("form", [["--config", "paper"], ["--config=paper"],
                                  ["--config=configs/paper.yaml"]])
def test_config_by_name_or_path_in_both_forms(repo_root, monkeypatch, form):
    monkeypatch.chdir(repo_root)
    config = parse_stage_args("pipelines.data_trex", "data_trex", [*form, "--workers=2"])
    assert config.preset == "paper" and config.data_trex.workers == 2


def test_shipped_preset_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_preset("sample").read_text().startswith("# Sample preset")
    with pytest.raises(ConfigError, match=r"neither a file nor a shipped preset .*did you mean paper"):
        resolve_preset("papr")


@pytest.mark.parametrize("argv, message", [
    (["--data_tre.workers", "2"], r"did you mean --data_trex\.workers\?"),
    (["--min_entity_cont", "3"], r"did you mean --min_entity_count\?"),
    (["--data_trex.worker", "2"], r"unknown key\(s\) \['worker'\] for TrexConfig \(did you mean workers\?\)"),
    (["--dev_fraction=big"], r"dev_fraction: expected float, got 'big'"),
])
def test_misspelt_key_or_section_suggests_the_right_one(repo_root, argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(repo_root / "configs/sample.yaml", argv, "data_trex")


def test_misspelt_section_in_a_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("data_tre:\n  workers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['data_tre'\] \(did you mean data_trex\?\)"):
        load_config(path)


def test_booleans_are_true_false_everywhere(repo_root, monkeypatch):
    config = load_config(repo_root / "configs/sample.yaml", ["--resume", "true"], "finetune")
    assert config.finetune.resume is True
    from kadapter import pretrain
    from pipelines import pretrain as entry

    calls = []
    monkeypatch.setattr(pretrain, "run_pretraining", lambda config, task, resume, kind: calls.append((task, resume)))
    monkeypatch.chdir(repo_root)
    entry.main(["--task", "fac", "--resume", "true"])
    entry.main(["--task=lin", "--resume=false"])
    entry.main(["--task", "fac"])
    assert calls == [("fac", True), ("lin", False), ("fac", False)]
    for wrong in (["--resume", "maybe"], ["--resume"], ["--resume", "--max_steps", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            entry.main(["--task", "fac", *wrong])
        assert exit_info.value.code == 2
    assert calls == [("fac", True), ("lin", False), ("fac", False)]


def test_help_shows_preset_values_beside_defaults(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit):
        parse_stage_args("pipelines.data_trex", "data_trex", ["--config", "configs/sample.yaml", "--help"])
    text = capsys.readouterr().out
    assert "--min_entity_count: 3 in configs/sample.yaml, default 50" in text
    assert "--workers: 1 in configs/sample.yaml, default 1" in text
    with pytest.raises(SystemExit):
        parse_stage_args("pipelines.eval_lama", "lama", ["--help"])
    assert "--mlm_head.epochs: 2 in configs/sample.yaml, default" in capsys.readouterr().out


def test_print_config_is_the_resolved_config(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as exit_info:
        parse_stage_args("pipelines.data_trex", "data_trex",
                         ["--print_config", "--workers=4", "--model.tiny_dir", "m/{preset}"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data_trex"]["workers"] == 4
    assert printed["model"]["tiny_dir"] == "m/sample"
    assert printed["data_trex"]["output_dir"] == "data/processed/sample/trex_rc"  # {preset} filled
    assert printed["pretrain_fac"]["batch_size"] == 16  # other sections too, defaults filled
    assert load_config(repo_root / "configs/sample.yaml").to_dict().keys() == printed.keys()


def _run_cli(args, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from kadapter.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_console_command_from_another_directory(repo_root, tmp_path, monkeypatch, capsys):
    from kadapter.cli import main

    run = _run_cli(["data-trex", "--config", "sample",
                    "--input", str(repo_root / "data/sample/trex"),
                    "--output_dir", str(tmp_path / "trex_rc")], tmp_path, repo_root)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "trex_rc" / "manifest.json").is_file()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets it for the stage
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    listing = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(f"  {stage} " in listing for stage in ("data-trex", "pretrain", "eval-lama", "report"))
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2 and "did you mean pretrain?" in capsys.readouterr().err
    # The sample's relative data paths resolve against the current directory: a clear error.
    with pytest.raises(SystemExit) as exit_info:
        main(["data-trex", "--config", "sample"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "data/sample/trex" in error and "current directory" in error


def test_wheel_ships_stages_and_presets_inside_the_package(repo_root, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "kadapter", "pipelines", "configs"):
        copy = shutil.copytree if (repo_root / name).is_dir() else shutil.copy
        copy(repo_root / name, source / name,
             **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(source), "-w", str(tmp_path / "dist")], check=True, capture_output=True,
                   cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kadapter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kadapter/pipelines/pretrain.py" in names and "kadapter/presets/paper.yaml" in names
    assert not [n for n in names if n.startswith("pipelines/")]  # no generic top-level package
    assert "kadapter = kadapter.cli:main" in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    # Installed alone (no source tree on the path), run from an unrelated directory.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = _run_cli(["data-trex", "--config", "paper", "--print_config"], work, target)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["data_trex"]["min_entity_count"] == 50


@pytest.mark.parametrize("user_config", [False, True])
def test_sample_launches_print_no_defaults_used_warning(repo_root, tmp_path, user_config):
    """The sample preset's `accelerate launch` passes the values a bare launch would warn
    about; a user's own `accelerate config` file is left in charge."""
    home = tmp_path / "home"
    config_file = home / ".cache/huggingface/accelerate/default_config.yaml"
    if user_config:
        config_file.parent.mkdir(parents=True)
        config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\n"
                               "num_processes: 1\nnum_machines: 1\nmixed_precision: 'no'\n"
                               "dynamo_backend: 'NO'\nuse_cpu: true\n")
    env = {**os.environ, "HOME": str(home), "PRESET": "sample"}
    env.pop("HF_HOME", None)
    printed = subprocess.run(["make", "-s", "--no-print-directory", "-f", str(repo_root / "Makefile"),
                              "--eval", "show-launch: ; @echo $(LAUNCH_ARGS)", "show-launch"],
                             cwd=repo_root, env=env, capture_output=True, text=True, check=True)
    launch_args = printed.stdout.split()
    assert (launch_args == []) == user_config
    script = tmp_path / "hello.py"
    script.write_text("print('ran')\n")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    run = subprocess.run([accelerate, "launch", *launch_args, str(script)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ran" in run.stdout, run.stderr
    defaulted = set(re.findall(r"^\t`(--\w+)`", run.stderr, flags=re.MULTILINE))
    # No config file can set the CPU threads: with one, accelerate still picks them on a
    # machine of several physical cores (and says so) unless OMP_NUM_THREADS is set.
    assert defaulted <= ({"--num_cpu_threads_per_process"} if user_config else set()), run.stderr
