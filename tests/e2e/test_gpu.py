"""A run on a CUDA device: the module, its batches and its acting live there, in bf16 with the compiled update, and
the checkpoint acts as the GPU module does on the CPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from arsq_lightning import ARSQModule
from arsq_lightning.callbacks import RandomStates
from arsq_lightning.cli import build_cli

from helpers import QUICKSTART, TINY, FakeTrainer, use_tmp_mlflow

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_a_fit_on_the_gpu_in_bf16_with_the_compiled_update_trains_and_its_checkpoint_acts_on_the_cpu(
        monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.accelerator", "gpu",
                     "--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--model.compile_update", "true"])
    assert cli.trainer.global_step == 30
    assert all(p.device.type == "cuda" for p in cli.model.parameters())
    assert "eval/return_mean" in cli.trainer.logged_metrics
    module = ARSQModule.load_from_checkpoint(cli.trainer.checkpoint_callback.last_model_path, map_location="cpu",
                                             weights_only=False).eval()
    obs = torch.randn(64, 3) * 2
    with torch.no_grad():
        on_gpu = cli.model.critic.act(obs.cuda(), deterministic=True).cpu()
    same = (module.act(obs, deterministic=True) == on_gpu).all(-1)
    assert int(same.sum()) >= 60  # the devices round differently: a near tie may go the other way


def test_random_states_restore_the_cuda_generators():
    """Image augmentation on a GPU draws from the device's generator: a resume restores it too."""
    states = RandomStates()
    saved = states.state_dict()
    expected = torch.rand(4, device="cuda")
    states.load_state_dict(saved)
    states.on_train_start(FakeTrainer(global_rank=0), None)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
