"""The README's Python usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_usage_runs(tmp_path, monkeypatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    monkeypatch.chdir(tmp_path)  # lightning_logs/ and checkpoints go here
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert namespace["post"].num_snapshots == 100
    assert namespace["mean"].shape == namespace["std"].shape == (500, 1)
    outside = namespace["dm"].predict_x.abs().squeeze(1) > 5
    assert namespace["std"][outside].mean() > namespace["std"][~outside].mean()
