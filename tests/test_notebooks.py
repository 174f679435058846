"""The example notebooks: committed without outputs, and they run end to end in fast mode.

Execution uses nbclient with a kernel spec written to a temporary ``JUPYTER_PATH`` that points at
*this* interpreter (``sys.executable -m ipykernel_launcher``), so the kernel always sees the
environment the tests run in, whatever kernels are installed elsewhere. Each notebook runs in its own
temporary working directory with ``LIGHTNING_SWAG_NOTEBOOK_FAST=1``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401 - the dev extra installs it; a missing kernel must fail, not skip
import nbclient
import nbformat
import pytest
from synthetic_idx import write_synthetic_idx

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL_NAME = "lightning-swag-tests"


@pytest.fixture
def kernel_name(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec for the current interpreter, found first through ``JUPYTER_PATH``."""
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightning-swag tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter_dir / "runtime"))  # connection files
    return KERNEL_NAME


def test_notebooks_exist() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"sine.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_fast_mode(
    path: Path, kernel_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIGHTNING_SWAG_NOTEBOOK_FAST", "1")
    data_dir = os.environ.get("LIGHTNING_SWAG_DATA")
    if not (data_dir and (Path(data_dir) / "MNIST" / "raw").is_dir()):
        data_dir = str(tmp_path / "synthetic_data")
        write_synthetic_idx(data_dir, "MNIST", num_train=2000, num_test=500, seed=0)
        write_synthetic_idx(data_dir, "FashionMNIST", num_train=10, num_test=500, seed=1)
        monkeypatch.setenv("LIGHTNING_SWAG_SYNTHETIC_DATA", "1")
    monkeypatch.setenv("LIGHTNING_SWAG_DATA", str(Path(data_dir).resolve()))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    elapsed = time.perf_counter() - start
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, "the notebook should draw its figures inline"
    print(f"{path.name}: {elapsed:.1f} s, {len(images)} figures")
