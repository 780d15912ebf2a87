"""The exported policy is the module's deterministic policy: same actions, any batch size, no package needed."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from arsq_lightning import (
    ARSQCritic,
    ARSQModule,
    AutoregressiveHead,
    CoarseToFineDiscretizer,
    CQNCritic,
    CQNHead,
    CQNLoss,
    EnvSpec,
)
from arsq_lightning.export import export_policy

SPEC = EnvSpec(5, [-1.0, 0.0, -2.0], [1.0, 3.0, 0.5])
BUILDS = {
    "arsq": dict(head=partial(AutoregressiveHead, hidden_dims=[32]), critic=partial(ARSQCritic, soft_alpha=0.05)),
    "arsq_compiled_acting": dict(head=partial(AutoregressiveHead, hidden_dims=[32]),
                                 critic=partial(ARSQCritic, soft_alpha=0.05, act_network="target", compile_act=True)),
    "cqn": dict(head=partial(CQNHead, hidden_dims=[32], trunk_dim=8, atoms=11), critic=CQNCritic, loss=CQNLoss()),
}


def jittered(module: ARSQModule) -> ARSQModule:
    """Random weights of a larger scale than the init (whose tiny outputs make many actions tie)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return module.eval()


@pytest.mark.parametrize("name", BUILDS)
def test_exported_policy_acts_like_the_module(name, tmp_path):
    torch.manual_seed(0)
    module = jittered(ARSQModule(SPEC, discretizer=partial(CoarseToFineDiscretizer, levels=2, bins=3), **BUILDS[name]))
    torch.export.save(export_policy(module.critic, SPEC.obs_dim), tmp_path / "policy.pt2")
    policy = torch.export.load(tmp_path / "policy.pt2").module()
    obs = torch.randn(256, SPEC.obs_dim) * 3
    if "compiled" in name:  # compile_act=True acts through torch.compile; the export traces the same eager loop
        module.critic.compile_act = False
    expected = module.critic.act(obs, deterministic=True)
    got = policy(obs)
    assert got.shape == (256, 3) and torch.equal(got, expected)
    assert len(torch.unique(got, dim=0)) > 3  # the policy is not constant on these observations
    torch.testing.assert_close(policy(obs[:1]), expected[:1], rtol=0, atol=0)  # batch 1, as when deployed
