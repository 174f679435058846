"""Execute the example notebooks and store them with their outputs, so GitHub shows the figures.

    python examples/execute_notebooks.py                   # every notebook, normal mode, in place
    python examples/execute_notebooks.py mnist             # only examples/mnist.ipynb
    python examples/execute_notebooks.py --fast --output-dir /tmp/nb   # quick check, examples/ untouched

The MNIST notebook reads the data from ``--data-dir`` (default: ``$LIGHTNING_SWAG_DATA``), a folder in
torchvision's layout (``MNIST/raw``, ``FashionMNIST/raw``).

Each notebook runs top to bottom in a fresh kernel of *this* interpreter (a kernel spec written to a
temporary ``JUPYTER_PATH`` runs ``sys.executable -m ipykernel_launcher``), in a temporary working
directory, with ``LIGHTNING_SWAG_NOTEBOOK_FAST`` set from ``--fast``. So that a test can prove the
stored outputs came from the stored source, every code cell gets the sha256 of its source in
``cell.metadata["lightning_swag"]["source_sha256"]`` (its execution counts run 1..n in order), and the
notebook's ``metadata["lightning_swag"]`` records the mode, the machine and the date. A notebook is only
written if no cell raised and no cell wrote to stderr (warnings belong out of a notebook people read).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nbclient
import nbformat

from lightning_swag.experiments.machine import machine_description

EXAMPLES = Path(__file__).resolve().parent
METADATA_KEY = "lightning_swag"
KERNEL_NAME = "lightning-swag-notebooks"
# What a reader's Jupyter opens the stored notebook with (not the temporary spec used to execute it).
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def source_sha256(source: str) -> str:
    """The hash that ties a code cell's stored outputs to its source."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def notebook_paths(names: list[str]) -> list[Path]:
    """``examples/<name>.ipynb`` for each name (``sine``, ``sine.ipynb``); every notebook if none."""
    available = sorted(EXAMPLES.glob("*.ipynb"))
    if not names:
        return available
    paths = []
    for name in names:
        path = EXAMPLES / (Path(name).stem + ".ipynb")
        if path not in available:
            known = ", ".join(p.stem for p in available)
            raise SystemExit(f"No notebook {name!r} in {EXAMPLES}; choose from: {known}.")
        paths.append(path)
    return paths


def write_kernel_spec(jupyter_dir: Path) -> None:
    """A kernel spec for the current interpreter under ``jupyter_dir/kernels``."""
    spec_dir = jupyter_dir / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lightning-swag notebooks",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def stderr_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """``"cell <i>: <text>"`` for every stderr stream output (warnings, logging)."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                found.append(f"cell {index}: {output.get('text', '').strip()[:500]}")
    return found


def execute(path: Path, fast: bool, timeout: int) -> tuple[nbformat.NotebookNode, float]:
    """Run ``path`` top to bottom in a fresh kernel; the notebook with outputs and provenance, and seconds.

    No timing is stored in the notebook, so re-executing unchanged code on the same machine and day
    rewrites the same bytes.
    """
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata.pop("execution", None)
            cell.metadata[METADATA_KEY] = {"source_sha256": source_sha256(cell.source)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{path.stem}-") as workdir:
        client = nbclient.NotebookClient(
            nb,
            kernel_name=KERNEL_NAME,
            timeout=timeout,
            record_timing=False,  # no per-cell timestamps: they would change every run
            resources={"metadata": {"path": workdir}},
        )
        client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    duration = time.perf_counter() - start
    warnings = stderr_outputs(nb)
    if warnings:
        raise SystemExit(
            f"{path.name}: cells wrote to stderr, so the notebook was not saved. Silence or fix these "
            "in the notebook's source, then run this script again:\n" + "\n".join(warnings)
        )
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata[METADATA_KEY] = {
        "executed": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "fast": fast,
        "synthetic_data": os.environ.get("LIGHTNING_SWAG_SYNTHETIC_DATA", "0") == "1",
    }
    nbformat.validate(nb)
    return nb, duration


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (sine, mnist); default: all")
    parser.add_argument("--fast", action="store_true", help="LIGHTNING_SWAG_NOTEBOOK_FAST=1: a quick check")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("LIGHTNING_SWAG_DATA"),
        help="MNIST in torchvision's layout (default: $LIGHTNING_SWAG_DATA)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="write the executed notebooks here, not in place"
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    paths = notebook_paths(args.names)
    synthetic = os.environ.get("LIGHTNING_SWAG_SYNTHETIC_DATA", "0") == "1"
    if args.output_dir is None and (args.fast or synthetic):
        raise SystemExit(
            "examples/ keeps notebooks from a full run on the real data: with --fast (or synthetic data) "
            "pass --output-dir DIR to write the executed copies elsewhere."
        )
    if args.data_dir is None or not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        if any(p.stem == "mnist" for p in paths):
            raise SystemExit(
                f"No MNIST/raw folder under --data-dir {args.data_dir!r}: pass --data-dir (or set "
                "LIGHTNING_SWAG_DATA) to a folder in torchvision's layout, e.g. --data-dir ../shared/data."
            )
    else:
        os.environ["LIGHTNING_SWAG_DATA"] = str(Path(args.data_dir).resolve())
    os.environ["LIGHTNING_SWAG_NOTEBOOK_FAST"] = "1" if args.fast else "0"
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jupyter-") as jupyter_dir:
        write_kernel_spec(Path(jupyter_dir))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            filter(None, [jupyter_dir, os.environ.get("JUPYTER_PATH")])
        )
        os.environ["JUPYTER_RUNTIME_DIR"] = str(Path(jupyter_dir) / "runtime")  # connection files
        for path in paths:
            nb, duration = execute(path, fast=args.fast, timeout=args.timeout)
            target = path if args.output_dir is None else args.output_dir / path.name
            nbformat.write(nb, target)
            images = sum(
                "image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", [])
            )
            size_kb = target.stat().st_size / 1024
            print(f"{target}: {duration:.0f} s, {images} figures, {size_kb:.0f} KiB")


if __name__ == "__main__":
    main()
