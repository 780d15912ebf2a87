"""Run tags: the git state of the code that ran, or nothing outside a checkout."""

from __future__ import annotations

import subprocess

from arsq_lightning.tracking import git_state

from helpers import REPO


def test_git_state_of_the_checkout_and_of_a_folder_outside_git(tmp_path):
    state = git_state(REPO)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert state["git.commit"] == head and state["git.dirty"] in ("true", "false")
    assert git_state(tmp_path) == {}  # e.g. a wheel installed in site-packages


def test_a_tracked_change_makes_the_checkout_dirty(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f.txt").write_text("a")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    assert git_state(tmp_path)["git.dirty"] == "false"
    (tmp_path / "f.txt").write_text("b")
    assert git_state(tmp_path)["git.dirty"] == "true"
