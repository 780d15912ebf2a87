"""``arsq fit --help`` stays readable and every project option says what it does."""

from __future__ import annotations

import re

import pytest

from arsq_lightning.cli import main

SUBCLASS_HELP = [("data", "OnlineDataModule"), ("data", "OfflineToOnlineDataModule"), ("model.critic", "ARSQCritic"),
                 ("model.critic", "CQNCritic"), ("model.head", "AutoregressiveHead"), ("model.head", "CQNHead"),
                 ("model.loss", "ARSQLoss"), ("model.loss", "CQNLoss"),
                 ("model.discretizer", "CoarseToFineDiscretizer"), ("model.discretizer", "QuantileDiscretizer"),
                 ("model.encoder", "MLPEncoder"),
                 ("model.encoder", "MultiViewCNNEncoder"), ("model.encoder", "DrQEncoder")]


def help_text(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def undescribed(text: str, prefix: str) -> list[str]:
    """The ``--prefix.*`` options whose help holds nothing before ``(type: ...)``."""
    blocks = re.split(r"\n  (?=--)", text)
    missing = []
    for block in blocks:
        match = re.match(rf"(--{re.escape(prefix)}\.\S+)(?: (?:\{{[^}}]*\}}|[A-Z_|.,]+))?\s+(.*)", block, re.S)
        if match and not match.group(1).endswith(".help"):
            description = match.group(2).split("(type:")[0].strip()
            if not description:
                missing.append(match.group(1))
    return missing


def test_fit_help_is_short_and_describes_the_model_options(capsys):
    text = help_text(["fit", "--help"], capsys)
    assert len(text.splitlines()) < 800  # 2,255 lines when the factories were typed as returning any nn.Module
    assert "torchrl.modules" not in text  # factories list the project's classes only
    assert undescribed(text, "model") == []


@pytest.mark.parametrize(("option", "name"), SUBCLASS_HELP, ids=[name for _, name in SUBCLASS_HELP])
def test_every_option_of_a_project_class_has_a_description(option, name, capsys):
    text = help_text(["fit", f"--{option}.help", name], capsys)
    assert f"--{option}." in text
    assert undescribed(text, option) == []
