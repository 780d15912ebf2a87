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
import os
import time

import torch

os.environ.setdefault("MUJOCO_GL", "egl")

from arsq_lightning.cli import build_cli  # noqa: E402
from arsq_lightning.data.offline import OfflineToOnlineDataModule  # noqa: E402
from arsq_lightning.module import ARSQModule  # noqa: E402
from arsq_lightning.tools.bench import interleaved, our_update  # noqa: E402


def optimizer_of(module: ARSQModule) -> torch.optim.Optimizer:
    """The module's own optimiser (without its rate schedule: the timed updates do not step it)."""
    built = module.configure_optimizers()
    return built["optimizer"] if isinstance(built, dict) else built


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
    fns = {"eager": our_update(eager, optimizer_of(eager), batches, autocast=autocast),
           "compiled": our_update(compiled, optimizer_of(compiled), batches, autocast=autocast, compiled=True)}
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
