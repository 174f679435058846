"""The README's Python usage example runs as written."""

from __future__ import annotations

import re
import textwrap
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


def _block_containing(text: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if text in b]
    assert len(matches) == 1, f"expected one README python block with {text!r}"
    return textwrap.dedent(matches[0])


@pytest.mark.slow
def test_readme_multiswag_loop_runs(tmp_path, monkeypatch) -> None:
    """One SWAGCallback, one new Trainer per run: three separate posteriors, pooled by SWAGModule."""
    import lightning as L

    from lightning_swag import SWAGCallback, SWAGModule
    from lightning_swag.experiments.data import SineDataModule
    from lightning_swag.experiments.models import SineRegressor

    monkeypatch.chdir(tmp_path)
    namespace = {
        "L": L,
        "SWAGCallback": SWAGCallback,
        "SWAGModule": SWAGModule,
        "Model": SineRegressor,
        "dm": SineDataModule(num_points=64),
    }
    exec(compile(_block_containing("posteriors.append"), "README.md", "exec"), namespace)  # noqa: S102
    posteriors = namespace["posteriors"]
    assert len({id(p) for p in posteriors}) == 3
    assert all(p.num_snapshots == 10 for p in posteriors)
    assert namespace["bma"].total_samples == 30


def test_readme_batch_layout_example_is_a_working_override() -> None:
    import torch

    from lightning_swag import SWAGModule

    namespace = {"SWAGModule": SWAGModule}
    exec(compile(_block_containing("def batch_targets"), "README.md", "exec"), namespace)  # noqa: S102
    batch = {"image": torch.zeros(2, 3), "label": torch.ones(2)}
    cls = namespace["DictSWAG"]
    assert (
        cls.batch_inputs(None, batch) is batch["image"] and cls.batch_targets(None, batch) is batch["label"]
    )
