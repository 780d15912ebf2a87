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
    assert len(text.splitlines()) < 600  # 2,255 lines when the factories were typed as returning any nn.Module
    assert "torchrl.modules" not in text  # factories list the project's classes only
    # no epoch-based trainer or checkpoint options, no top-level optimiser beside model.optimizer
    for option in ("--trainer.max_epochs", "--trainer.limit_val_batches", "--trainer.accumulate_grad_batches",
                   "--checkpoint.every_n_epochs", "--optimizer", "--lr_scheduler"):
        assert f"\n  {option} " not in text, option
    assert "\n  --trainer.max_steps " in text and "\n  --checkpoint.every_n_train_steps " in text
    assert undescribed(text, "model") == []


@pytest.mark.parametrize(("option", "name"), SUBCLASS_HELP, ids=[name for _, name in SUBCLASS_HELP])
def test_every_option_of_a_project_class_has_a_description(option, name, capsys):
    text = help_text(["fit", f"--{option}.help", name], capsys)
    assert f"--{option}." in text
    assert undescribed(text, option) == []


@pytest.mark.parametrize(("args", "line"), [
    (["--trainer.max_steps", "abc"], "trainer.max_steps: expected int, got 'abc'"),
    (["--data.batch_size", "x"], "data.batch_size: expected int, got 'x'"),
    (["--model.optimizer.init_args.lr", "fast"], "model.optimizer.lr: expected one of float, Tensor, got 'fast'"),
    (["--model.head.init_args.hidden_dims", "abc"], "model.head.hidden_dims: expected Sequence, got 'abc'"),
    (["--trainer.precision", "7"], "trainer.precision: expected one of 64, 32, 16, 'transformer-engine', "),
])
def test_a_value_of_the_wrong_type_is_one_line(args, line, capsys):
    """jsonargparse's nested, multi-line type errors become ``key: expected T, got 'value'``."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "quickstart", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"arsq: error: {line}") and len(err) == 2  # the error, then where to read the options
