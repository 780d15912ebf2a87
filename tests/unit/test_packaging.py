"""What a wheel ships: every package and every config, found by name from any directory."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from arsq_lightning.cli import main
from arsq_lightning.errors import ConfigError
from arsq_lightning.shipped_configs import configs_dir, resolve_config, resolve_config_args, shipped_configs

from helpers import REPO

YAML = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").glob("**/*.yaml"))


def test_the_package_list_matches_the_tree():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "arsq_lightning").glob("**/__init__.py")}
    assert listed == found | {"arsq_lightning.configs"}


def test_configs_are_found_by_name_with_or_without_suffix_or_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: relative paths do not resolve here
    assert configs_dir() == REPO / "configs" and shipped_configs() == YAML
    for value in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml"):
        assert resolve_config(value) == str(REPO / "configs" / "quickstart.yaml")
    assert resolve_config("metaworld/from_dataset") == str(REPO / "configs" / "metaworld" / "from_dataset.yaml")
    own = tmp_path / "quickstart"  # a file of the user's wins over the shipped config of the same name
    own.write_text("seed_everything: 3\n")
    assert resolve_config("quickstart") == "quickstart"
    assert resolve_config_args(["fit", "-c", "hopper", "--config=d4rl/base", "--config", "d4rl/hopper_medium",
                                "--data.dataset", "quickstart"]) == [
        "fit", "-c", str(REPO / "configs/hopper.yaml"), f"--config={REPO / 'configs/d4rl/base.yaml'}", "--config",
        str(REPO / "configs/d4rl/hopper_medium.yaml"), "--data.dataset", "quickstart"]
    with pytest.raises(ConfigError, match="no shipped config"):
        resolve_config("no/such")


def test_arsq_configs_lists_every_shipped_config(capsys):
    main(["configs"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == YAML
    quickstart = out[1 + YAML.index("quickstart")]
    assert quickstart.split()[0] == "quickstart" and "Pendulum" in quickstart  # with its header's first line


def test_an_unknown_config_name_fails_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "no/such"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "arsq: error: --config no/such: no such file and no shipped config of that name (`arsq configs` lists them)")


def test_the_wheel_ships_every_config(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("arsq_lightning", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("arsq_lightning/configs/").removesuffix(".yaml") for n in names
                     if n.startswith("arsq_lightning/configs/") and n.endswith(".yaml"))
    assert shipped == YAML


TOOLS = {"arsq": "arsq_lightning.cli:main", "arsq-demos": "arsq_lightning.tools.make_demos:cli",
         "arsq-dataset": "arsq_lightning.tools.make_dataset:main", "arsq-compare": "arsq_lightning.tools.compare:main",
         "arsq-benchmark": "arsq_lightning.tools.benchmark:main", "arsq-bench": "arsq_lightning.tools.bench:main"}


def test_the_tools_are_entry_points_and_the_scripts_run_the_same_functions():
    tomllib = pytest.importorskip("tomllib")
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"] == TOOLS
    for target in TOOLS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    for script in (REPO / "scripts").glob("*.py"):  # each a shim: python scripts/X.py == the tool
        (target,) = [t for t in TOOLS.values() if t.split(":")[0] == f"arsq_lightning.tools.{script.stem}"]
        module, function = target.split(":")
        assert f"from {module} import {function}\n" in script.read_text()
