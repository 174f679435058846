"""The package's shape: the core never imports the experiment kit, and imports without its dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_swag"

CORE_MODULES = [
    "lightning_swag",
    "lightning_swag.predictive.batches",
    "lightning_swag.predictive.batchnorm",
    "lightning_swag.lightning.callback",
    "lightning_swag.lightning.callback_state",
    "lightning_swag.posterior.format",
    "lightning_swag.lightning.checkpoint_io",
    "lightning_swag.lightning.cli",
    "lightning_swag.lightning.evaluation",
    "lightning_swag.lightning.execution",
    "lightning_swag.posterior.format",
    "lightning_swag.lightning.held_out",
    "lightning_swag.lightning.lockstep",
    "lightning_swag.metrics",
    "lightning_swag.lightning.module",
    "lightning_swag.lightning.module_checkpoints",
    "lightning_swag.posterior.noise",
    "lightning_swag.predictive.options",
    "lightning_swag.posterior.parameters",
    "lightning_swag.posterior.swag",
    "lightning_swag.predictive.runner",
    "lightning_swag.posterior.sampling",
    "lightning_swag.posterior.sharding",
    "lightning_swag.predictive.subset",
    "lightning_swag.posterior.statistics",
    "lightning_swag.posterior.storage",
    "lightning_swag.likelihoods.summaries",
    "lightning_swag.lightning.swa_lr",
    "lightning_swag.predictive.tuning",
    "lightning_swag.checks",
    "lightning_swag.predictive.vectorize",
    "lightning_swag.predictive.weights",
    "lightning_swag.lightning.writer",
]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute names, as written)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names


def test_the_core_does_not_import_the_experiment_kit_nor_its_dependencies() -> None:
    """No core module imports lightning_swag.experiments, torchvision or matplotlib, and importing all
    of them in a fresh interpreter does not load the kit. (torchvision itself may still be loaded by
    Lightning or torchmetrics when it is installed; they do not need it.)"""
    for path in sorted(PACKAGE.glob("*.py")):
        forbidden = {n for n in _imports(path) if n.split(".")[0] in ("torchvision", "matplotlib")}
        forbidden |= {n for n in _imports(path) if n.startswith("lightning_swag.experiments")}
        assert not forbidden, (path.name, forbidden)
    result = _run(
        f"""
        import importlib
        import sys
        for name in {CORE_MODULES!r}:
            importlib.import_module(name)
        print("LOADED", sorted(m for m in sys.modules if m.startswith("lightning_swag.experiments")))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout
    core_files = {m.removeprefix("lightning_swag.") for m in CORE_MODULES[1:]} | {"__init__"}
    assert {p.stem for p in PACKAGE.glob("*.py")} == core_files  # a new core module must be listed above


def test_the_public_api_is_explicit() -> None:
    import lightning_swag

    for name in lightning_swag.__all__:
        assert getattr(lightning_swag, name) is not None, name
    from lightning_swag import metrics, summaries  # modules of the public API, imported on purpose

    assert callable(metrics.nll) and callable(summaries.summarize_classification)


def test_the_posterior_is_plain_torch() -> None:
    """posterior.py, and the checkpoint-format module it uses, import torch and the standard library only."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "lightning_swag"
    for name in ("posterior.py", "checkpoint.py"):
        tree = ast.parse((package / name).read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        third_party = imported - set(sys.stdlib_module_names) - {"__future__", "lightning_swag"}
        assert third_party == {"torch"}, (name, third_party)
        internal = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        } & {
            "lightning_swag.lightning.callback",
            "lightning_swag.lightning.module",
            "lightning_swag.lightning.cli",
        }
        assert not internal, (name, internal)


def _readme_dependencies() -> dict[str, set[str]]:
    """``{module: modules it imports}`` as the design diagram of the docs (docs/design.md, formerly
    the README's) states them: the names after ``<-`` on a module's line, and on the lines that
    continue that list."""
    import re

    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    block = design.split("```text\nlightning_swag/\n", 1)[1].split("```", 1)[0]
    deps: dict[str, set[str]] = {}
    current, continuing = None, False
    for line in block.splitlines():
        entry = re.match(r"^  (\S+)", line)
        if entry:
            current = entry.group(1)[:-3] if entry.group(1).endswith(".py") else None
            if current:
                deps[current] = set()
        if current and "<-" in line:
            listed = line.split("<-", 1)[1]
            continuing = listed.rstrip().endswith(",")
        elif current and continuing and re.fullmatch(r"\s+[a-z_]+(, [a-z_]+)*,?", line):
            listed = line
            continuing = line.rstrip().endswith(",")
        else:
            continue
        deps[current] |= {part.strip() for part in listed.split(",") if part.strip()}
    return deps


def test_the_readme_diagram_matches_the_imports() -> None:
    stated = _readme_dependencies()
    assert set(stated) == {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    for module, listed in stated.items():
        actual = {
            name.removeprefix("lightning_swag.")
            for name in _imports(PACKAGE / f"{module}.py")
            if name.startswith("lightning_swag.")
        }
        assert actual == listed, (module, actual, listed)
