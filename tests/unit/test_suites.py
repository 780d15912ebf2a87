"""Every registered env suite implements the Suite protocol, and ids resolve to their suite or fail in one line."""

from __future__ import annotations

import importlib
import inspect

import pytest

from arsq_lightning.envs.core import SUITES, Suite, dataset_hint
from arsq_lightning.errors import ConfigError


@pytest.mark.parametrize("prefix", sorted(SUITES))
def test_each_suite_module_has_the_protocol_functions(prefix):
    module = importlib.import_module(SUITES[prefix])
    for name, member in inspect.getmembers(Suite, inspect.isfunction):
        if not name.startswith("_"):
            assert callable(vars(module).get(name)), f"{SUITES[prefix]} lacks {name}"
            positional = [p.name for p in inspect.signature(member).parameters.values()
                          if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # without self
            ours = [p.name for p in inspect.signature(vars(module)[name]).parameters.values()
                    if p.kind is p.POSITIONAL_OR_KEYWORD]
            assert ours == positional, f"{SUITES[prefix]}.{name} takes {ours} positionally, the protocol {positional}"


def test_dataset_hints_come_from_the_suite():
    assert "arsq-demos --task reach-v3" in dataset_hint("metaworld:reach-v3", "missing.hdf5")
    assert dataset_hint("dmc:cheetah-run", "missing.hdf5") == ""
    assert dataset_hint("Pendulum-v1", "missing.hdf5") == ""
    with pytest.raises(ConfigError, match="unknown env suite 'atari'"):
        dataset_hint("atari:pong", "missing.hdf5")
