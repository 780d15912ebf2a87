"""Pixel pipeline: multi-view CNN encoders, random-shift augmentation, frame stacking, uint8 storage, nested HDF5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer

from arsq_lightning.algos.arsq.critic import ARSQCritic
from arsq_lightning.algos.arsq.head import AutoregressiveHead
from arsq_lightning.data.datasets import check_against_env, read_d4rl_hdf5, write_d4rl_hdf5
from arsq_lightning.data.online import TRANSITION_KEYS
from arsq_lightning.discretizers import CoarseToFineDiscretizer
from arsq_lightning.envs.core import env_spec_of, make_env, stack_frames
from arsq_lightning.errors import ConfigError
from arsq_lightning.nets.augment import RandomShift, augmentation_disabled, random_shift
from arsq_lightning.nets.encoders import DrQEncoder, MultiViewCNNEncoder, ViewLayerNorm
from arsq_lightning.policy import make_actor

TINY = {"channels": (4, 8), "strides": (2, 2)}


def _obs(batch: int, shapes: dict) -> TensorDict:
    data = {"pixels": torch.randint(0, 256, (batch, *shapes["pixels"]), dtype=torch.uint8)}
    data.update({k: torch.randn(batch, *s) for k, s in shapes.items() if k != "pixels"})
    return TensorDict(data, [batch])


# --- encoders -------------------------------------------------------------------------------------------------------
def test_cqn_encoder_sizes_follow_the_paper_geometry():
    """84 -> 42 -> 21 -> 10 -> 5 with 4x4 stride-2 convs: 256 * 5 * 5 features per view (§6.1)."""
    one = MultiViewCNNEncoder({"pixels": [1, 3, 84, 84]})
    four = MultiViewCNNEncoder({"pixels": [4, 24, 84, 84], "proprio": [64]})
    assert one.out_dim == 256 * 5 * 5 and four.conv_dim == 4 * 256 * 5 * 5 and four.out_dim == 4 * 6400 + 64
    assert DrQEncoder({"pixels": [1, 9, 84, 84]}).out_dim == 32 * 35 * 35  # 84 -> 41 -> 39 -> 37 -> 35


@pytest.mark.parametrize("shapes, kwargs, out_dim", [
    ({"pixels": [1, 3, 24, 24]}, {}, None),
    ({"pixels": [3, 6, 24, 24], "proprio": [5]}, {}, None),
    ({"pixels": [3, 6, 24, 24], "proprio": [5], "state": [2, 2]}, {"feature_dim": 7, "proprio_dim": 3}, 10),
])
def test_encoder_output_shape_and_gradients(shapes, kwargs, out_dim):
    encoder = MultiViewCNNEncoder(shapes, **TINY, **kwargs)
    features = encoder(_obs(5, shapes))
    assert features.shape == (5, encoder.out_dim) and features.dtype == torch.float32
    low_dim = sum(torch.Size(s).numel() for k, s in shapes.items() if k != "pixels")
    assert encoder.out_dim == (out_dim if out_dim is not None else encoder.conv_dim + low_dim)
    features.square().sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_each_view_has_its_own_conv_stack():
    """Changing view 1 leaves view 0's features alone; equal images in two views give different features."""
    shapes = {"pixels": [2, 3, 16, 16]}
    encoder = MultiViewCNNEncoder(shapes, **TINY).eval()
    obs = _obs(3, shapes)
    per_view = encoder.conv_dim // 2
    changed = obs.clone()
    changed["pixels"][:, 1] = 255 - changed["pixels"][:, 1]
    before, after = encoder(obs), encoder(changed)
    assert torch.equal(before[:, :per_view], after[:, :per_view])
    assert not torch.allclose(before[:, per_view:], after[:, per_view:])
    same = obs.clone()
    same["pixels"][:, 1] = same["pixels"][:, 0]
    features = encoder(same)
    assert not torch.allclose(features[:, :per_view], features[:, per_view:])


