"""Compare configs over seeds: train every (config, seed) with ``arsq fit``, read the runs back from MLflow, and write
a markdown table, a learning-curve plot and the raw per-run numbers.

Each (config, seed) runs ``python -m arsq_lightning.cli fit --config CFG --seed_everything S --data.seed S [--extra]
[per-config args]`` in its own process (one after the other; ``--parallel N`` runs N at a time), with its output in
``OUT/logs/<label>-s<seed>.log``. The MLflow run of each child is named ``<label>-s<seed>`` and tagged with the
comparison name (``arsq.compare``), its label, seed, config and a unique launch id (which finds it again), and
``mlflow.parentRunId`` = a parent run named after the comparison, so the MLflow UI nests the children under it. The
parent run gets ``compare.md``, ``curves.png`` and ``runs.csv`` as artifacts.

Usage (from the repository root, in the project's venv):

    arsq-compare --configs configs/quickstart.yaml \\
        "configs/quickstart.yaml::--model.critic.init_args.soft_alpha 0.1" --labels alpha0.01 alpha0.1 --seeds 0 1 2 \\
        --extra="--trainer.max_steps 3000" --out results/alpha
    arsq-compare --reuse --out results/alpha        # rebuild the table from the runs, no training

* ``CFG::ARGS`` adds ``ARGS`` (shell-split) to that config's runs only, after ``--extra``; ``--extra`` needs ``=``
  when its value is a single option (``--extra=--trainer.max_steps=3000``).
* ``--name`` (default: the last part of ``--out``) names the comparison. ``--reuse`` (alias ``--from-runs``) trains
  nothing: it takes, for every label and seed, the newest run tagged with that name (all labels and seeds found
  when ``--configs`` / ``--seeds`` are not given), logs the files to the newest parent run of that name and re-tags
  the children with its id.
* A run that fails (non-zero exit, no MLflow run, run not FINISHED, no ``eval/return_mean``) does not stop the
  others; the table shows ``k/n`` seeds ok, lists the failures, and the exit status is 1 (0 when all are ok).

Numbers (per run; the table shows mean ± sample std (ddof=1) over the seeds that finished, no ± for one seed):

* final = the last evaluation's value, best = the maximum over the evaluations, of ``eval/return_mean``, and of
  ``eval/normalized_score`` / ``eval/success_rate`` when the runs logged them (columns shown only then).
* AUC = the time-average of the curve metric over the run, (1 / (s_N - s_1)) * trapezoid integral of y over the
  evaluation steps s_1..s_N (MLflow steps = gradient updates); with a single evaluation it is that value.
* wall time = MLflow run end - start (so without the process's import time); updates/s = mean of
  ``time/updates_per_s`` over the run.
* ``curves.png``: x = MLflow step (gradient updates), y = the curve metric (``--metric``; default
  ``eval/normalized_score`` when logged, else ``eval/return_mean``), one line per config = mean over the seeds that
  logged that step, shaded band = min-max over those seeds (``--band std``: mean ± sample std).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run

from arsq_lightning.shipped_configs import resolve_config

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # as arsq_lightning.cli (not imported: it would load torch here)
RETURN, SCORE, SUCCESS, UPDATES_PER_S = ("eval/return_mean", "eval/normalized_score", "eval/success_rate",
                                         "time/updates_per_s")
TAG_NAME, TAG_ROLE, TAG_LABEL, TAG_SEED = "arsq.compare", "arsq.compare.role", "arsq.compare.label", "arsq.compare.seed"
TAG_CONFIG, TAG_LAUNCH, TAG_PARENT = "arsq.compare.config", "arsq.compare.launch", "mlflow.parentRunId"
CSV_FIELDS = ["label", "seed", "ok", "note", "run_id", "config", "final_return", "best_return", "final_score",
              "best_score", "final_success", "best_success", "auc", "wall_s", "updates_per_s"]


@dataclass(frozen=True)
class Spec:
    """One config of the comparison: its label, YAML path and the extra arguments for its runs only."""

    label: str
    config: str
    overrides: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        return " ".join([self.config, *self.overrides])


@dataclass
class Outcome:
    """One (config, seed) run: the MLflow run (``None`` if none was found), whether it counts, and its numbers."""

    label: str
    seed: int
    run: Run | None
    ok: bool
    note: str = ""
    numbers: dict[str, float] = field(default_factory=dict)
    curve: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # [E, 2] = (step, value) per evaluation


# --- arguments and specs ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=[], help="YAML configs, each optionally 'CFG::ARGS'")
    p.add_argument("--labels", nargs="+", help="one label per config (default: file name + per-config args)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0 1 2; with --reuse: all found)")
    p.add_argument("--extra", action="append", default=[], help="arguments for every run (shell-split)")
    p.add_argument("--out", default="compare", help="output folder (compare.md, curves.png, runs.csv, logs/)")
    p.add_argument("--name", help="comparison name tagged on the runs (default: the last part of --out)")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    p.add_argument("--experiment", default="arsq", help="MLflow experiment (the CLI's default is 'arsq')")
    p.add_argument("--reuse", "--from-runs", action="store_true", help="only read existing runs, train nothing")
    p.add_argument("--metric", help="eval metric of the curves and the AUC (default: normalised score or return)")
    p.add_argument("--band", choices=["minmax", "std"], default="minmax", help="shaded band of the curves")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1: sequential)")
    p.add_argument("--gpus", nargs="+", help="CUDA device ids handed out to the parallel runs (CUDA_VISIBLE_DEVICES)")
    args = p.parse_args(argv)
    args.name = args.name or Path(args.out).resolve().name
    if "'" in args.name or args.parallel < 1:
        p.error("--name may not contain a quote and --parallel must be >= 1")
    if not args.reuse and not args.configs:
        p.error("--configs is required unless --reuse")
    try:
        args.specs = parse_specs(args.configs, args.labels, check_files=not args.reuse)
    except ValueError as err:
        p.error(str(err))
    return args


def parse_specs(configs: Sequence[str], labels: Sequence[str] | None, *, check_files: bool) -> list[Spec]:
    """``CFG`` or ``CFG::ARGS`` entries -> specs with unique labels (``labels`` or derived from the entries)."""
    if labels and len(labels) != len(configs):
        raise ValueError(f"{len(labels)} labels for {len(configs)} configs")
    specs = []
    for i, entry in enumerate(configs):
        path, _, rest = entry.partition("::")
        if check_files:
            path = resolve_config(path)  # a file, or a shipped config by name (quickstart, metaworld/from_dataset)
        overrides = tuple(shlex.split(rest))
        specs.append(Spec(labels[i] if labels else default_label(path, overrides), path, overrides))
    names = [s.label for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be unique, got {names}: pass --labels")
    return specs


def default_label(path: str, overrides: Sequence[str]) -> str:
    """``quickstart`` or ``quickstart soft_alpha=0.1`` (the last part of each overridden key)."""
    parts, tokens = [Path(path).stem], list(overrides)
    while tokens:
        token = tokens.pop(0)
        key, eq, value = token.lstrip("-").partition("=")
        if not eq and tokens and not tokens[0].startswith("--"):
            value = tokens.pop(0)
        parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts)


# --- launching -------------------------------------------------------------------------------------------------------
def child_command(spec: Spec, seed: int, extra: Sequence[str], args: argparse.Namespace, tags: dict) -> list[str]:
    """The ``arsq fit`` command of one (config, seed); the logger settings come last so that they hold."""
    logger = "--trainer.logger.init_args."
    return [sys.executable, "-m", "arsq_lightning.cli", "fit", "--config", spec.config,
            "--seed_everything", str(seed), "--data.seed", str(seed), *extra, *spec.overrides,
            f"{logger}tracking_uri", args.tracking_uri, f"{logger}experiment_name", args.experiment,
            f"{logger}run_name", f"{spec.label}-s{seed}", f"{logger}tags", json.dumps(tags)]


def run_child(command: list[str], log_path: Path, gpu: str | None) -> int:
    """Run one child process with its output in ``log_path``; returns its exit status."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(shlex.join(command) + "\n\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def train_all(client: MlflowClient, experiment_id: str, parent_id: str, args: argparse.Namespace) -> list[Outcome]:
    """Launch every (config, seed), seed by seed (so an interrupted comparison still covers every config)."""
    extra = [token for text in args.extra for token in shlex.split(text)]
    jobs = [(spec, seed) for seed in args.seeds for spec in args.specs]
    gpus: queue.Queue = queue.Queue()
    for i in range(args.parallel):
        gpus.put(args.gpus[i % len(args.gpus)] if args.gpus else None)

    def launch(job: tuple[Spec, int]) -> Outcome:
        """Run one (config, seed) on a free device slot and judge its MLflow run."""
        spec, seed = job
        launch_id = uuid.uuid4().hex
        tags = {TAG_NAME: args.name, TAG_ROLE: "child", TAG_LABEL: spec.label, TAG_SEED: str(seed),
                TAG_CONFIG: spec.description, TAG_LAUNCH: launch_id, TAG_PARENT: parent_id}
        log_path = Path(args.out) / "logs" / f"{safe_name(spec.label)}-s{seed}.log"
        gpu = gpus.get()
        try:
            status = run_child(child_command(spec, seed, extra, args, tags), log_path, gpu)
        finally:
            gpus.put(gpu)
        runs = client.search_runs([experiment_id], f"tags.`{TAG_LAUNCH}` = '{launch_id}'")
        outcome = judge(spec.label, seed, runs[0] if runs else None, status)
        if not outcome.ok:
            outcome.note += f": {error_line(log_path)} (log: {log_path})"
        print(f"{spec.label} seed {seed}: {'ok' if outcome.ok else 'FAILED, ' + outcome.note}", flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        return list(pool.map(launch, jobs))


def error_line(path: Path, width: int = 200) -> str:
    """The last line of a log file that mentions an error (else its last line), cut to ``width`` characters."""
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1][:width]


