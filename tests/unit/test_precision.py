"""bf16 on a CPU that only emulates it is many times slower than fp32: the CLI says so in one line."""

from __future__ import annotations

import pytest
import torch

from arsq_lightning import cli


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
