"""arsq-compare end to end: trains configs x seeds, tabulates, plots, nests the runs, rebuilds from MLflow."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image
from mlflow import MlflowClient

from helpers import QUICKSTART, TINY, use_tmp_mlflow

ALPHAS = {"alpha0.01": "0.01", "alpha0.1": "0.1"}  # label -> --model.critic.init_args.soft_alpha
BROKEN = "broken"  # soft_alpha 0: every run of it stops with a configuration error


def compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ``arsq-compare`` tool (``python -m arsq_lightning.tools.compare``) in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "arsq_lightning.tools.compare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def table_rows(path: Path) -> dict[str, dict[str, str]]:
    """The markdown table of ``path`` as {config label: {column header: cell}}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header = split[0]
    assert set(lines[1]) <= {"|", "-"}
    return {cells[0]: dict(zip(header, cells)) for cells in split[2:]}


def cell_numbers(cell: str) -> tuple[float, float]:
    """``"mean ± std"`` -> (mean, std)."""
    mean, std = cell.split("±")
    return float(mean), float(std)


def eval_returns(client: MlflowClient, run) -> list[float]:
    """The run's ``eval/return_mean`` values in step order, read straight from MLflow."""
    history = client.get_metric_history(run.info.run_id, "eval/return_mean")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def assert_matches(cell: str, values: list[float]) -> None:
    """The table cell shows the mean and sample std of ``values`` (to its one decimal)."""
    mean, std = cell_numbers(cell)
    assert mean == pytest.approx(np.mean(values), abs=0.051)
    assert std == pytest.approx(np.std(values, ddof=1), abs=0.051)


def assert_curves_png(path: Path) -> None:
    """A real PNG of some size, with coloured lines on it (not a blank canvas)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    rgb = image.imread(path)[..., :3]
    assert rgb.ndim == 3 and rgb.shape[0] > 200 and rgb.shape[1] > 200
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 0.3).sum() > 500  # pixels of the coloured curves and bands; black/white/grey have none


def assert_table_matches_runs(client: MlflowClient, children: list, rows: dict, raw: dict) -> None:
    """Table cells and raw CSV numbers agree with the runs' metrics read from MLflow, grouped by their own params."""
    for label, alpha in ALPHAS.items():
        mine = [r for r in children if r.data.params["critic/init_args/soft_alpha"] == alpha]
        mine.sort(key=lambda r: r.data.params["seed"])
        assert [r.data.params["seed"] for r in mine] == ["0", "1"] and rows[label]["seeds ok"] == "2/2"
        curves = [eval_returns(client, run) for run in mine]
        assert all(len(curve) == 2 for curve in curves)  # evaluations after 15 and 30 updates
        assert_matches(rows[label]["final return"], [curve[-1] for curve in curves])
        assert_matches(rows[label]["best return"], [max(curve) for curve in curves])
        # two evaluations: the trapezoid time-average over the step span is their plain mean
        assert_matches(rows[label]["AUC return_mean"], [sum(curve) / 2 for curve in curves])
        for seed, run, curve in zip("01", mine, curves):
            row = raw[(label, seed)]
            assert row["run_id"] == run.info.run_id and float(row["final_return"]) == curve[-1]
            assert float(row["wall_s"]) == (run.info.end_time - run.info.start_time) / 1000
            assert float(row["updates_per_s"]) > 0


def test_compare_trains_tabulates_plots_nests_and_rebuilds(monkeypatch, tmp_path):
    uri = use_tmp_mlflow(monkeypatch, tmp_path)
    configs = [f"{QUICKSTART}::--model.critic.init_args.soft_alpha {alpha}" for alpha in ALPHAS.values()]
    common = ["--configs", *configs, f"{QUICKSTART}::--model.critic.init_args.soft_alpha 0", "--labels", *ALPHAS,
              BROKEN, "--seeds", "0", "1", "--name", "cmp", "--tracking-uri", uri]
    first = compare(*common, f"--extra={shlex.join(TINY)}", "--out", "first", cwd=tmp_path)
    assert first.returncode == 1, first.stdout + first.stderr  # the broken config failed, the others went on
    text = (tmp_path / "first" / "compare.md").read_text()
    rows = table_rows(tmp_path / "first" / "compare.md")
    assert list(rows) == [*ALPHAS, BROKEN] and rows[BROKEN]["seeds ok"] == "0/2"
    assert rows[BROKEN]["final return"] == "—" and "soft_alpha must be positive" in text
    assert "final score" not in rows["alpha0.1"]  # no normalised score without a dataset's reference returns
    assert "| alpha0.1 |" in first.stdout  # the table is printed

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("arsq").experiment_id
    runs = client.search_runs([experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    parent_id = parent[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 4 == len(runs) - 1  # the broken config's runs never reached MLflow
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"compare.md", "curves.png", "runs.csv"}

    raw = {(row["label"], row["seed"]): row
           for row in csv.DictReader((tmp_path / "first" / "runs.csv").read_text().splitlines())}
    assert_table_matches_runs(client, children, rows, raw)
    assert_curves_png(tmp_path / "first" / "curves.png")

    rebuilt = compare(*common, "--reuse", "--out", "rebuilt", cwd=tmp_path)
    assert rebuilt.returncode == 1, rebuilt.stdout + rebuilt.stderr
    assert table_rows(tmp_path / "rebuilt" / "compare.md") == rows
    after = client.search_runs([experiment_id])
    assert len(after) == len(runs)  # nothing trained, the parent run reused
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in after if r.info.run_id != parent_id)
    assert_curves_png(tmp_path / "rebuilt" / "curves.png")