def safe_name(label: str) -> str:
    """``label`` usable as a file name."""
    return re.sub(r"[^\w.=+-]+", "_", label)


def judge(label: str, seed: int, run: Run | None, exit_status: int = 0) -> Outcome:
    """Whether a run counts: exit status 0, an MLflow run that FINISHED and logged ``eval/return_mean``."""
    if exit_status != 0:
        note = f"exit status {exit_status}"
    elif run is None:
        note = "no MLflow run"
    elif run.info.status != "FINISHED":
        note = f"run {run.info.status}"
    elif RETURN not in run.data.metrics:
        note = f"no {RETURN}"
    else:
        note = ""
    return Outcome(label, seed, run, not note, note)


# --- reading existing runs -------------------------------------------------------------------------------------------
def find_children(client: MlflowClient, experiment_id: str, args: argparse.Namespace) -> list[Outcome]:
    """The newest run of every (label, seed) of comparison ``args.name`` (labels / seeds as given or all found)."""
    query = f"tags.`{TAG_NAME}` = '{args.name}' and tags.`{TAG_ROLE}` = 'child'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=50_000)
    newest = {(r.data.tags.get(TAG_LABEL), int(r.data.tags.get(TAG_SEED, -1))): r for r in runs}
    labels = [s.label for s in args.specs] or list(dict.fromkeys(label for label, _ in newest))
    seeds = args.seeds or sorted({seed for _, seed in newest})
    return [judge(label, seed, newest.get((label, seed))) for seed in seeds for label in labels]


