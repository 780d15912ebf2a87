"""Time one training update of a config's model on batches of its own data: eager against ``torch.compile``.

    python scripts/analysis/bench_update.py --config configs/metaworld/from_dataset.yaml \
        --data.env_id metaworld:push-v3 --data.dataset datasets/metaworld/push-v3_mixed.hdf5

Everything after the script's own options is passed to the CLI, as ``arsq fit`` would take it. The module, optimiser,
precision (the trainer's autocast) and batches are the run's; offline rows only (the online phase's batches have the
same shapes). Both variants start from the same weights and each keeps its own optimiser state; they are timed in
interleaved blocks, and the medians and their ratio are printed (``> 1``: compiled faster). The first compiled update
(compilation) is timed apart.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time
from collections.abc import Callable

import torch

os.environ.setdefault("MUJOCO_GL", "egl")

from arsq_lightning.cli import build_cli  # noqa: E402
from arsq_lightning.data.offline import OfflineToOnlineDataModule  # noqa: E402
from arsq_lightning.module import ARSQModule, compiled_loss_terms, loss_terms  # noqa: E402
from arsq_lightning.tools.bench import interleaved  # noqa: E402


def make_update(module: ARSQModule, batches: list, autocast: Callable, compiled: bool) -> Callable[[], None]:
    """One optimiser step of ``module`` per call, cycling through ``batches``."""
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    terms = compiled_loss_terms() if compiled else loss_terms
    cycle = itertools.cycle(batches)

    def update() -> None:
        batch = next(cycle)
        with autocast():
            out = terms(module.loss_fn, module.critic, batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        module.critic.polyak(module.tau)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, as the configs)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds; medians are reported")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    args, cli_args = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    cli = build_cli(cli_args, run=False)
    data = cli.datamodule
    if not isinstance(data, OfflineToOnlineDataModule):
        raise SystemExit("bench_update needs a config with a dataset (data: OfflineToOnlineDataModule)")
    data.build_buffers()
    batches = [data.sample() for _ in range(args.batches)]
    autocast = cli.trainer.precision_plugin.forward_context
    eager, compiled = cli.model, copy.deepcopy(cli.model)
    fns = {"eager": make_update(eager, batches, autocast, False),
           "compiled": make_update(compiled, batches, autocast, True)}
    started = time.perf_counter()
    fns["compiled"]()
    print(f"first compiled update (compilation): {time.perf_counter() - started:.1f} s")
    times = interleaved(fns, repeats=args.repeats, warmup=1, sync=lambda: None)
    print(f"precision {cli.trainer.precision}, batch {batches[0].shape[0]}, threads {torch.get_num_threads()}")
    for name, seconds in times.items():
        print(f"{name:>9}: {seconds * 1e3:.0f} ms per update")
    print(f"compiled_speedup={times['eager'] / times['compiled']:.2f}")


if __name__ == "__main__":
    main()
