"""The learning-from-suboptimal-data benchmark: ARSQ and CQN on mixed-quality Meta-World MT1 datasets, over seeds.

For every task it makes the dataset if it is missing (``arsq-demos``: 120 episodes of 150 steps, the
scripted expert with Gaussian action noise 0.1 / 0.3 / 0.5 / 0.8 / 1.2 plus 20 uniformly random episodes,
Meta-World's dense reward), trains ``configs/metaworld/from_dataset.yaml`` (ARSQ) and
``configs/metaworld/from_dataset_cqn.yaml`` (CQN) on it (``--methods ARSQ-scalar`` adds
``configs/metaworld/from_dataset_scalar.yaml``) with ``arsq-compare`` (one comparison over every task,
so ``--parallel`` keeps every slot busy), then writes ``benchmark.md`` (per task: the data's success rate and mean
return, the random episodes' mean return, and per method the greedy success rate at the end of pretraining and at
the end, and the final return, mean ± std over seeds) and ``benchmark.png`` (success-rate curves per task).

    arsq-benchmark --tasks push reach door-open plate-slide button-press-topdown --seeds 0 1 2 \\
        --parallel 2 --out results/benchmark
    arsq-benchmark --tasks push reach --seeds 0 --reuse --out results/benchmark   # tables only
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from mlflow import MlflowClient

METHODS = {"ARSQ": "metaworld/from_dataset", "CQN": "metaworld/from_dataset_cqn",
           "ARSQ-scalar": "metaworld/from_dataset_scalar"}  # shipped configs, by name
MIXTURE = ["--episodes", "120", "--random-episodes", "20", "--noise", "0.1", "0.3", "0.5", "0.8", "1.2",
           "--reward", "dense", "--max-episode-steps", "150", "--seed", "100"]
SUCCESS = "eval/success_rate"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", required=True, help="Meta-World tasks without -v3, e.g. push reach")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["ARSQ", "CQN"],
                   help="ARSQ-scalar: ARSQ with scalar values, the recipe before the distributional one")
    p.add_argument("--data-dir", default="datasets/metaworld", help="where the datasets are (made if missing)")
    p.add_argument("--out", default="results/benchmark")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--extra", default="", help="arguments for every run (e.g. a shorter schedule for a smoke test)")
    p.add_argument("--pretrain-steps", type=int, default=2000, help="the configs' offline updates (for the table)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    p.add_argument("--reuse", action="store_true", help="train nothing: tables from the runs already made")
    return p.parse_args(argv)


def dataset_path(args: argparse.Namespace, task: str) -> Path:
    return Path(args.data_dir) / f"{task}-v3_mixed.hdf5"


def make_missing_datasets(args: argparse.Namespace) -> None:
    for task in args.tasks:
        path = dataset_path(args, task)
        if not path.is_file():
            subprocess.run([sys.executable, "-m", "arsq_lightning.tools.make_demos", "--task", f"{task}-v3", *MIXTURE,
                            "--out", str(path)], check=True)


def label(task: str, method: str) -> str:
    return f"{task} {method}"


def run_comparison(args: argparse.Namespace) -> int:
    """One ``arsq-compare`` over every (task, method); returns its exit status (1 if a run failed)."""
    configs, labels = [], []
    for task in args.tasks:
        for method in args.methods:
            data = f"--data.env_id metaworld:{task}-v3 --data.dataset {dataset_path(args, task)}"
            configs.append(f"{METHODS[method]}::{data}")
            labels.append(label(task, method))
    command = [sys.executable, "-m", "arsq_lightning.tools.compare", "--configs", *configs, "--labels", *labels,
               "--seeds", *map(str, args.seeds), "--out", args.out, "--tracking-uri", args.tracking_uri,
               "--metric", SUCCESS]
    if args.reuse:
        command.append("--reuse")
    else:
        command += ["--parallel", str(args.parallel)] + ([f"--extra={args.extra}"] if args.extra else [])
    return subprocess.run(command, check=False).returncode


def dataset_stats(path: Path) -> dict[str, float]:
    """The data's success rate and mean return, and the random episodes' mean return, from the file's metadata."""
    with h5py.File(path, "r") as f:
        meta = f["metadata"]
        return {"success": float(meta["data_success_rate"][()]), "return": float(meta["mean_return"][()]),
                "random_return": float(meta["random_mean_return"][()])}