def parent_run(client: MlflowClient, experiment_id: str, name: str, reuse: bool) -> str:
    """The id of the comparison's parent run: the newest one of that name with ``reuse``, else a new one."""
    if reuse:
        query = f"tags.`{TAG_NAME}` = '{name}' and tags.`{TAG_ROLE}` = 'parent'"
        found = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0].info.run_id
    return client.create_run(experiment_id, run_name=name, tags={TAG_NAME: name, TAG_ROLE: "parent"}).info.run_id


# --- numbers ---------------------------------------------------------------------------------------------------------
def history(client: MlflowClient, run: Run, key: str) -> np.ndarray:
    """``[E, 2]`` (step, value) of metric ``key``, ordered by step then time (empty if not logged)."""
    if key not in run.data.metrics:
        return np.zeros((0, 2))
    points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
    return np.array([(m.step, m.value) for m in points], dtype=np.float64).reshape(-1, 2)


def time_average(curve: np.ndarray) -> float:
    """Trapezoid integral of ``curve`` ([E, 2] = step, value) over its step span, divided by the span."""
    if len(curve) == 0:
        return math.nan
    span = curve[-1, 0] - curve[0, 0]
    area = ((curve[1:, 1] + curve[:-1, 1]) / 2 * np.diff(curve[:, 0])).sum()  # np.trapezoid needs NumPy >= 2
    return float(area / span) if span > 0 else float(curve[-1, 1])


