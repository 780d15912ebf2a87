"""``compile_act=True`` (torch.compile of the acting loop) chooses exactly the actions of the eager loop."""

from __future__ import annotations

import pytest
import torch

from arsq_lightning import ARSQCritic, AutoregressiveHead, CoarseToFineDiscretizer, FlattenEncoder

from helpers import DEVICES, random_transitions


@pytest.mark.parametrize("advantages", ["soft", "distributional"])
def test_compiled_acting_matches_eager(advantages):
    disc = CoarseToFineDiscretizer([-1.0, 0.0], [1.0, 3.0], levels=2, bins=3)
    atoms = 7 if advantages == "distributional" else 1
    head = AutoregressiveHead(5, 2, 2, 3, hidden_dims=(16, 16), out_gain=1.0, atoms=atoms, v_max=3.0)
    eager = ARSQCritic(FlattenEncoder(5), disc, head, soft_alpha=0.2, advantages=advantages)
    compiled = ARSQCritic(FlattenEncoder(5), disc, head, soft_alpha=0.2, compile_act=True, advantages=advantages)
    obs = torch.randn(4, 5)
    assert torch.equal(compiled.act(obs, deterministic=True), eager.act(obs, deterministic=True))
    samples = []
    for critic in (eager, compiled):
        generator = torch.Generator().manual_seed(7)
        samples.append(torch.stack([critic.act(obs, deterministic=False, generator=generator) for _ in range(5)]))
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0][0], samples[0][1])  # the samples do vary


def test_compiled_critic_copies_and_pickles_with_its_own_weights():
    import copy
    import pickle

    disc = CoarseToFineDiscretizer([-1.0], [1.0], levels=2, bins=3)
    critic = ARSQCritic(FlattenEncoder(3), disc, AutoregressiveHead(3, 1, 2, 3, hidden_dims=(8,), out_gain=1.0),
                        soft_alpha=0.2, compile_act=True)
    clone = copy.deepcopy(critic)
    with torch.no_grad():
        for p in clone.head.parameters():
            p.add_(torch.randn_like(p))  # (negating would not do: tanh is odd and the biases are 0)
    obs = torch.randn(64, 3)
    assert not torch.equal(clone.act(obs, deterministic=True), critic.act(obs, deterministic=True))
    restored = pickle.loads(pickle.dumps(critic))
    assert torch.equal(restored.act(obs, deterministic=True), critic.act(obs, deterministic=True))


def _module(critic: str, loss):
    """A small ARSQ or CQN module (obs 4, actions 2) with its loss; fixed initial weights."""
    from functools import partial

    from arsq_lightning import ARSQModule, CQNCritic, CQNHead
    from arsq_lightning.envs.core import EnvSpec

    torch.manual_seed(0)
    spec = EnvSpec(4, [-1.0, -2.0], [1.0, 2.0])
    disc = partial(CoarseToFineDiscretizer, levels=2, bins=3)
    if critic == "cqn":
        return ARSQModule(spec, discretizer=disc, head=partial(CQNHead, hidden_dims=(32, 32)), critic=CQNCritic,
                          loss=loss)
    return ARSQModule(spec, discretizer=disc, head=partial(AutoregressiveHead, hidden_dims=(32, 32), out_gain=1.0),
                      critic=partial(ARSQCritic, soft_alpha=0.1, advantages=critic), loss=loss)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("critic", ["soft", "mean", "cqn"])
def test_compiled_update_matches_eager(critic, device):
    """``compile_update``: the loss and its backward compile into graphs without a break (``fullgraph=True``, so no
    host sync either) and give the eager update's loss terms and gradients."""
    from arsq_lightning import ARSQLoss, CQNLoss
    from arsq_lightning.module import compiled_loss_terms, loss_terms

    loss = CQNLoss(fosd_weight=0.1, margin_weight=0.1) if critic == "cqn" else ARSQLoss(conservative="cql",
                                                                                       conservative_weight=0.5)
    module, batch = _module(critic, loss).to(device), random_transitions(24, 4, 2).to(device)
    grads = []
    for fn in (loss_terms, compiled_loss_terms()):
        module.zero_grad(set_to_none=True)
        out = fn(module.loss_fn, module.critic, batch)
        out["loss"].backward()
        grads.append([p.grad.clone() for p in module.critic.online_parameters()])
        if fn is loss_terms:
            eager = out
    assert set(out) == set(eager) and len(out) > 2
    for name in eager:
        torch.testing.assert_close(out[name], eager[name], rtol=1e-5, atol=1e-6)
    for compiled, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-6)


def test_compile_update_trains_through_the_cli_and_may_change_on_resume(monkeypatch, tmp_path):
    """``--model.compile_update true`` runs every update through the compiled loss; it says how to run the model,
    not what it is, so a resume may switch it on (other model settings must match, tests/e2e/test_cli.py)."""
    from arsq_lightning import module
    from arsq_lightning.cli import build_cli

    from helpers import QUICKSTART, TINY, use_tmp_mlflow

    use_tmp_mlflow(monkeypatch, tmp_path)
    calls = []
    compiled = module.compiled_loss_terms()
    monkeypatch.setattr(module, "compiled_loss_terms", lambda: lambda *args: calls.append(1) or compiled(*args))
    args = ["fit", "--config", str(QUICKSTART), *TINY, "--trainer.val_check_interval", "10"]
    first = build_cli([*args, "--trainer.max_steps", "10"])
    assert not first.model.compile_update and not calls
    resumed = build_cli([*args, "--trainer.max_steps", "20", "--model.compile_update", "true",
                         "--ckpt_path", first.trainer.checkpoint_callback.last_model_path])
    assert resumed.model.compile_update and resumed.trainer.global_step == 20 and len(calls) == 10


def test_compile_unavailable_names_a_missing_cpu_compiler():
    """TorchInductor's CPU code needs a C++ compiler: without one (here: $CXX search finds nothing) the reason is
    one line; with the machine's own it is ``None``."""
    from torch._inductor import config

    from arsq_lightning.module import compile_unavailable

    cpu = torch.device("cpu")
    if compile_unavailable(cpu) is not None:
        pytest.skip("this machine has no C++ compiler for TorchInductor")
    with config.patch({"cpp.cxx": ("arsq-no-such-compiler",)}):  # torch's own patching: restored on exit
        reason = compile_unavailable(cpu)
    assert compile_unavailable(cpu) is None
    assert reason is not None and "C++ compiler" in reason and "\n" not in reason


def test_compile_update_falls_back_to_eager_where_nothing_compiles(monkeypatch, tmp_path):
    """``--model.compile_update true`` on a machine that cannot compile warns once and trains eagerly."""
    from arsq_lightning import module
    from arsq_lightning.cli import build_cli

    from helpers import QUICKSTART, TINY, use_tmp_mlflow

    use_tmp_mlflow(monkeypatch, tmp_path)
    monkeypatch.setattr(module, "compile_unavailable", lambda device: "no C++ compiler found")
    monkeypatch.setattr(module, "compiled_loss_terms", lambda: pytest.fail("the compiled loss was called"))
    with pytest.warns(UserWarning, match="compile_update: no C\\+\\+ compiler found; the updates run eagerly"):
        cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "5",
                         "--model.compile_update", "true"])
    assert cli.trainer.global_step == 5 and not cli.model.compile_update