def test_view_layer_norm_normalises_channels_at_each_pixel_per_view():
    norm = ViewLayerNorm(views=2, channels=3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(4, 6, 5, 7)
    out = norm(x)
    for v in range(2):
        block = x[:, 3 * v:3 * v + 3]
        mean, var = block.mean(1, keepdim=True), block.var(1, unbiased=False, keepdim=True)
        expected = (block - mean) / torch.sqrt(var + 1e-5)
        expected = expected * norm.weight[v, 0, 0].view(1, 3, 1, 1) + norm.bias[v, 0, 0].view(1, 3, 1, 1)
        torch.testing.assert_close(out[:, 3 * v:3 * v + 3], expected)


def test_non_pixel_observations_are_rejected():
    with pytest.raises(ConfigError, match="needs a nested observation with a 'pixels' entry"):
        MultiViewCNNEncoder(17)


# --- augmentation ---------------------------------------------------------------------------------------------------
def _find_shift(original: torch.Tensor, shifted: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """Every integer offset (dy, dx) in [-pad, pad]^2 that reproduces ``shifted`` from ``original`` [C, H, W]."""
    padded = F.pad(original.unsqueeze(0), (pad,) * 4, mode="replicate")[0]
    h, w = original.shape[-2:]
    return [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
            if torch.equal(padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w], shifted)]


def test_random_shift_is_an_integer_shift_within_pad_drawn_per_image():
    pad, images = 3, torch.rand(40, 2, 12, 10)
    shifted = random_shift(images, pad)
    offsets = []
    for original, out in zip(images, shifted):
        found = _find_shift(original, out, pad)
        assert len(found) == 1  # random images: exactly one offset explains the output
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # independent per image (49 possible offsets, 40 images)
    dys, dxs = [dy for dy, _ in offsets], [dx for _, dx in offsets]
    assert min(dys) == min(dxs) == -pad and max(dys) == max(dxs) == pad  # the full range is used
    raw = torch.randint(0, 256, (5, 3, 9, 9), dtype=torch.uint8)  # uint8 images shift like their float values
    same = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)]
    assert torch.equal(random_shift(raw, 2, same[0]), random_shift(raw.float(), 2, same[1]).to(torch.uint8))


def test_random_shift_only_in_training_and_not_while_disabled():
    shift, images = RandomShift(4), torch.rand(8, 3, 16, 16)
    assert not torch.equal(shift(images), images)
    assert torch.equal(shift.eval()(images), images)
    shift.train()
    with augmentation_disabled(shift):
        assert torch.equal(shift(images), images)
    assert not torch.equal(shift(images), images)  # restored after the block
    assert torch.equal(RandomShift(0)(images), images)


def test_encoder_augments_in_training_mode_only():
    shapes = {"pixels": [2, 3, 16, 16], "proprio": [3]}
    encoder, obs = MultiViewCNNEncoder(shapes, **TINY), _obs(4, shapes)
    assert not torch.allclose(encoder(obs), encoder(obs))  # obs and next obs each get fresh shifts in training
    encoder.eval()
    assert torch.equal(encoder(obs), encoder(obs))


def _pixel_critic(shapes: dict, action_dim: int = 2) -> ARSQCritic:
    encoder = MultiViewCNNEncoder(shapes, **TINY, feature_dim=8)
    disc = CoarseToFineDiscretizer([-1.0] * action_dim, [1.0] * action_dim, levels=2, bins=3)
    return ARSQCritic(encoder, disc, AutoregressiveHead(encoder.out_dim, action_dim, 2, 3, hidden_dims=(16,)))


def test_actor_accepts_nested_observations_and_acts_without_augmentation():
    shapes = {"pixels": [2, 3, 16, 16], "proprio": [3]}
    critic = _pixel_critic(shapes)  # training mode, as while the collector runs inside fit
    actor = make_actor(critic)
    obs = _obs(6, shapes)
    batched = actor(TensorDict({"observation": obs}, [6]))["action"]
    assert batched.shape == (6, 2)
    assert torch.equal(actor(TensorDict({"observation": obs}, [6]))["action"], batched)  # no random shift
    single = actor(TensorDict({"observation": obs[0]}, []))["action"]
    assert single.shape == (2,) and torch.equal(single, batched[0])
    assert torch.equal(critic.eval().act(obs, deterministic=True), batched)


# --- frame stacking, env side and offline ---------------------------------------------------------------------------
PIXEL_KWARGS = {"observation": "pixels", "image_size": 24}


def test_frame_stack_spec_matches_env_and_offline_stacking():
    """CatFrames in the env == stack_frames of the unstacked frames, per episode, across an automatic reset."""
    spec = env_spec_of("dmc:cheetah-run", **PIXEL_KWARGS, frame_stack=3)
    assert spec.observation_shapes == {"pixels": [1, 9, 24, 24]} and spec.obs_dim == 9 * 24 * 24
    plain = make_env("dmc:cheetah-run", seed=3, max_episode_steps=5, **PIXEL_KWARGS)
    stacked = make_env("dmc:cheetah-run", seed=3, max_episode_steps=5, **PIXEL_KWARGS, frame_stack=3)
    actions = torch.rand(8, 6) * 2 - 1
    rollouts = []
    for env in (plain, stacked):
        td = env.reset()
        steps = []
        for action in actions:
            td["action"] = action
            td = env.step(td)
            steps.append(td.clone())
            td = env.step_mdp(td) if not td["next", "done"].item() else env.reset()
        rollouts.append(torch.stack(steps))
    raw, stk = rollouts
    assert stk["observation", "pixels"].shape == (8, 1, 9, 24, 24) and stk["observation", "pixels"].dtype == torch.uint8
    for episode in (slice(0, 5), slice(5, 8)):
        frames = torch.cat([raw["observation", "pixels"][episode], raw["next", "observation", "pixels"][episode][-1:]])
        expected = stack_frames(frames, 3, pixels=True)
        assert torch.equal(stk["observation", "pixels"][episode], expected[:-1])
        assert torch.equal(stk["next", "observation", "pixels"][episode], expected[1:])
    first = stk["observation", "pixels"][5, 0]  # after the reset: three copies of the first frame
    assert torch.equal(first[:3], first[3:6]) and torch.equal(first[3:6], first[6:])


