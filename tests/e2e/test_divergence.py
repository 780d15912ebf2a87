"""A diverging run stops in the update where a loss term or gradient turns NaN / infinite: one line, exit status 1,
MLflow run FAILED, and the weights plus the offending batch saved to reproduce it."""

from __future__ import annotations

import pytest
import torch

from arsq_lightning import ARSQModule
from arsq_lightning.callbacks import DivergenceGuard
from arsq_lightning.cli import main
from arsq_lightning.errors import TrainingDiverged

from helpers import QUICKSTART, TINY, only_run, use_tmp_mlflow


def test_a_diverging_fit_stops_with_one_line_a_failed_run_and_the_batch_saved(monkeypatch, tmp_path, capsys):
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # lr 1e30: the weights explode after the first step
        main(["fit", "--config", str(QUICKSTART), *TINY, "--model.optimizer.init_args.lr", "1e30"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("arsq: error: training diverged: non-finite")]
    assert len(lines) == 1 and "Traceback" not in err, err
    update = int(lines[0].split(" at update ")[1].split(";")[0])
    client, run = only_run(uri)
    assert run.info.status == "FAILED"
    saved = list(tmp_path.rglob(f"diverged-update-{update}.ckpt"))
    assert len(saved) == 1 and saved[0].with_name(f"diverged-update-{update}-batch.pt").is_file()
    checkpoint = torch.load(saved[0], weights_only=False)
    assert checkpoint["global_step"] == update  # the weights that met the batch, before the bad step
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert all(torch.isfinite(torch.tensor(m.value)) for m in losses)  # nothing non-finite was logged


def _module_with_grads(weight: list[float], bias: float) -> ARSQModule:
    module = ARSQModule.__new__(ARSQModule)
    torch.nn.Module.__init__(module)
    module.layer = torch.nn.Linear(2, 1)
    module.layer.weight.grad, module.layer.bias.grad = torch.tensor([weight]), torch.tensor([bias])
    return module


class _Trainer:
    global_step = 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_gradient_is_named(bad):
    with pytest.raises(TrainingDiverged, match="non-finite gradient of layer.weight at update 7"):
        DivergenceGuard().on_before_optimizer_step(_Trainer(), _module_with_grads([0.0, bad], 1.0), None)


def test_huge_finite_gradients_are_not_divergence():
    """Their total norm overflows float32 (the guard's fast check); every gradient is still finite."""
    module = _module_with_grads([3e38, -3e38], 3e38)
    assert not torch.isfinite(torch.nn.utils.get_total_norm([module.layer.weight.grad, module.layer.bias.grad]))
    DivergenceGuard().on_before_optimizer_step(_Trainer(), module, None)
