"""Benchmark ARSQ gradient updates and action selection against the per-position reference (tools/reference.py).

Network sizes are the paper's D4RL ones (docs/algorithm.md §3.2): ``AutoregressiveHead`` with hidden dims
(512, 512, 512), tanh, ``qchunk=-1``, 2 critics; ``soft_alpha=0.01``; batch 512; Adam lr 3e-4; Polyak tau 0.005
(except the pendulum shape below).

- hopper:      obs 11, act 3, L=2, B=7  (N=6 positions)
- halfcheetah: obs 17, act 6, L=1, B=41 (N=6 positions)
- humanoid:    obs 348, act 17, L=3, B=5 (N=51 positions; a humanoid-like shape, about 10x hopper's update)
- pendulum:    obs 3, act 1, L=3, B=5 (N=3 positions; configs/quickstart.yaml: 2x128 ReLU nets, batch 256)

One *update* = loss forward (``ARSQLoss``, no conservative term unless ``--conservative cql``) + backward + Adam step +
Polyak update of the target head, on a random TensorDict batch in TorchRL layout. *Acting* = ``ARSQCritic.act`` on a
batch of 1 or 16 observations, deterministic (argmax) or stochastic (Boltzmann sample). *Collection* = env frames per
second of the training collector on Pendulum-v1 (the pendulum shape's critic acting stochastically) with 1, 4 and 8
envs side by side (``data.num_envs``), timed interleaved too. *Replay memory* = bytes per stored pixel transition of
DMC- and RLBench-shaped rows with both stacks stored as they come against each frame once (``FrameStackStorage``),
and the time to sample 256 rows from each.

Every number is compared with the straightforward per-position reference measured in the same run: the compared
variants are timed interleaved (round-robin blocks, order reversed every round) and the medians are reported, so the
ratios stay meaningful on a noisy, shared machine. Ratio = reference time / our time (> 1: ours is faster).

Command lines (run from the repository root):

    arsq-bench --env all                  # full run, 1 thread, CPU (~2 minutes)
    arsq-bench --quick                    # smoke check (few repeats)
    arsq-bench --env hopper --threads 2 --repeats 20 --warmup 3
    arsq-bench --env hopper --conservative cql
    arsq-bench --env all --device cuda    # reference update is CPU-only: shown as n/a
    arsq-bench --solve-seeds 3            # plus time to solve Pendulum against SB3 SAC (tools/solve_race.py)

The last line is ``summary:`` with ``key=value`` pairs (the README names them).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tensordict import TensorDict
from torch import Tensor
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.envs.utils import ExplorationType

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.algos.arsq.loss import ARSQLoss
from arsq_lightning.algos.base import total_loss
from arsq_lightning.cli import cpu_has_native_bf16
from arsq_lightning.data.frames import FrameStackStorage
from arsq_lightning.data.online import OnlineDataModule
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.envs.core import EnvSpec, stack_frames
from arsq_lightning.export import export_policy
from arsq_lightning.keys import ACTION, NEXT, OBSERVATION, PIXELS, REWARD
from arsq_lightning.module import ARSQModule, compiled_loss_terms, loss_terms
from arsq_lightning.policy import make_actor
from arsq_lightning.tools import (
    reference,  # the slow per-position implementation the tests also check against
    solve_race,
)

HIDDEN = (512, 512, 512)
CRITICS = 2
SOFT_ALPHA = 0.01
BATCH = 512
TAU = 0.005
GAMMA = 0.99
ACT_BATCHES = (1, 16)
COLLECT_ENVS = (1, 4, 8)  # envs side by side in the collection benchmark
BLOCK_S = 0.05  # fast calls are repeated inside a timed block until it lasts about this long

# Orientation numbers for the official ARSQ code, hopper shapes, batch 512, one CPU thread (from the issue).
OFFICIAL = "official code (measured by the issue author, not in this run)"
OFFICIAL_UPDATE_MS = 400.0
OFFICIAL_ACT_MS = {"deterministic": 3.5, "stochastic": 4.8}  # batch 1
GOAL_ACT_MS = 1.0  # goal: batch-1 action selection under 1 ms


@dataclass(frozen=True)
class EnvShape:
    obs_dim: int
    action_dim: int
    levels: int
    bins: int
    hidden: tuple[int, ...] = HIDDEN
    batch: int = BATCH
    activation: str = "tanh"

    @property
    def positions(self) -> int:
        return self.levels * self.action_dim


ENVS = {"hopper": EnvShape(11, 3, levels=2, bins=7), "halfcheetah": EnvShape(17, 6, levels=1, bins=41),
        "humanoid": EnvShape(348, 17, levels=3, bins=5),
        "pendulum": EnvShape(3, 1, levels=3, bins=5, hidden=(128, 128), batch=256, activation="relu")}  # quickstart


# --- construction ----------------------------------------------------------------------------------------------------
def build_module(shape: EnvShape, device: torch.device, conservative: str) -> ARSQModule:
    """The package's LightningModule with the official D4RL network, action bounds [-1, 1]."""
    spec = EnvSpec(shape.obs_dim, [-1.0] * shape.action_dim, [1.0] * shape.action_dim)
    loss = ARSQLoss(gamma=GAMMA, conservative=conservative, conservative_weight=0.0 if conservative == "none" else 1.0)
    module = ARSQModule(spec, discretizer=partial(CoarseToFineDiscretizer, levels=shape.levels, bins=shape.bins),
                        head=partial(AutoregressiveHead, hidden_dims=shape.hidden, activation=shape.activation,
                                     qchunk=-1, num_critics=CRITICS),
                        critic=partial(ARSQCritic, soft_alpha=SOFT_ALPHA), loss=loss, tau=TAU)
    return module.to(device)


