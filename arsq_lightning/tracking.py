"""What an MLflow run records besides the metrics: tags saying what ran, and the trainer settings as params.

Tags: ``arsq.version``, ``arsq.algorithm`` (``ARSQ``, ``CQN``), ``arsq.env_id``, ``arsq.config`` (the config files,
in order), ``arsq.command`` (``fit`` / ``validate`` / ``test``), ``arsq.ckpt_path`` (the checkpoint a run started
from or evaluated) and, when the package runs from a git checkout, ``git.commit`` and ``git.dirty``. Params: the
seed and the trainer settings that shape a run (``trainer/max_steps`` ...); the model and data settings are logged by
Lightning from the modules' hyperparameters.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import arsq_lightning

TRAINER_PARAMS = ("max_steps", "val_check_interval", "log_every_n_steps", "precision", "accelerator", "devices",
                  "num_nodes", "strategy")


def git_state(directory: Path) -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` of the checkout holding ``directory``; empty outside git (e.g. a wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def run_tags(config, command: str, critic_name: str) -> dict[str, str]:
    """The tags of a run of ``command`` with the parsed ``config`` (one subcommand's namespace)."""
    files = [str(path) for path in (config.get("config") or [])]
    tags = {"arsq.version": arsq_lightning.__version__, "arsq.algorithm": critic_name.removesuffix("Critic"),
            "arsq.env_id": str(config.data.init_args.get("env_id")), "arsq.config": ", ".join(files) or "(none)",
            "arsq.command": command}
    if config.get("ckpt_path"):
        tags["arsq.ckpt_path"] = str(config.ckpt_path)
    return {**tags, **git_state(Path(arsq_lightning.__file__).resolve().parent)}


def run_params(config) -> dict[str, str]:
    """The seed and the trainer settings, as MLflow params (strings)."""
    params = {"seed_everything": str(config.get("seed_everything"))}
    params.update({f"trainer/{name}": str(config.trainer.get(name)) for name in TRAINER_PARAMS})
    return params