def fill_numbers(client: MlflowClient, outcome: Outcome, metric: str) -> None:
    """Read the run's final/best metrics, AUC of ``metric``, wall time and updates/s into ``outcome``."""
    run, numbers = outcome.run, outcome.numbers
    for key, name in ((RETURN, "return"), (SCORE, "score"), (SUCCESS, "success")):
        curve = history(client, run, key)
        if len(curve):
            numbers[f"final_{name}"], numbers[f"best_{name}"] = curve[-1, 1], curve[:, 1].max()
    outcome.curve = history(client, run, metric)
    numbers["auc"] = time_average(outcome.curve)
    if run.info.end_time:
        numbers["wall_s"] = (run.info.end_time - run.info.start_time) / 1000
    rates = history(client, run, UPDATES_PER_S)
    if len(rates):
        numbers["updates_per_s"] = float(rates[:, 1].mean())


def default_metric(outcomes: Sequence[Outcome]) -> str:
    """``eval/normalized_score`` when any counted run logged it, else ``eval/return_mean``."""
    return SCORE if any(o.ok and SCORE in o.run.data.metrics for o in outcomes) else RETURN


# --- table -----------------------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` (sample std) of the finite values; a single value alone; ``—`` for none."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table_columns(outcomes: Sequence[Outcome], metric: str) -> list[tuple[str, str, int]]:
    """(header, number key, decimals) of the table's columns; score and success columns only when logged."""
    present = {key for o in outcomes if o.ok for key in o.numbers}
    columns = [("final return", "final_return", 1), ("best return", "best_return", 1)]
    columns += [("final score", "final_score", 3), ("best score", "best_score", 3)] if "final_score" in present else []
    columns += [("final success", "final_success", 2)] if "final_success" in present else []
    columns.append((f"AUC {metric.split('/')[-1]}", "auc", 3 if metric != RETURN else 1))
    return columns + [("wall time (s)", "wall_s", 1), ("updates/s", "updates_per_s", 1)]