def random_batch(shape: EnvShape, device: torch.device, gen: torch.Generator) -> TensorDict:
    """A replay batch in TorchRL layout; actions inside the bounds, half of the samples flagged as demos."""
    def rand(*size: int) -> Tensor:
        return torch.randn(*size, generator=gen)

    size = shape.batch
    data = {"observation": rand(size, shape.obs_dim),
            "action": torch.rand(size, shape.action_dim, generator=gen) * 2 - 1,
            "next": {"observation": rand(size, shape.obs_dim), "reward": rand(size, 1),
                     "terminated": torch.rand(size, 1, generator=gen) < 0.05},
            "demo": torch.rand(size, generator=gen) < 0.5}
    return TensorDict(data, batch_size=[size]).to(device)


# --- the two update implementations ----------------------------------------------------------------------------------
def our_update(module: ARSQModule, optimizer: torch.optim.Optimizer, batches: Sequence[TensorDict], *,
               autocast: Callable[[], AbstractContextManager] = nullcontext,
               compiled: bool = False) -> Callable[[], None]:
    """What Lightning runs per step, one call per step on the next of ``batches`` (cycled): the ``training_step``
    loss, zero_grad, backward, optimiser step, then the ``on_train_batch_end`` Polyak update. ``autocast``: the
    context the loss runs in (e.g. bf16 autocast, as ``trainer.precision bf16-mixed`` runs it, with fp32 weights and
    optimiser); ``compiled``: the loss and its backward through ``torch.compile``, as ``model.compile_update`` runs
    them."""
    cycle = itertools.cycle(batches)

    def step() -> None:
        batch = next(cycle)
        with autocast():
            loss = (compiled_loss_terms() if compiled else loss_terms)(module.loss_fn, module.critic, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.critic.polyak(module.tau)
    return step


def reference_loss(critic: ARSQCritic, batch: TensorDict) -> Tensor:
    return reference.loss(critic, batch, gamma=GAMMA, td_weight=1.0, conservative="none", weight=0.0,
                          clip_min=-1.0, clip_max=1e7, temperature=1.0, reduction="demo_mean")


def reference_update(critic: ARSQCritic, optimizer: torch.optim.Optimizer, batch: TensorDict) -> Callable[[], None]:
    """The same update with ``reference.loss`` (no conservative term) and a per-parameter Polyak loop."""
    def step() -> None:
        loss = reference_loss(critic, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for target, online in zip(critic.target_head.parameters(), critic.head.parameters()):
                target.mul_(1.0 - TAU).add_(online, alpha=TAU)
    return step


# --- reference acting ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_act(critic: ARSQCritic, obs: Tensor, *, deterministic: bool,
                  generator: torch.Generator | None = None) -> Tensor:
    """Per-position decoding (docs/algorithm.md §3.4): explicit float64 zoom-in intervals, one ``reference.mlp`` call
    per (critic, position), logsumexp normalisation, min over critics, argmax or multinomial sample."""
    head = critic.target_head if critic.act_network == "target" else critic.head
    disc, alpha, activation = critic.discretizer, critic.act_alpha, head.adv_trunk.act
    feats = critic.encoder(obs)
    lo = torch.full((obs.shape[0], disc.action_dim), -1.0, dtype=torch.float64, device=obs.device)
    hi = torch.ones_like(lo)
    for lvl in range(disc.levels):
        for d in range(disc.action_dim):
            x = torch.cat([feats, ((lo + hi) / 2).float()], -1)
            per_critic = []
            for k in range(head.num_critics):
                z = reference.mlp(reference.advantage_mlp(head, k, lvl * disc.action_dim + d), x, activation)
                per_critic.append(z - alpha * torch.logsumexp(z / alpha, -1, keepdim=True))
            adv = torch.stack(per_critic).min(0).values
            if deterministic:
                choice = adv.argmax(-1)
            else:
                choice = torch.multinomial(torch.softmax(adv / alpha, -1), 1, generator=generator)[:, 0]
            width = (hi[:, d] - lo[:, d]) / disc.bins
            lo[:, d] = lo[:, d] + choice.double() * width
            hi[:, d] = lo[:, d] + width
    unit = ((lo + hi) / 2).float()
    return disc.low + (unit + 1.0) * 0.5 * (disc.high - disc.low)


# --- FLOP counting ---------------------------------------------------------------------------------------------------
def mlp_macs(widths: Sequence[int]) -> int:
    """Multiply-adds of one row through an MLP with these layer widths."""
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def update_flops(shape: EnvShape) -> float:
    """Analytic FLOPs of one update.

    Counting rule: 2 FLOPs per multiply-add of every matmul; bias adds, activations, logsumexp, the loss, Adam and
    Polyak are ignored. Forward: value nets on ``s`` (trained) and on ``s'`` (target, no grad), advantage nets on the
    ``N`` positions of every sample, each position reading only its own ``K``-wide output slot (as both
    implementations do). Backward of the trained nets (value on ``s``, advantages) counts 2x their forward (a slight
    overcount: the first layer needs no input gradient). Both implementations do exactly these matmuls.
    """
    value = CRITICS * shape.batch * mlp_macs([shape.obs_dim, *shape.hidden, 1])
    advantage = CRITICS * shape.batch * shape.positions * mlp_macs([shape.obs_dim + shape.action_dim, *shape.hidden,
                                                                     shape.bins])
    return 2.0 * (3 * (value + advantage) + value)


def matmul_benchmarks(shape: EnvShape, device: torch.device) -> dict[str, tuple[Callable[[], None], float]]:
    """Plain fp32 matmuls (name -> (call, FLOPs)): a square 512 mm and the update's hidden-layer bmm shape."""
    h = shape.hidden[0]
    rows = shape.batch * shape.positions
    a, b, c = (torch.randn(h, h, device=device) for _ in range(3))
    x, w = torch.randn(CRITICS, rows, h, device=device), torch.randn(CRITICS, h, h, device=device)
    y = torch.empty(CRITICS, rows, h, device=device)
    return {f"mm [{h},{h}] @ [{h},{h}]": (lambda: torch.mm(a, b, out=c), 2.0 * h ** 3),
            f"bmm [{CRITICS},{rows},{h}] @ [{CRITICS},{h},{h}]": (lambda: torch.bmm(x, w, out=y),
                                                              2.0 * CRITICS * rows * h * h)}


# --- timing ----------------------------------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def timed_block(fn: Callable[[], object], inner: int, sync: Callable[[], None]) -> float:
    """Seconds per call over ``inner`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    sync()
    return (time.perf_counter() - start) / inner


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int,
                sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds per call of each function, timed in round-robin blocks (order reversed every round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    inner = {name: max(1, round(BLOCK_S / timed_block(fn, 1, sync))) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(timed_block(fns[name], inner[name], sync))
    return {name: statistics.median(values) for name, values in samples.items()}


# --- one environment -------------------------------------------------------------------------------------------------
@dataclass
class Setup:
    shape: EnvShape
    module: ARSQModule
    bf16_module: ARSQModule  # an independent copy for the bf16 update, same initial weights
    compiled_module: ARSQModule  # an independent copy for the compiled update, same initial weights
    ref_critic: ARSQCritic  # an independent copy (own optimiser state), same initial weights
    batch: TensorDict
    device: torch.device


def make_setup(shape: EnvShape, device: torch.device, conservative: str, seed: int) -> Setup:
    torch.manual_seed(seed)
    module = build_module(shape, device, conservative)
    batch = random_batch(shape, device, torch.Generator().manual_seed(seed))
    return Setup(shape, module, copy.deepcopy(module), copy.deepcopy(module), copy.deepcopy(module.critic), batch,
                 device)


def sanity_check(setup: Setup) -> str:
    """Loss and deterministic actions of ours vs the reference, before any update (weights are identical)."""
    critic = setup.module.critic
    obs = setup.batch["observation"][:16]
    with torch.no_grad():
        ours = critic.act(obs, deterministic=True)
        ref = reference_act(setup.ref_critic, obs, deterministic=True)
        same = int(torch.isclose(ours, ref, atol=1e-5).all(-1).sum())
        if setup.device.type != "cpu":
            return f"deterministic actions equal on {same}/{obs.shape[0]} observations (reference loss is CPU-only)"
        plain = total_loss(ARSQLoss(gamma=GAMMA)(critic, setup.batch))
        rel = float((plain - reference_loss(setup.ref_critic, setup.batch)).abs() / plain.abs().clamp(min=1e-12))
    return f"TD loss ours vs reference rel. diff {rel:.1e}; deterministic actions equal on {same}/{obs.shape[0]} obs"


def bench_updates(setup: Setup, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per update (ours, reference) and per plain matmul, all interleaved in one loop; matmul FLOPs."""
    fns: dict[str, Callable[[], object]] = {
        "ours": our_update(setup.module, setup.module.configure_optimizers(), [setup.batch]),
        "ours compiled": our_update(setup.compiled_module, setup.compiled_module.configure_optimizers(), [setup.batch],
                                    compiled=True)}
    if setup.device.type != "cpu" or cpu_has_native_bf16():  # emulated bf16 is many times slower: not timed
        fns["ours bf16"] = our_update(setup.bf16_module, setup.bf16_module.configure_optimizers(), [setup.batch],
                                      autocast=partial(torch.autocast, setup.device.type, dtype=torch.bfloat16))
    started = time.perf_counter()
    fns["ours compiled"]()  # compile outside the timed blocks
    print(f"  (compiled update: first call {time.perf_counter() - started:.1f} s)")
    if setup.device.type == "cpu":  # reference.loss builds its intervals on the CPU
        ref_opt = torch.optim.Adam(setup.ref_critic.online_parameters(), lr=3e-4)
        fns["reference"] = reference_update(setup.ref_critic, ref_opt, setup.batch)
    matmuls = matmul_benchmarks(setup.shape, setup.device)
    fns.update({name: call for name, (call, _) in matmuls.items()})
    times = interleaved(fns, repeats=args.repeats, warmup=args.warmup, sync=synchronizer(setup.device))
    return times, {name: flops for name, (_, flops) in matmuls.items()}


def compiled_twin(critic: ARSQCritic) -> ARSQCritic:
    """The same networks with ``compile_act=True`` (``torch.compile`` of the acting loop)."""
    return ARSQCritic(critic.encoder, critic.discretizer, critic.head, soft_alpha=critic.soft_alpha,
                      act_alpha=critic.act_alpha, act_network=critic.act_network, compile_act=True)


def bench_acting(setup: Setup, args: argparse.Namespace) -> dict[tuple[int, str], dict[str, float]]:
    """Seconds per action selection, ours (eager and compiled) vs reference, for every (batch, mode)."""
    critic, results = setup.module.critic, {}
    compiled = compiled_twin(critic)
    exported = export_policy(critic, setup.shape.obs_dim).module()  # what `arsq export` writes (deterministic)
    for batch in ACT_BATCHES:
        obs = torch.randn(batch, setup.shape.obs_dim, device=setup.device)
        for mode in ("deterministic", "stochastic"):
            det = mode == "deterministic"
            gens = [torch.Generator(setup.device).manual_seed(0) for _ in range(3)]
            started = time.perf_counter()
            compiled.act(obs, deterministic=det, generator=gens[2])  # compile outside the timed blocks
            print(f"  (compiled acting, batch {batch}, {mode}: first call {time.perf_counter() - started:.1f} s)")
            fns = {"ours": partial(critic.act, obs, deterministic=det, generator=gens[0]),
                   "compiled": partial(compiled.act, obs, deterministic=det, generator=gens[2]),
                   "reference": partial(reference_act, setup.ref_critic, obs, deterministic=det, generator=gens[1])}
            if det:
                fns["exported"] = partial(exported, obs)
            results[batch, mode] = interleaved(fns, repeats=args.repeats, warmup=args.warmup,
                                               sync=synchronizer(setup.device))
    return results


def bench_collection(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Training collection on Pendulum-v1 with ``COLLECT_ENVS`` envs side by side, as the data module collects
    (stochastic acting, one step of every env per collector batch): prints and returns ``env_fps_<n>``."""
    torch.manual_seed(args.seed)
    critic = build_module(ENVS["pendulum"], device, "none").critic
    fns, collectors = {}, []
    for n in COLLECT_ENVS:
        env = OnlineDataModule("Pendulum-v1", num_envs=n).training_env(args.seed)
        collector = Collector(env, make_actor(critic, torch.Generator().manual_seed(args.seed)), frames_per_batch=n,
                              total_frames=-1, exploration_type=ExplorationType.RANDOM, track_traj_ids=False,
                              auto_register_policy_transforms=False)
        collectors.append(collector)
        fns[f"{n} envs"] = partial(next, iter(collector))
    times = interleaved(fns, repeats=args.repeats, warmup=args.warmup, sync=synchronizer(device))
    for collector in collectors:
        collector.shutdown()
    rates = {n: n / times[f"{n} envs"] for n in COLLECT_ENVS}
    print("\n=== collection: Pendulum-v1, the pendulum shape's critic acting stochastically (data.num_envs) ===")
    print(f"{'envs':>6} {'frames/s':>10} {'vs 1 env':>9}")
    for n, rate in rates.items():
        print(f"{n:>6} {rate:>10.0f} {rate / rates[1]:>8.2f}x")
    return {f"env_fps_{n}": rate for n, rate in rates.items()}


@dataclass(frozen=True)
class PixelShape:
    """A pixel task's replay rows: ``views`` cameras of ``size`` px RGB, ``stack`` frames, episodes of ``steps``."""

    views: int
    size: int
    stack: int
    steps: int


PIXEL_SHAPES = {"dmc": PixelShape(views=1, size=84, stack=3, steps=500),  # configs/dmc/cheetah_run_pixels.yaml
                "rlbench": PixelShape(views=4, size=84, stack=8, steps=150)}  # configs/rlbench/base.yaml


def pixel_episode(shape: PixelShape, gen: torch.Generator) -> TensorDict:
    """One episode's rows with a new random frame every step (no two frames alike: no saving from the content)."""
    frames = torch.randint(0, 256, (shape.steps + 1, shape.views, 3, shape.size, shape.size), generator=gen,
                           dtype=torch.uint8)
    stacks = stack_frames(frames, shape.stack, pixels=True)
    return TensorDict({OBSERVATION: {PIXELS: stacks[:-1]}, ACTION: torch.rand(shape.steps, 4, generator=gen),
                       NEXT: {OBSERVATION: {PIXELS: stacks[1:]}, REWARD: torch.zeros(shape.steps, 1)}},
                      [shape.steps])


def bench_replay_memory(args: argparse.Namespace) -> dict[str, float]:
    """Bytes per stored pixel transition, stacks stored as they come against each frame once
    (:class:`~arsq_lightning.data.frames.FrameStackStorage`), and the time to sample a batch of 256 from each;
    prints and returns ``replay_kb_<task>`` (frames once) and ``replay_kb_stacks_<task>``."""
    print("\n=== pixel replay memory (bytes per transition; sampling 256 rows from 2 episodes) ===")
    print(f"{'task':>8} {'stacks KB':>10} {'frames KB':>10} {'saving':>7} {'sample ms stacks':>17} {'frames':>7}")
    summary = {}
    for name, shape in PIXEL_SHAPES.items():
        gen = torch.Generator().manual_seed(args.seed)
        episodes = [pixel_episode(shape, gen) for _ in range(2)]
        buffers = {}
        for kind, storage in (("stacks", LazyTensorStorage(2 * shape.steps)),
                              ("frames", FrameStackStorage(2 * shape.steps, frame_stack=shape.stack))):
            buffers[kind] = TensorDictReplayBuffer(storage=storage, batch_size=256,
                                                   generator=torch.Generator().manual_seed(args.seed))
            for episode in episodes:
                buffers[kind].extend(episode)
        rows = 2 * shape.steps
        stacked = sum(t.numel() * t.element_size() for t in buffers["stacks"].storage[:rows].values(True, True))
        kb = {"stacks": stacked / rows / 1000, "frames": buffers["frames"].storage.bytes_held() / rows / 1000}
        samplers = {kind: buffer.sample for kind, buffer in buffers.items()}
        times = interleaved(samplers, repeats=max(3, args.repeats // 3), warmup=args.warmup, sync=lambda: None)
        print(f"{name:>8} {kb['stacks']:>10.1f} {kb['frames']:>10.1f} {kb['stacks'] / kb['frames']:>6.1f}x "
              f"{times['stacks'] * 1e3:>17.2f} {times['frames'] * 1e3:>7.2f}")
        summary.update({f"replay_kb_{name}": kb["frames"], f"replay_kb_stacks_{name}": kb["stacks"]})
    return summary


# --- reporting -------------------------------------------------------------------------------------------------------
def fmt_ratio(ref: float | None, ours: float) -> str:
    return "n/a" if ref is None else f"{ref / ours:.2f}x"


def print_updates(name: str, shape: EnvShape, times: dict[str, float], mm_flops: dict[str, float],
                  conservative: str) -> None:
    flops = update_flops(shape)
    ours, compiled = times.pop("ours"), times.pop("ours compiled")
    bf16, ref = times.pop("ours bf16", None), times.pop("reference", None)
    ref_note = " (reference has no conservative term)" if conservative != "none" else ""
    print(f"\nupdate = loss fwd + backward + Adam + Polyak, batch {shape.batch}, conservative={conservative}")
    print(f"  analytic FLOPs per update: {flops / 1e9:.2f} GFLOP")
    print(f"  {'':32s} {'ms/update':>10s} {'updates/s':>10s} {'GFLOP/s':>9s}")
    for label, sec in (("ours (fp32)", ours), ("ours (bf16 autocast)", bf16), ("ours (compiled, fp32)", compiled),
                       ("reference (per-position)", ref)):
        if sec is None:
            why = "reference.loss is CPU-only" if label.startswith("reference") else "this CPU emulates bf16"
            print(f"  {label:32s} {'n/a':>10s} {'n/a':>10s} {'n/a':>9s}   ({why})")
        else:
            print(f"  {label:32s} {sec * 1e3:10.1f} {1 / sec:10.2f} {flops / sec / 1e9:9.1f}")
    print(f"  {'ratio reference / ours':32s} {fmt_ratio(ref, ours):>10s}{ref_note}")
    if name == "hopper":
        print(f"  {OFFICIAL}: ~{OFFICIAL_UPDATE_MS:.0f} ms/update at hopper shapes, 1 CPU thread -> ours is "
              f"{OFFICIAL_UPDATE_MS / (ours * 1e3):.2f}x that speed (goal: >= 1x)")
    print("  plain fp32 matmul on this machine, same run, same threads:")
    for label, sec in times.items():
        rate = mm_flops[label] / sec
        print(f"    {label:34s} {rate / 1e9:9.1f} GFLOP/s   (our update reaches {flops / ours / rate:.0%} of it)")


def print_acting(name: str, results: dict[tuple[int, str], dict[str, float]]) -> None:
    print("\naction selection latency (ms per call); compiled = compile_act=True (torch.compile); exported = the "
          "program `arsq export` writes (deterministic only)")
    print(f"  {'batch':>5s}  {'mode':13s} {'ours':>8s} {'compiled':>9s} {'exported':>9s} {'reference':>10s} "
          f"{'ref/ours':>8s} {'ref/compiled':>12s}")
    for (batch, mode), t in results.items():
        exported = f"{t['exported'] * 1e3:9.3f}" if "exported" in t else f"{'n/a':>9s}"
        times = f"{t['ours'] * 1e3:8.3f} {t['compiled'] * 1e3:9.3f} {exported} {t['reference'] * 1e3:10.3f}"
        ratios = f"{fmt_ratio(t['reference'], t['ours']):>8s} {fmt_ratio(t['reference'], t['compiled']):>12s}"
        print(f"  {batch:5d}  {mode:13s} {times} {ratios}")
    for variant in ("ours", "compiled"):
        worst = max(t[variant] for (batch, _), t in results.items() if batch == 1) * 1e3
        verdict = "met" if worst < GOAL_ACT_MS else "NOT met"
        print(f"  goal batch-1 < {GOAL_ACT_MS:.0f} ms, {variant}: {verdict} (slowest batch-1 mode {worst:.3f} ms)")
    if name == "hopper":
        print(f"  {OFFICIAL}: batch 1, 1 CPU thread: ~{OFFICIAL_ACT_MS['deterministic']} ms deterministic, "
              f"~{OFFICIAL_ACT_MS['stochastic']} ms stochastic")


def run_env(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Benchmark one shape; returns its ``summary:`` entries."""
    shape = ENVS[name]
    print(f"\n=== {name}: obs {shape.obs_dim}, act {shape.action_dim}, L={shape.levels}, B={shape.bins} "
          f"(N={shape.positions} positions); hidden {shape.hidden} {shape.activation}, qchunk -1, {CRITICS} critics, "
          f"soft_alpha {SOFT_ALPHA} ===")
    setup = make_setup(shape, device, args.conservative, args.seed)
    print(f"sanity: {sanity_check(setup)}")
    started = time.perf_counter()
    times, matmul_flops = bench_updates(setup, args)
    fp32 = times["ours"]
    fastest = min(seconds for variant, seconds in times.items() if variant.startswith("ours"))
    print_updates(name, shape, times, matmul_flops, args.conservative)
    acting = bench_acting(setup, args)
    print_acting(name, acting)
    print(f"({name} took {time.perf_counter() - started:.0f} s)")
    return {f"update_ms_{name}": fp32 * 1e3, f"update_speedup_{name}": fp32 / fastest,
            f"act_ms_b1_{name}": acting[1, "deterministic"]["ours"] * 1e3}


# --- entry point -----------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", choices=[*ENVS, "all"], default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant first")
    parser.add_argument("--conservative", choices=["none", "cql"], default="none",
                        help="conservative term of our loss (the reference update always runs without it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke check: 3 repeats, 1 warmup")
    parser.add_argument("--solve-seeds", type=int, default=0,
                        help="also race the quickstart against SB3 SAC to solve Pendulum on this many seeds each "
                             "(tools/solve_race.py; needs the bench extra; several minutes per seed)")
    parser.add_argument("--solve-max-frames", type=int, default=12000, help="frames before a racer gives up")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Attribute 'loss' is an instance of `nn.Module`")  # Lightning hparams
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''} | "
          f"threads {torch.get_num_threads()} | {cpu_name()} | repeats {args.repeats}, warmup {args.warmup}")
    print("times are medians of interleaved blocks; ratio = reference time / our time (> 1: ours faster)")
    summary: dict[str, float] = {}
    for name in ENVS if args.env == "all" else [args.env]:
        summary.update(run_env(name, args, device))
    summary.update(bench_collection(args, device))
    summary.update(bench_replay_memory(args))
    if args.solve_seeds > 0:
        print(f"\n=== time to solve Pendulum-v1 (better than {solve_race.SOLVED:.0f}): quickstart vs SB3 SAC ===")
        summary.update(solve_race.summary(solve_race.race(args.solve_seeds, args.solve_max_frames)))
    print(solve_race.format_summary(summary))


if __name__ == "__main__":
    main()
