"""A finished offline-to-online run, read back from its checkpoint for the analysis scripts beside this file."""

from __future__ import annotations

import torch

from arsq_lightning.data.offline import OfflineToOnlineDataModule
from arsq_lightning.module import ARSQModule


def load_run(checkpoint: str, dataset: str | None = None) -> tuple[ARSQModule, OfflineToOnlineDataModule]:
    """The run's module (critic in eval mode, on the CPU) and its data module rebuilt from the saved settings
    (``dataset``: the dataset file, if it is no longer where the run read it)."""
    torch.set_num_threads(1)
    module = ARSQModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=False)
    module.critic.eval()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    settings = {k: v for k, v in saved.items() if not k.startswith("_")}
    if dataset:
        settings["dataset"] = dataset
    return module, OfflineToOnlineDataModule(**settings)