def markdown_table(outcomes: Sequence[Outcome], metric: str, band: str) -> str:
    """The comparison table (one row per label, in order) and its footer of definitions and failures."""
    columns = table_columns(outcomes, metric)
    lines = ["| config | seeds ok | " + " | ".join(h for h, _, _ in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for label in dict.fromkeys(o.label for o in outcomes):
        mine = [o for o in outcomes if o.label == label]
        good = [o for o in mine if o.ok]
        cells = [mean_std([o.numbers.get(key, math.nan) for o in good], d) for _, key, d in columns]
        lines.append(f"| {label.replace('|', '/')} | {len(good)}/{len(mine)} | " + " | ".join(cells) + " |")
    band_text = "min-max" if band == "minmax" else "mean ± sample std"
    lines += ["", "Mean ± sample std (ddof=1) over the seeds that finished. final = last evaluation, best = maximum "
              "over the evaluations. "
              f"AUC = time-average of `{metric}` over the run: trapezoid integral over the evaluation steps "
              "(MLflow step = gradient updates) divided by the step span. wall time = MLflow run end - start; "
              f"updates/s = mean of `{UPDATES_PER_S}`. curves.png: mean over seeds, band = {band_text}."]
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{o.label} seed {o.seed}: {o.note.strip()}" for o in failed)]
    return "\n".join(lines) + "\n"


def write_csv(outcomes: Sequence[Outcome], path: Path) -> None:
    """The raw numbers of every run, one row per (label, seed)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for o in outcomes:
            row = {"label": o.label, "seed": o.seed, "ok": int(o.ok), "note": o.note.strip(),
                   "run_id": o.run.info.run_id if o.run else "",
                   "config": o.run.data.tags.get(TAG_CONFIG, "") if o.run else ""}
            writer.writerow(row | {k: repr(float(v)) for k, v in o.numbers.items() if k in CSV_FIELDS})


# --- plot ------------------------------------------------------------------------------------------------------------
def seed_band(curves: Sequence[np.ndarray], band: str) -> tuple[np.ndarray, ...]:
    """Steps, mean, low, high over the curves, at every step any curve has (over the curves that have it)."""
    steps = np.unique(np.concatenate([c[:, 0] for c in curves]))
    columns = [np.array([c[c[:, 0] == s, 1][-1] for c in curves if (c[:, 0] == s).any()]) for s in steps]
    mean = np.array([v.mean() for v in columns])
    if band == "std":
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in columns])
        return steps, mean, mean - std, mean + std
    return steps, mean, np.array([v.min() for v in columns]), np.array([v.max() for v in columns])


def plot_curves(outcomes: Sequence[Outcome], metric: str, band: str, path: Path) -> None:
    """One line per label (mean over seeds) with a shaded band, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(o.label for o in outcomes):
        curves = [o.curve for o in outcomes if o.label == label and o.ok and len(o.curve)]
        if curves:
            steps, mean, low, high = seed_band(curves, band)
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={len(curves)})")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("gradient updates (MLflow step)")
    ax.set_ylabel(metric)
    ax.set_title(f"mean over seeds, band = {'min-max' if band == 'minmax' else '± sample std'}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ------------------------------------------------------------------------------------------------------------
def experiment_id_of(client: MlflowClient, name: str, create: bool) -> str | None:
    """The experiment's id (created if missing and ``create``; ``None`` if missing otherwise)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name) if create else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or read) the comparison, write and log the files, print the table; 0 if every run is ok, else 1."""
    args = parse_args(argv)
    if args.seeds is None and not args.reuse:
        args.seeds = [0, 1, 2]
    client = MlflowClient(args.tracking_uri)
    experiment_id = experiment_id_of(client, args.experiment, create=not args.reuse)
    found = find_children(client, experiment_id, args) if args.reuse and experiment_id is not None else []
    if args.reuse and not any(o.run for o in found):
        print(f"compare: no runs of comparison '{args.name}' in experiment '{args.experiment}' of "
              f"{args.tracking_uri}", file=sys.stderr)
        return 2
    parent_id = parent_run(client, experiment_id, args.name, args.reuse)
    status = "FAILED"
    try:
        outcomes = adopt(client, found, parent_id) if args.reuse else train_all(client, experiment_id, parent_id, args)
        metric = args.metric or default_metric(outcomes)
        for o in outcomes:
            if o.ok:
                fill_numbers(client, o, metric)
        write_outputs(client, parent_id, outcomes, metric, args)
        status = "FINISHED"
    finally:  # an interrupted comparison leaves no parent run RUNNING
        client.set_terminated(parent_id, status)
    return 0 if all(o.ok for o in outcomes) else 1


def adopt(client: MlflowClient, outcomes: list[Outcome], parent_id: str) -> list[Outcome]:
    """Tag the found runs as children of ``parent_id`` (so the MLflow UI nests them there); returns ``outcomes``."""
    for o in outcomes:
        if o.run is not None and o.run.data.tags.get(TAG_PARENT) != parent_id:
            client.set_tag(o.run.info.run_id, TAG_PARENT, parent_id)
    return outcomes


def write_outputs(client: MlflowClient, parent_id: str, outcomes: Sequence[Outcome], metric: str,
                  args: argparse.Namespace) -> None:
    """Write compare.md, curves.png and runs.csv in ``args.out``, log them to the parent run, print the table."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(outcomes, metric, args.band)
    (out / "compare.md").write_text(f"# {args.name}\n\n{table}")
    plot_curves(outcomes, metric, args.band, out / "curves.png")
    write_csv(outcomes, out / "runs.csv")
    for name in ("compare.md", "curves.png", "runs.csv"):
        client.log_artifact(parent_id, str(out / name))
    print(f"\n{table}\nwritten: {out / 'compare.md'}, {out / 'curves.png'}, {out / 'runs.csv'}; "
          f"MLflow parent run {parent_id} (experiment '{args.experiment}') in {args.tracking_uri}")


if __name__ == "__main__":
    sys.exit(main())
