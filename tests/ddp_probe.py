"""A callback the DDP test adds to ``arsq fit``: each rank saves its parameters and first observations."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class DumpRankState(Callback):
    """At the end of training, write ``rank{r}.pt`` with online/target parameters and some collected data; as training
    starts, ``start-rank{r}.pt`` with the rank's buffer (after a resume: what it restored)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer, pl_module) -> None:
        data = trainer.datamodule
        rows = data.buffer.storage[: len(data.buffer)]["observation"].clone() if len(data.buffer) else None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"buffer": rows, "frames_origin": data._frames_origin},
                   self.out_dir / f"start-rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module) -> None:
        critic = pl_module.critic
        data = trainer.datamodule
        state = {
            "online": torch.cat([p.detach().flatten() for p in critic.head.parameters()]),
            "target": torch.cat([p.detach().flatten() for p in critic.target_head.parameters()]),
            "observations": data.buffer.storage[: len(data.buffer)]["observation"][:50].clone(),
            "buffer": data.buffer.storage[: len(data.buffer)]["observation"].clone(),
            "updates": trainer.global_step,
            "world_size": trainer.world_size,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")
