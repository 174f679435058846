"""The README: its usage example runs as written, it stays short, and what it promises is there.

The README's other snippets moved to the docs with their tests (tests/test_docs.py: the MultiSWAG
loop in docs/guide/module.md, the batch-layout override in docs/guide/tasks.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

QUICK_START = [
    "python3.11 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python examples/sine.py",
    'python3.11 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest',
]


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


def test_readme_is_short_and_keeps_the_quick_start() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    bash = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert bash[0].splitlines() == QUICK_START  # the first bash block, exactly these two commands
    usage = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert 10 <= len(usage.strip().splitlines()) <= 20


def test_readme_links_point_at_files_that_exist() -> None:
    text = README.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path = link.split("#", 1)[0]
        assert (ROOT / path).exists(), link
    assert "docs/images/sine_swag.png" in local


def test_readme_says_how_to_serve_the_docs() -> None:
    assert ".venv/bin/mkdocs serve" in README.read_text()


@pytest.mark.parametrize(
    "must_mention",
    [
        "class_dim",  # classification outputs with more than two dims
        "model(**inputs)",  # a mapping from batch_inputs goes in as keyword arguments
        "model(*inputs)",  # a tuple as positional arguments
        "first snapshot",  # the tracked set is decided then
        "weights only",  # remote and local checkpoints
        "dropout is off",  # BMA runs the model in eval mode
        "StochasticWeightAveraging",  # the comparison table
        "laplace-torch",
    ],
)
def test_readme_mentions(must_mention: str) -> None:
    assert must_mention in README.read_text()
