"""``trainer.precision bf16-mixed``: the nets' matmuls run in bf16, while the advantage normaliser, Q, the targets and
the losses stay fp32, and the loss and its gradients agree with fp32 on the same batch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tensordict import TensorDict

from arsq_lightning import (
    ARSQCritic,
    ARSQLoss,
    ARSQModule,
    AutoregressiveHead,
    CoarseToFineDiscretizer,
    CQNCritic,
    CQNHead,
    CQNLoss,
)
from arsq_lightning.envs.core import EnvSpec
from arsq_lightning.module import loss_terms

from helpers import DEVICES, random_transitions


def _module(critic: str) -> ARSQModule:
    """A small module whose weights are perturbed, as after some training (CQN's output layers start at zero)."""
    torch.manual_seed(0)
    spec = EnvSpec(6, [-1.0, -2.0, -1.0], [1.0, 2.0, 1.0])
    disc = partial(CoarseToFineDiscretizer, levels=2, bins=5)
    if critic == "cqn":
        module = ARSQModule(spec, discretizer=disc, head=partial(CQNHead, hidden_dims=(64, 64)), critic=CQNCritic,
                            loss=CQNLoss(fosd_weight=0.1, margin_weight=0.1))
    else:
        module = ARSQModule(spec, discretizer=disc, head=partial(AutoregressiveHead, hidden_dims=(64, 64)),
                            critic=partial(ARSQCritic, soft_alpha=0.05, advantages=critic),
                            loss=ARSQLoss(conservative="margin", conservative_weight=0.5, clip_min=-0.1))
    with torch.no_grad():
        for parameter in module.critic.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module


def _update(module: ARSQModule, batch: TensorDict, bf16: bool) -> tuple[dict, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = loss_terms(module.loss_fn, module.critic, batch)
    out["loss"].backward()
    grads = torch.cat([p.grad.flatten() for p in module.critic.online_parameters() if p.grad is not None])
    return out, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("critic", ["soft", "mean", "cqn"])
def test_bf16_autocast_keeps_values_and_losses_fp32_and_agrees_with_fp32(critic, device):
    module = _module(critic).to(device)
    batch = random_transitions(64, 6, 3, terminal_rate=0.1).to(device)
    fp32, fp32_grads = _update(module, batch, bf16=False)
    bf16, bf16_grads = _update(module, batch, bf16=True)
    assert {name: value.dtype for name, value in bf16.items()} == {name: torch.float32 for name in bf16}
    assert not torch.equal(bf16["loss"], fp32["loss"])  # the nets did run in bf16
    torch.testing.assert_close(bf16["loss"], fp32["loss"], rtol=2e-2, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0)
    assert cosine > 0.999 and (bf16_grads.norm() / fp32_grads.norm() - 1).abs() < 0.02
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        values = module.critic.evaluate(batch["observation"], batch["action"])[:-1]  # ARSQ: q, adv; CQN: logits
    assert all(value.dtype == torch.float32 for value in values)


@pytest.mark.parametrize("critic", ["soft", "mean", "cqn"])
def test_bf16_keeps_large_values_to_fp32_accuracy(critic):
    """Values in the hundreds (Pendulum's, after training): bf16 would round them in steps of 2 at 300, coarser than
    the gaps between actions; the output layers run in fp32, so ARSQ's Q and CQN's atom logits stay within a few
    hundredths of fp32."""
    module = _module(critic)
    with torch.no_grad():
        module.critic.head.value_out.bias.fill_(300.0)
    batch = random_transitions(64, 6, 3, terminal_rate=0.1)
    with torch.no_grad():
        fp32 = module.critic.evaluate(batch["observation"], batch["action"])[0]  # ARSQ: Q [C, B]; CQN: logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = module.critic.evaluate(batch["observation"], batch["action"])[0]
    assert fp32.abs().min() > 250
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.05)
