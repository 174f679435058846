"""The documentation site (docs/, mkdocs.yml): its Python runs as written, and it stays complete.

Convention for ```python blocks in docs/**/*.md (see docs/guide/index.md):

* every block runs, in page order, as one script per page (one namespace, in a fresh folder);
* a block right after ``<!-- not-tested: why -->`` is only compiled (it needs several processes, or
  names a test below that runs it with what it needs);
* a block right after ``<!-- pending: what -->`` documents an API being built: it runs after the
  page's other blocks, in a copy of their namespace, as a strict xfail. When the API lands the
  test XPASSes and fails, which says to remove the marker;
* a page with ``<!-- test: slow -->`` in it is marked slow.

``mkdocs build --strict`` itself runs in .ci/run.
"""

from __future__ import annotations

import ast
import linecache
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*(not-tested|pending)\b[^>]*-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    kind: str  # "run", "not-tested" or "pending"

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        line = text.count("\n", 0, match.start()) + 2  # the first line of code
        found.append(Block(page, line, textwrap.dedent(match.group(1)), marker.group(1) if marker else "run"))
    return found


def _exec(block: Block, namespace: dict) -> None:
    """Run a block so that a traceback shows the page's own line numbers and source."""
    filename = str(block.page)
    source = block.page.read_text()
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    code = "\n" * (block.line - 1) + block.code  # line numbers of the page
    exec(compile(code, filename, "exec"), namespace)  # noqa: S102 - our own documentation


_PAGE_RUNS: dict[Path, dict | BaseException] = {}


def run_page(page: Path, folder: Path) -> dict:
    """Run the page's runnable blocks once per session, in ``folder``; the namespace they leave."""
    if page not in _PAGE_RUNS:
        namespace: dict = {"__name__": f"docs_{page.stem}"}
        cwd = os.getcwd()
        os.chdir(folder)  # lightning_logs/, checkpoints and files the snippets write go here
        try:
            for block in blocks(page):
                if block.kind == "run":
                    _exec(block, namespace)
            _PAGE_RUNS[page] = namespace
        except BaseException as err:  # noqa: BLE001 - re-raised by every test of the page
            _PAGE_RUNS[page] = err
        finally:
            os.chdir(cwd)
    result = _PAGE_RUNS[page]
    if isinstance(result, BaseException):
        raise result
    return result


def _is_slow(page: Path) -> bool:
    return "<!-- test: slow -->" in page.read_text()


def _page_params():
    for page in PAGES:
        if any(b.kind == "run" for b in blocks(page)):
            marks = [pytest.mark.slow] if _is_slow(page) else []
            yield pytest.param(page, id=str(page.relative_to(DOCS)), marks=marks)


def _pending_params():
    for page in PAGES:
        for block in blocks(page):
            if block.kind == "pending":
                marks = [pytest.mark.xfail(strict=True, reason="pending API: remove the marker once it runs")]
                if _is_slow(page):
                    marks.append(pytest.mark.slow)
                yield pytest.param(block, id=block.where, marks=marks)


@pytest.mark.parametrize("page", list(_page_params()))
def test_the_page_runs(page: Path, tmp_path_factory) -> None:
    run_page(page, tmp_path_factory.mktemp(page.stem))


@pytest.mark.parametrize("block", list(_pending_params()))
def test_a_pending_block_runs(block: Block, tmp_path_factory, monkeypatch) -> None:
    try:
        namespace = dict(run_page(block.page, tmp_path_factory.mktemp(block.page.stem)))
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"the page's own blocks fail: {err!r}")
    monkeypatch.chdir(tmp_path_factory.mktemp("pending"))
    _exec(block, namespace)


def test_every_python_block_compiles() -> None:
    all_blocks = [b for page in PAGES for b in blocks(page)]
    assert len(all_blocks) > 20
    for block in all_blocks:
        compile(block.code, block.where, "exec")


def test_no_python_block_is_indented_where_the_runner_cannot_see_it() -> None:
    for page in PAGES:
        indented = re.findall(r"^[ \t]+```python", page.read_text(), flags=re.M)
        assert not indented, f"{page}: indented python fences are not run by tests/test_docs.py"


def _block_containing(page: str, text: str) -> str:
    matches = [b for b in blocks(DOCS / page) if text in b.code]
    assert len(matches) == 1, f"expected one python block with {text!r} in docs/{page}"
    return matches[0].code


