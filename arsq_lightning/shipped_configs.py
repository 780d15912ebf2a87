"""The configs shipped with the package, found by name (``quickstart``, ``metaworld/from_dataset``) as well as by path.

The repository keeps them in ``configs/``; a wheel installs the same files as ``arsq_lightning/configs``. A
``--config`` value that is not an existing file is looked up there (with or without ``.yaml``), so
``arsq fit --config quickstart`` works from any directory.
"""

from __future__ import annotations

from pathlib import Path

from arsq_lightning.errors import ConfigError

CONFIG_FLAGS = ("--config", "-c")


def configs_dir() -> Path | None:
    """The shipped configs: inside the installed package, else the source checkout's ``configs/``."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def shipped_configs() -> list[str]:
    """Names of the shipped configs (paths under ``configs/`` without ``.yaml``), sorted."""
    root = configs_dir()
    if root is None:
        return []
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.glob("**/*.yaml"))


def resolve_config(value: str) -> str:
    """``value`` if it names an existing file, else the shipped config of that name; a one-line error otherwise."""
    root = configs_dir()
    if Path(value).expanduser().is_file():
        return value
    name = value.removeprefix("configs/")
    for candidate in ([] if root is None else [root / name, root / f"{name}.yaml"]):
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"--config {value}: no such file and no shipped config of that name (`arsq configs` lists them)")


def resolve_config_args(args: list[str]) -> list[str]:
    """``args`` with every ``--config X`` / ``-c X`` / ``--config=X`` value passed through :func:`resolve_config`."""
    out, resolve_next = [], False
    for arg in args:
        if resolve_next:
            out.append(resolve_config(arg))
            resolve_next = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            resolve_next = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.removeprefix("--config=")))
        else:
            out.append(arg)
    return out


def describe_configs() -> str:
    """``arsq configs``: every shipped config with the first line of its header comment."""
    root = configs_dir()
    if root is None:
        return "no shipped configs found"
    lines = [f"shipped configs (in {root}); run one with: arsq fit --config NAME"]
    for name in shipped_configs():
        first = (root / f"{name}.yaml").read_text().splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"  {name:40s} {summary[:100]}")
    return "\n".join(lines)
