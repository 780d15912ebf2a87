"""Offline datasets -> TorchRL's TED TensorDict layout (docs/algorithm.md §4.1).

Readers:
* :func:`read_d4rl_hdf5`: a file in D4RL's HDF5 layout (``observations``, ``actions``, ``rewards``, ``terminals``,
  ``timeouts``, optionally ``next_observations`` and ``infos/success``, the env's success flag per row, read as
  ``("next", "success")``; other groups such as ``metadata/*`` are ignored).
  The file is opened read-only. Pixel datasets store ``observations`` and ``next_observations`` as groups with one
  dataset per entry (``observations/pixels`` uint8 ``[T, V, C, H, W]``, ``observations/proprio``), read back as a
  nested ``observation`` TensorDict.
* :func:`read_minari`: a Minari dataset from a local store, through ``minari.load_dataset``.

Both return a TensorDict ``[T]`` with ``observation``, ``action``, ``episode`` and ``("next", observation | reward |
terminated | truncated | done)``. Bad data raises :class:`~arsq_lightning.errors.ConfigError` naming the source and the
problem. :func:`write_d4rl_hdf5` writes the same layout (used by ``arsq-dataset`` and the tests).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from arsq_lightning.envs.core import EnvSpec
from arsq_lightning.errors import ConfigError
from arsq_lightning.keys import (
    ACTION,
    DONE,
    EPISODE,
    NEXT,
    NEXT_OBSERVATION,
    NEXT_REWARD,
    NEXT_SUCCESS,
    NEXT_TERMINATED,
    NEXT_TRUNCATED,
    OBSERVATION,
    REWARD,
    TERMINATED,
    TRUNCATED,
)

D4RL_KEYS = ("observations", "actions", "rewards", "terminals")  # + "timeouts" (v2 files), "next_observations"
SUCCESS_FLAGS = "infos/success"  # optional: the env's success flag per row


def _finite(name: str, array: np.ndarray, source: str) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        row = int(np.argwhere(~np.isfinite(array.reshape(len(array), -1)))[0, 0])
        raise ConfigError(f"{source}: '{name}' contains NaN or inf (first at row {row})")


def _read_entry(entry) -> np.ndarray | dict[str, np.ndarray]:
    """An HDF5 dataset as an array, or a group of datasets (a nested observation) as ``{key: array}``."""
    if hasattr(entry, "keys"):
        return {key: np.asarray(entry[key][()]) for key in sorted(entry.keys())}
    return np.asarray(entry[()])


def _rows(value: np.ndarray | dict[str, np.ndarray]) -> int:
    if isinstance(value, dict):
        lengths = {len(v) for v in value.values()}
        return lengths.pop() if len(lengths) == 1 else -1
    return len(value)


def _load_d4rl_arrays(path: Path, missing_hint: str = "") -> dict[str, np.ndarray | dict[str, np.ndarray]]:
    import h5py

    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such file" + (f"; {missing_hint}" if missing_hint else ""))
    if not h5py.is_hdf5(path):
        raise ConfigError(f"{source}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in D4RL_KEYS if k not in f]
            if missing:
                raise ConfigError(f"{source}: missing dataset(s) {missing} (D4RL layout needs {list(D4RL_KEYS)})")
            keys = [*D4RL_KEYS, *(k for k in ("timeouts", "next_observations", SUCCESS_FLAGS) if k in f)]
            arrays = {k: _read_entry(f[k]) for k in keys}
    except OSError as err:  # a damaged file: h5py cannot parse it
        raise ConfigError(f"{source}: cannot read the HDF5 file ({err})") from None
    return _checked_arrays(arrays, source)


def _checked_arrays(arrays: dict, source: str) -> dict[str, np.ndarray | dict[str, np.ndarray]]:
    """The D4RL arrays of ``source`` after the layout checks (equal lengths, finite, one reward / flag per row,
    matching observation shapes); a missing ``timeouts`` becomes all false, with a warning."""
    if "timeouts" not in arrays:
        warnings.warn(f"{source}: no 'timeouts' dataset: episodes end only at terminals", stacklevel=4)
        arrays["timeouts"] = np.zeros(len(arrays["terminals"]), dtype=bool)
    rows = {k: _rows(v) for k, v in arrays.items()}
    if len(set(rows.values())) != 1:
        raise ConfigError(f"{source}: datasets have different lengths {rows}")
    if rows["observations"] == 0:
        raise ConfigError(f"{source}: the dataset is empty")
    for name, value in arrays.items():
        for part, array in (value.items() if isinstance(value, dict) else [("", value)]):
            _finite(f"{name}/{part}" if part else name, array, source)
    for name in [n for n in ("rewards", "terminals", "timeouts", SUCCESS_FLAGS) if n in arrays]:
        if isinstance(arrays[name], dict) or arrays[name].reshape(len(arrays[name]), -1).shape[1] != 1:
            raise ConfigError(f"{source}: '{name}' must hold one value per row, got shape "
                              f"{getattr(arrays[name], 'shape', 'a group')}")
    shapes = {k: _row_shapes(arrays[k]) for k in ("observations", "next_observations") if k in arrays}
    if "next_observations" in shapes and shapes["next_observations"] != shapes["observations"]:
        raise ConfigError(f"{source}: 'next_observations' has shape {shapes['next_observations']} per row "
                          f"but 'observations' has {shapes['observations']}")
    return arrays


def _row_shapes(value: np.ndarray | dict[str, np.ndarray]):
    return _map(value, lambda array: array.shape[1:])


def _observation_array(value: np.ndarray | dict[str, np.ndarray]):
    """Flat observations as float32 ``[T, obs_dim]``; nested ones as ``{key: [T, *shape]}`` in their stored dtype
    (floating entries as float32)."""
    if isinstance(value, dict):
        return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in value.items()}
    return value.reshape(len(value), -1).astype(np.float32)


def _map(value, fn):
    return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)


def read_d4rl_hdf5(path: str | os.PathLike, *, missing_hint: str = "") -> TensorDict:
    """Read a D4RL-layout HDF5 file into a TED TensorDict ``[T]`` (see module doc); ``missing_hint`` is appended to
    the error for a file that does not exist (how to make it).

    Episodes end at ``terminals`` or ``timeouts``. Without ``next_observations``, the next observation is the next
    row's; rows whose successor is not in the file (a timeout, or the last row, that is not terminal) are dropped,
    since their next state is unknown. Terminal rows keep a placeholder next observation (never bootstrapped).
    """
    path = Path(path)
    a = _load_d4rl_arrays(path, missing_hint)
    obs = _observation_array(a["observations"])
    rows = _rows(a["observations"])
    terminated = a["terminals"].astype(bool).reshape(-1)
    truncated = a["timeouts"].astype(bool).reshape(-1) & ~terminated
    ends = terminated | truncated
    episode = np.concatenate([[0], np.cumsum(ends[:-1])]).astype(np.int64)
    if "next_observations" in a:
        next_obs = _observation_array(a["next_observations"])
        keep = np.ones(rows, dtype=bool)
    else:
        next_obs = _map(obs, lambda x: np.concatenate([x[1:], x[-1:]]))
        keep = terminated | ~np.concatenate([truncated[:-1], [True]])
    t = int(keep.sum())
    if t == 0:
        raise ConfigError(f"{path}: no usable transition (every row lacks a next observation)")

    def col(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x[keep])).to(dtype)

    def observation_col(x):  # nested entries keep their dtype (uint8 pixels stay uint8)
        if isinstance(x, dict):
            return TensorDict({k: torch.as_tensor(np.ascontiguousarray(v[keep])) for k, v in x.items()}, [t])
        return col(x)

    data = TensorDict({
        OBSERVATION: observation_col(obs), ACTION: col(a["actions"].reshape(rows, -1)),
        EPISODE: col(episode, torch.long),
        NEXT: {OBSERVATION: observation_col(next_obs), REWARD: col(a["rewards"].reshape(-1, 1)),
               TERMINATED: col(terminated.reshape(-1, 1), torch.bool),
               TRUNCATED: col(truncated.reshape(-1, 1), torch.bool), DONE: col(ends.reshape(-1, 1), torch.bool)},
    }, batch_size=[t])
    if SUCCESS_FLAGS in a:  # the env's success flag per row (e.g. arsq-demos' Meta-World files)
        data[NEXT_SUCCESS] = col(a[SUCCESS_FLAGS].reshape(-1, 1), torch.bool)
    return data


def read_minari(dataset_id: str, *, root: str | os.PathLike | None = None) -> TensorDict:
    """Read a local Minari dataset with ``minari.load_dataset`` into a TED TensorDict ``[T]``.

    Args:
        dataset_id: e.g. ``mujoco/hopper/medium-v0``.
        root: the Minari store (default: ``$MINARI_DATASETS_PATH`` or Minari's own default).
    """
    dataset = _load_minari(dataset_id, root)
    chunks = [_minari_episode(ep, dataset_id) for ep in dataset.iterate_episodes()]
    if not chunks or sum(c.numel() for c in chunks) == 0:
        raise ConfigError(f"Minari dataset {dataset_id!r} is empty")
    data = torch.cat(chunks)
    for key in (OBSERVATION, ACTION, NEXT_REWARD, NEXT_OBSERVATION):
        if not torch.isfinite(data[key]).all():
            raise ConfigError(f"Minari dataset {dataset_id!r}: {key} contains NaN or inf")
    return data


def _load_minari(dataset_id: str, root: str | os.PathLike | None):
    """``minari.load_dataset`` from the store ``root`` (the process environment is left as it was)."""
    try:
        import minari
    except ImportError:
        raise ConfigError("reading Minari datasets needs the 'minari' package: pip install minari") from None
    previous = os.environ.get("MINARI_DATASETS_PATH")
    if root is not None:
        os.environ["MINARI_DATASETS_PATH"] = os.path.expanduser(str(root))
    try:
        return minari.load_dataset(dataset_id)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"Minari dataset {dataset_id!r}: {err}") from None
    finally:
        if root is not None and previous is None:
            del os.environ["MINARI_DATASETS_PATH"]
        elif root is not None:
            os.environ["MINARI_DATASETS_PATH"] = previous


def _minari_episode(ep, dataset_id: str) -> TensorDict:
    """One Minari episode as TED rows ``[steps]``."""
    steps = len(ep.actions)
    if not isinstance(ep.observations, np.ndarray):
        raise ConfigError(f"Minari dataset {dataset_id!r}: only array (Box) observations are supported")
    obs = torch.as_tensor(ep.observations, dtype=torch.float32).reshape(steps + 1, -1)
    term = torch.as_tensor(ep.terminations).bool().reshape(steps, 1)
    trunc = torch.as_tensor(ep.truncations).bool().reshape(steps, 1) & ~term
    return TensorDict({
        OBSERVATION: obs[:-1], ACTION: torch.as_tensor(ep.actions, dtype=torch.float32).reshape(steps, -1),
        EPISODE: torch.full((steps,), int(ep.id), dtype=torch.long),
        NEXT: {OBSERVATION: obs[1:], REWARD: torch.as_tensor(ep.rewards, dtype=torch.float32).reshape(-1, 1),
               TERMINATED: term, TRUNCATED: trunc, DONE: term | trunc}}, batch_size=[steps])


def check_against_env(data: TensorDict, spec: EnvSpec, source: str) -> TensorDict:
    """Check sizes against the env; clip actions outside its bounds (with a warning). Returns the checked data."""
    act_dim = data[ACTION].shape[-1]
    observation = data[OBSERVATION]
    if isinstance(observation, TensorDictBase) or spec.observation_shapes is not None:
        shapes = ({k: list(v.shape[1:]) for k, v in observation.items()} if isinstance(observation, TensorDictBase)
                  else "a flat vector")
        if shapes != spec.observation_shapes:
            raise ConfigError(f"{source}: observations have shapes {shapes} but the env's have "
                              f"{spec.observation_shapes or 'a flat vector'}")
    elif observation.shape[-1] != spec.obs_dim:
        raise ConfigError(f"{source}: observations have {observation.shape[-1]} dims but the env's have "
                          f"{spec.obs_dim}")
    if act_dim != spec.action_dim:
        raise ConfigError(f"{source}: actions have {act_dim} dims but the env's have {spec.action_dim}")
    low, high = torch.tensor(spec.action_low), torch.tensor(spec.action_high)
    outside = ((data[ACTION] < low) | (data[ACTION] > high)).any(-1)
    if outside.any():
        warnings.warn(f"{source}: {int(outside.sum())} of {len(outside)} actions lie outside the env's bounds "
                      f"and were clipped", stacklevel=2)
        data = data.clone()
        data[ACTION] = data[ACTION].clamp(low, high)
    return data


def _chunks(array: torch.Tensor) -> tuple[int, ...] | None:
    """One row per HDF5 chunk for images (so reading a few rows does not decompress everything); default otherwise."""
    return (1, *array.shape[1:]) if array.dim() > 2 else None


def write_d4rl_hdf5(path: str | os.PathLike, data: TensorDict, metadata: dict | None = None) -> None:
    """Write a TED TensorDict in D4RL's HDF5 layout (with ``next_observations``); ``metadata`` goes to
    ``metadata/<key>`` attributes-like datasets (strings and numbers).

    A nested observation (e.g. ``pixels`` uint8 + ``proprio``) becomes the groups ``observations/<key>`` and
    ``next_observations/<key>``, one dataset per entry in its own dtype; :func:`read_d4rl_hdf5` reads it back as a
    nested ``observation``."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, key in (("observations", OBSERVATION), ("next_observations", NEXT_OBSERVATION)):
            value = data[key]
            if isinstance(value, TensorDictBase):  # nested: one dataset per entry, dtype kept (uint8 pixels)
                for entry, array in value.items():
                    f.create_dataset(f"{name}/{entry}", data=array.numpy(), chunks=_chunks(array))
            else:
                f[name] = value.numpy()
        f["actions"] = data[ACTION].numpy()
        f["rewards"] = data[NEXT_REWARD].reshape(-1).numpy()
        f["terminals"] = data[NEXT_TERMINATED].reshape(-1).numpy()
        f["timeouts"] = data[NEXT_TRUNCATED].reshape(-1).numpy()
        for key, value in (metadata or {}).items():
            f[f"metadata/{key}"] = value