@pytest.mark.slow
def test_multiswag_loop_runs(tmp_path, monkeypatch) -> None:
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
    code = _block_containing("guide/module.md", "posteriors.append")
    exec(compile(code, "docs/guide/module.md", "exec"), namespace)  # noqa: S102
    posteriors = namespace["posteriors"]
    assert len({id(p) for p in posteriors}) == 3
    assert all(p.num_snapshots == 10 for p in posteriors)
    assert namespace["bma"].total_samples == 30


def test_the_batch_layout_example_is_a_working_override() -> None:
    import torch

    from lightning_swag import SWAGModule

    namespace = {"SWAGModule": SWAGModule}
    code = _block_containing("guide/tasks.md", "def batch_targets")
    exec(compile(code, "docs/guide/tasks.md", "exec"), namespace)  # noqa: S102
    batch = {"image": torch.zeros(2, 3), "label": torch.ones(2)}
    cls = namespace["DictSWAG"]
    assert (
        cls.batch_inputs(None, batch) is batch["image"] and cls.batch_targets(None, batch) is batch["label"]
    )


# ---------------------------------------------------------------------------- completeness


def _public_names() -> list[str]:
    """``lightning_swag.__all__``, read without importing the package."""
    tree = ast.parse((ROOT / "lightning_swag" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("lightning_swag/__init__.py has no __all__")


def test_the_api_reference_documents_every_public_name() -> None:
    documented = set(
        re.findall(r"^::: (\S+)", "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md")), re.M)
    )
    wanted = {f"lightning_swag.{name}" for name in _public_names()}
    wanted |= {
        f"lightning_swag.{module}"
        for module in ("metrics", "likelihoods.summaries", "posterior.format", "lightning.cli")
    }
    assert wanted <= documented, sorted(wanted - documented)


def _nav_entries() -> set[str]:
    import yaml

    def walk(item) -> list[str]:
        if isinstance(item, str):
            return [item]
        if isinstance(item, dict):
            return [page for value in item.values() for page in walk(value)]
        return [page for value in item for page in walk(value)]

    return set(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


def test_every_page_is_in_the_nav_except_the_logs() -> None:
    nav = _nav_entries()
    for page in PAGES:
        name = str(page.relative_to(DOCS))
        if re.fullmatch(r"results/mnist_(h100|seeds)_.*\.md", name):
            continue  # the seed-study logs, linked from results/mnist.md (not_in_nav)
        assert name in nav, f"docs/{name} is not in mkdocs.yml's nav"
    for entry in nav:
        assert (DOCS / entry).is_file() or entry.startswith("tutorials/") and entry.endswith(".ipynb"), entry


def test_the_notebooks_and_the_changelog_are_single_source() -> None:
    hook = (DOCS / "hooks" / "notebooks.py").read_text()
    for name in ("sine", "mnist"):
        assert f'"tutorials/{name}.ipynb": "examples/{name}.ipynb"' in hook
        assert (ROOT / "examples" / f"{name}.ipynb").is_file()
        assert not (DOCS / "tutorials" / f"{name}.ipynb").exists(), "a copy would drift from examples/"
        assert f"tutorials/{name}.ipynb" in _nav_entries()
    assert (DOCS / "changelog.md").read_text().strip() == '--8<-- "CHANGELOG.md"'


def test_every_results_page_says_how_to_reproduce_it_and_where_it_ran() -> None:
    pages = [
        p for p in (DOCS / "results").glob("*.md") if not p.name.startswith("mnist_") and p.name != "index.md"
    ]
    assert {p.stem for p in pages} >= {"sine", "mnist", "regression", "peers", "memory", "subset"}
    for page in pages:
        head = page.read_text()[:1200]
        assert '!!! info "Reproduce"' in head and "**Command" in head and "**Machine" in head, page.name


def test_the_design_page_keeps_the_layout_diagram() -> None:
    design = (DOCS / "design.md").read_text()
    assert design.count("```text\nlightning_swag/\n") == 1  # parsed by tests/test_layout.py


def test_getting_started_has_the_readme_quick_start_commands() -> None:
    def commands(text: str) -> list[str]:
        return [
            line
            for line in text.splitlines()
            if line.startswith("python3.11 -m venv .venv && ") and "/python " in line
        ]

    readme = commands((ROOT / "README.md").read_text())
    assert len(readme) == 2 and commands((DOCS / "getting-started.md").read_text()) == readme


def test_the_site_builds_offline() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^\s*font: false", config, re.M), "theme.font must be false: no Google fonts"
    for plugin in ("privacy", "social", "git-revision-date", "git-committers", "rss"):
        assert f"- {plugin}" not in config, f"{plugin} needs the network or git"