def run_numbers(client: MlflowClient, run_id: str, pretrain_steps: int) -> dict[str, float]:
    """Success at the end of pretraining (the evaluation at update ``pretrain_steps``) and at the end, final return."""
    success = {m.step: m.value for m in client.get_metric_history(run_id, SUCCESS)}
    returns = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/return_mean"))
    return {"pretrain_success": success.get(pretrain_steps - 1, float("nan")),
            "final_success": success[max(success)], "final_return": returns[-1][1]}


def finished_runs(args: argparse.Namespace) -> list[dict[str, str]]:
    """The rows of the comparison's runs.csv whose run finished (``ok`` = 1)."""
    with open(Path(args.out) / "runs.csv") as f:
        return [row for row in csv.DictReader(f) if row["ok"] == "1"]


def collect(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, float]]]:
    """Per (task, method) the numbers of every finished seed, from the comparison's runs.csv and MLflow."""
    client, results, rows = MlflowClient(args.tracking_uri), {}, finished_runs(args)
    for task in args.tasks:
        for method in args.methods:
            runs = [row["run_id"] for row in rows if row["label"] == label(task, method)]
            results[task, method] = [run_numbers(client, run_id, args.pretrain_steps) for run_id in runs]
    return results


def mean_std(values: list[float], decimals: int) -> str:
    if not values:
        return "-"
    text = f"{np.mean(values):.{decimals}f}"
    return text + (f" ± {np.std(values, ddof=1):.{decimals}f}" if len(values) > 1 else "")


def table(args: argparse.Namespace, results: dict) -> str:
    """The markdown table: one row per task, the data's numbers beside each method's."""
    head = ["task", "data success", "data mean return", "random return"]
    for method in args.methods:
        head += [f"{method} success (pretrain end)", f"{method} success (final)", f"{method} final return",
                 f"{method} seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    stats = {task: dataset_stats(dataset_path(args, task)) for task in args.tasks}
    for task in args.tasks:
        data = stats[task]
        cells = [task, f"{data['success']:.2f}", f"{data['return']:.0f}", f"{data['random_return']:.0f}"]
        for method in args.methods:
            runs = results[task, method]
            cells += [mean_std([r[key] for r in runs], decimals)
                      for key, decimals in (("pretrain_success", 2), ("final_success", 2), ("final_return", 0))]
            cells.append(str(len(runs)))
        lines.append("| " + " | ".join(cells) + " |")
    averages = ["mean", f"{np.mean([stats[t]['success'] for t in args.tasks]):.2f}", "", ""]
    for method in args.methods:
        per_task = [[np.mean([r[key] for r in results[t, method]]) for t in args.tasks if results[t, method]]
                    for key in ("pretrain_success", "final_success")]
        averages += [f"{np.mean(v):.2f}" if v else "-" for v in per_task] + ["", ""]
    lines.append("| " + " | ".join(averages) + " |")
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, path: Path) -> None:
    """Success-rate curves (mean over seeds, min-max band) per task, the data's success rate dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client, rows = MlflowClient(args.tracking_uri), finished_runs(args)
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(3.2 * len(args.tasks), 2.8), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        for method in args.methods:
            curves = [sorted((m.step + 1, m.value) for m in client.get_metric_history(row["run_id"], SUCCESS))
                      for row in rows if row["label"] == label(task, method)]
            if curves:
                length = min(len(c) for c in curves)
                steps = np.array([s for s, _ in curves[0][:length]])
                values = np.array([[v for _, v in c[:length]] for c in curves])
                ax.plot(steps, values.mean(0), label=method)
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
        ax.axhline(dataset_stats(dataset_path(args, task))["success"], color="gray", ls="--", lw=1, label="data")
        ax.axvline(args.pretrain_steps, color="gray", ls=":", lw=1)
        ax.set(title=task, xlabel="updates", ylim=(-0.05, 1.05))
    axes[0][0].set_ylabel("greedy success rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.reuse:
        make_missing_datasets(args)
    status = run_comparison(args)
    results = collect(args)
    text = table(args, results)
    (Path(args.out) / "benchmark.md").write_text(text)
    plot(args, Path(args.out) / "benchmark.png")
    print(text + f"-> {Path(args.out) / 'benchmark.md'}, {Path(args.out) / 'benchmark.png'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
