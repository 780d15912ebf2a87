"""Precision: bf16 is the default only where the CPU runs it natively; where bf16 is only emulated (many times slower
than fp32) the CLI says so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arsq_lightning import cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "32-true"])
def test_bf16_on_a_cpu_without_native_support_warns_in_one_line(precision, native, monkeypatch, capsys):
    monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: native)
    cli.warn_slow_bf16(precision, "cpu")
    err = capsys.readouterr().err
    if precision.startswith("bf16") and not native:
        assert err.count("\n") == 1 and err.startswith("arsq: warning:") and "--trainer.precision 32-true" in err
    else:
        assert err == ""


def test_bf16_on_a_gpu_does_not_warn(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: False)
    cli.warn_slow_bf16("bf16-mixed", "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli.warn_slow_bf16("bf16-mixed", "auto")
    assert capsys.readouterr().err == ""


def test_the_native_bf16_probe_answers_a_bool():
    assert isinstance(cli.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize(("cuda", "native", "expected"), [(False, True, "bf16-mixed"), (False, False, "32-true"),
                                                          (True, True, "32-true"), (True, False, "32-true")])
def test_the_default_precision_is_bf16_only_on_a_cpu_only_machine_with_native_bf16(cuda, native, expected,
                                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(cli, "cpu_has_native_bf16", lambda: native)
    assert cli.default_precision() == expected


@pytest.mark.parametrize("machine", ["bf16-mixed", "32-true"])
def test_a_config_without_precision_takes_the_machines_choice_and_a_pinned_one_keeps_its_own(machine, monkeypatch):
    monkeypatch.setattr(cli, "default_precision", lambda: machine)
    monkeypatch.setattr(cli.ArsqCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")  # nothing is instantiated, nothing is written
    parser = cli.build_cli(["--config", str(CONFIGS / "hopper.yaml")], run=False).parser
    assert parser.parse_args(["--config", str(CONFIGS / "hopper.yaml")]).trainer.precision == machine
    assert parser.parse_args(["--config", str(CONFIGS / "quickstart.yaml")]).trainer.precision == "32-true"
    override = ["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.precision", "bf16-mixed"]
    assert parser.parse_args(override).trainer.precision == "bf16-mixed"
