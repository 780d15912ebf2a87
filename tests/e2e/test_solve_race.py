"""The Pendulum race's clock (tools/solve_race.py): it stops a fit at the first evaluation that beats the threshold and
reports the env frames then and the CPU seconds of training without the evaluations."""

from __future__ import annotations

import math

from arsq_lightning.cli import build_cli
from arsq_lightning.tools.solve_race import SOLVED, Attempt, SolveClock, attempt, quickstart_warmup, summary

from helpers import QUICKSTART, TINY, use_tmp_mlflow


def test_the_clock_stops_at_the_first_evaluation_that_solves(monkeypatch, tmp_path, capsys):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "60",
                     "--trainer.callbacks+", "arsq_lightning.tools.solve_race.SolveClock",
                     "--trainer.callbacks.init_args.solved=-1e9"])  # any return solves
    (clock,) = [c for c in cli.trainer.callbacks if isinstance(c, SolveClock)]
    assert cli.trainer.global_step == 15  # the first evaluation (after update 15) solved: no update after it
    watch = clock.watch
    frames, cpu = watch.result
    assert frames == cli.datamodule.frames and len(watch.evaluations) == 1
    assert 0 < cpu == watch.eval_start - watch.start and watch.eval_cpu > 0  # counted up to the evaluation only
    assert '"frames": %d' % frames in capsys.readouterr().out  # the attempt, as the race reads it


def test_an_attempt_that_never_solves_reports_every_evaluation_and_no_result(monkeypatch, tmp_path):
    use_tmp_mlflow(monkeypatch, tmp_path)
    cli = build_cli(["fit", "--config", str(QUICKSTART), *TINY, "--trainer.max_steps", "45",
                     "--trainer.callbacks+", "arsq_lightning.tools.solve_race.SolveClock",
                     "--trainer.callbacks.init_args.solved=1e9"])
    (clock,) = [c for c in cli.trainer.callbacks if isinstance(c, SolveClock)]
    assert cli.trainer.global_step == 45 and clock.watch.result is None
    assert [frames for frames, _ in clock.watch.evaluations] == sorted({f for f, _ in clock.watch.evaluations})
    assert len(clock.watch.evaluations) == 3


def test_summary_ratio_counts_an_unsolved_attempt_as_slowest():
    results = [Attempt("arsq", 0, 2000, 30.0, []), Attempt("arsq", 1, None, None, []),
               Attempt("arsq", 2, 3000, 50.0, []), Attempt("sac", 0, 1000, 10.0, []),
               Attempt("sac", 1, 1500, 20.0, []), Attempt("sac", 2, 1000, 15.0, [])]
    numbers = summary(results)
    assert numbers["solve_cpu_vs_sac"] == 50.0 / 15.0 and numbers["solve_frames_ours"] == 3000
    assert math.isinf(summary(results[1:2] + results[3:])["solve_cpu_s_ours"])


def test_an_attempt_runs_in_its_own_process_and_is_read_back(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    warmup = quickstart_warmup()
    result = attempt("arsq", 0, warmup + 501)  # the quickstart to 501 updates: one evaluation, after update 500
    assert result.learner == "arsq" and [frames for frames, _ in result.evaluations] == [warmup + 500]
    assert (result.frames is None) == (result.evaluations[0][1] <= SOLVED)