def test_stack_frames_on_vectors_oldest_first():
    frames = torch.arange(4.0).view(4, 1) * torch.ones(4, 2)
    out = stack_frames(frames, 3, pixels=False)
    assert out[0].tolist() == [0, 0, 0, 0, 0, 0] and out[3].tolist() == [1, 1, 2, 2, 3, 3]


def test_flat_observations_refuse_frame_stacking():
    with pytest.raises(ConfigError, match="frame_stack"):
        env_spec_of("Pendulum-v1", frame_stack=2)
    with pytest.raises(ConfigError, match="frame_stack needs a nested"):
        env_spec_of("dmc:cheetah-run", frame_stack=2)


def test_collected_pixel_transitions_stay_uint8_in_the_replay_buffer():
    """Collector + buffer as the data module uses them; bytes per stored transition are counted from the data."""
    env = make_env("dmc:cheetah-run", seed=0, max_episode_steps=6, **PIXEL_KWARGS, frame_stack=2)
    collector = Collector(env, None, frames_per_batch=14, total_frames=14)
    batch = next(iter(collector)).reshape(-1)
    collector.shutdown()
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(100), batch_size=5)
    buffer.extend(batch.select(*TRANSITION_KEYS))
    stored = buffer.storage[:len(buffer)]
    assert stored["observation", "pixels"].dtype == torch.uint8
    row = stored[0]
    nbytes = sum(v.numel() * v.element_size() for v in row.values(include_nested=True, leaves_only=True))
    # two uint8 stacks + float32 action and reward, 3 done flags and the buffer's int64 row index
    assert nbytes == 2 * 6 * 24 * 24 + 6 * 4 + 4 + 3 + 8
    # rows after an automatic reset start a new stack; within an episode next obs is the next row's obs
    done = batch["next", "done"].reshape(-1)
    for t in range(13):
        if not done[t]:
            assert torch.equal(batch["next", "observation", "pixels"][t], batch["observation", "pixels"][t + 1])
        else:
            restart = batch["observation", "pixels"][t + 1, 0]
            assert torch.equal(restart[:3], restart[3:])


def test_nested_hdf5_round_trip_keeps_uint8_and_checks_shapes(tmp_path):
    env = make_env("dmc:cheetah-run", seed=0, max_episode_steps=4, **PIXEL_KWARGS, frame_stack=2)
    data = env.rollout(4)
    data["observation", "proprio"] = torch.randn(4, 3)  # a second nested entry
    data["next", "observation", "proprio"] = torch.randn(4, 3)
    write_d4rl_hdf5(tmp_path / "pixels.hdf5", data)
    back = read_d4rl_hdf5(tmp_path / "pixels.hdf5")
    assert back["observation", "pixels"].dtype == torch.uint8
    for key in (("observation", "pixels"), ("observation", "proprio"), ("next", "observation", "pixels"), "action"):
        assert torch.equal(back[key], data[key].to(back[key].dtype)), key
    assert back["next", "truncated"][-1].item() and back.numel() == 4
    spec = env_spec_of("dmc:cheetah-run", **PIXEL_KWARGS, frame_stack=2)
    with pytest.raises(ConfigError, match="observations have shapes"):
        check_against_env(back, spec, "pixels.hdf5")  # the env has no proprio entry
    del back["observation", "proprio"], back["next", "observation", "proprio"]
    check_against_env(back, spec, "pixels.hdf5")


def test_pixel_demos_feed_the_offline_to_online_buffers_as_uint8(tmp_path):
    """A nested pixel dataset goes through the offline data module (demo split, both buffers, mixed batches)."""
    from arsq_lightning.data.offline import OfflineToOnlineDataModule

    kwargs = {**PIXEL_KWARGS, "frame_stack": 2}
    env = make_env("dmc:cheetah-run", seed=0, max_episode_steps=10, **kwargs)
    write_d4rl_hdf5(tmp_path / "pixels.hdf5", env.rollout(30, break_when_any_done=False))
    data = OfflineToOnlineDataModule("dmc:cheetah-run", dataset=str(tmp_path / "pixels.hdf5"), env_kwargs=kwargs,
                                     max_episode_steps=10, batch_size=8, buffer_size=100, drop_timeouts=False)
    data.setup("fit")
    data.build_buffers()
    batch = data.sample()
    pixels = batch["observation", "pixels"]
    assert pixels.dtype == torch.uint8 and pixels.shape == (8, 1, 6, 24, 24)
    assert int(batch["demo"].sum()) == 4 and len(data.buffer) == 30
