"""The package's shape: subpackages named for what they own, no mixins, the core apart from the
experiment kit, the design page's diagram equal to the real imports, and a test file per module."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_swag"
SUBPACKAGES = ("posterior", "predictive", "likelihoods", "lightning")


def _core_files() -> list[Path]:
    """Every module of the core (the experiment kit left out), ``__init__.py`` files included."""
    return sorted(p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute names, as written)."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_the_package_is_shaped_like_its_architecture() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted((*SUBPACKAGES, "experiments")), folders


def test_the_core_does_not_import_the_experiment_kit_nor_its_dependencies() -> None:
    """No core module imports lightning_swag.experiments, torchvision or matplotlib, and importing all
    of them in a fresh interpreter does not load the kit. (torchvision itself may still be loaded by
    Lightning or torchmetrics when it is installed; they do not need it.)"""
    names = [_module_name(p) for p in _core_files()]
    for path in _core_files():
        forbidden = {n for n in _imports(path) if n.split(".")[0] in ("torchvision", "matplotlib")}
        forbidden |= {n for n in _imports(path) if n.startswith("lightning_swag.experiments")}
        assert not forbidden, (path.name, forbidden)
    result = _run(
        f"""
        import importlib
        import sys
        for name in {names!r}:
            importlib.import_module(name)
        print("LOADED", sorted(m for m in sys.modules if m.startswith("lightning_swag.experiments")))
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED []" in result.stdout, result.stdout


def test_the_public_api_is_explicit() -> None:
    import lightning_swag

    for name in lightning_swag.__all__:
        assert getattr(lightning_swag, name) is not None, name
    from lightning_swag import metrics  # a module of the public API, imported on purpose
    from lightning_swag.likelihoods import summaries

    assert callable(metrics.nll) and callable(summaries.summarize_classification)


def test_the_posterior_and_the_predictives_are_plain_torch() -> None:
    """posterior/, predictive/ and likelihoods/ import torch (and torchmetrics for the likelihoods'
    test metrics) and the standard library only: never Lightning, never the Lightning glue."""
    allowed = {"torch", "torchmetrics", "typing_extensions", "numpy"}
    for folder in ("posterior", "predictive", "likelihoods"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            imported = {name.split(".")[0] for name in _imports(path)}
            third_party = imported - set(sys.stdlib_module_names) - {"__future__", "lightning_swag"}
            assert third_party <= allowed, (path, third_party)
            internal = {n for n in _imports(path) if n.startswith("lightning_swag.lightning")}
            assert not internal, (path, internal)
        if folder == "posterior":
            for path in sorted((PACKAGE / folder).glob("*.py")):
                inside = {n for n in _imports(path) if n.startswith("lightning_swag.")}
                assert all(
                    n.startswith("lightning_swag.posterior") or n == "lightning_swag.checks" for n in inside
                ), (
                    path,
                    inside,
                )


def test_no_class_of_the_package_is_a_mixin() -> None:
    """A class of the package inherits a class of the package only when that base is abstract (an
    ABC with abstract methods) or a ``Protocol``: responsibilities are collaborators, not mixins."""
    concrete_bases = []
    for path in _core_files():
        module = importlib.import_module(_module_name(path))
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            for base in cls.__bases__:
                if not base.__module__.startswith("lightning_swag"):
                    continue
                if not (inspect.isabstract(base) or getattr(base, "_is_protocol", False)):
                    concrete_bases.append(f"{cls.__module__}.{cls.__name__} <- {base.__name__}")
    assert not concrete_bases, concrete_bases


def test_every_core_module_has_a_test_file_of_its_own() -> None:
    """``lightning_swag/<folder>/<module>.py`` is tested by ``tests/<folder>/test_<module>.py`` (a
    top-level module by ``tests/test_<module>.py``), for at least 90% of the core modules."""
    modules = [p for p in _core_files() if p.name != "__init__.py"]
    missing = []
    for path in modules:
        folder = path.parent.relative_to(PACKAGE)
        if not (ROOT / "tests" / folder / f"test_{path.stem}.py").is_file():
            missing.append(str(path.relative_to(PACKAGE)))
    assert len(missing) <= 0.1 * len(modules), missing


def _design_dependencies() -> dict[str, set[str]]:
    """``{module: modules it imports}`` as the design page's diagram states them: the names after
    ``<-`` on a module's line, and on the lines that continue that list. Modules are written as
    paths inside the package (``posterior/swag.py``), dependencies as dotted names without the
    package (``posterior.statistics``)."""
    design = (ROOT / "docs" / "design.md").read_text()
    block = design.split("```text\nlightning_swag/\n", 1)[1].split("```", 1)[0]
    deps: dict[str, set[str]] = {}
    current, continuing = None, False
    for line in block.splitlines():
        entry = re.match(r"^  (\S+)", line)
        if entry:  # a module (a folder's line or __init__.py, the public API, lists none)
            name = entry.group(1)
            current = name[:-3].replace("/", ".") if name.endswith(".py") and name != "__init__.py" else None
            if current is None:
                continuing = False
                continue
            deps[current] = set()
        if current and "<-" in line:
            listed = line.split("<-", 1)[1]
            continuing = listed.rstrip().endswith(",")
        elif current and continuing and re.fullmatch(r"\s+[a-z_.]+(, [a-z_.]+)*,?", line):
            listed = line
            continuing = line.rstrip().endswith(",")
        else:
            continue
        deps[current] |= {part.strip() for part in listed.split(",") if part.strip()}
    return deps


def test_the_design_diagram_matches_the_imports() -> None:
    stated = _design_dependencies()
    modules = {
        _module_name(p).removeprefix("lightning_swag.") for p in _core_files() if p.name != "__init__.py"
    }
    assert set(stated) == modules, (sorted(modules - set(stated)), sorted(set(stated) - modules))
    for module, listed in stated.items():
        path = PACKAGE / (module.replace(".", "/") + ".py")
        actual = {
            name.removeprefix("lightning_swag.")
            for name in _imports(path)
            if name.startswith("lightning_swag.")
        }
        assert actual == listed, (module, actual, listed)
