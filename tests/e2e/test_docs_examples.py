"""The "Compose your own" example of docs/compose.md runs as written."""

from __future__ import annotations

import re

from helpers import REPO


def test_compose_example_runs():
    text = (REPO / "docs" / "compose.md").read_text()
    section = text.split("## Compose your own", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/compose.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["q"].shape == (2, 32) and namespace["adv"].shape == (2, 32, 6, 7)
    assert namespace["action"].shape == (32, 3)
