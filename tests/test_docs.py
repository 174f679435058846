"""The documentation site (docs/, mkdocs.yml): its Python runs as written, and it stays complete.

Convention for ```python blocks in docs/**/*.md (see docs/guide/index.md): every block runs as
pasted. The page's blocks, in page order, are one script (one namespace, in a fresh folder), so a
block may use what an earlier block of its page defined, and nothing else:

* a page with ``<!-- test: script -->`` in it (several processes: Lightning's launcher re-runs the
  script) is written to a file and run with ``python`` in a subprocess; the others run in-process;
* a page with ``<!-- test: slow -->`` in it is marked slow.

There is no way to leave a block out.

``mkdocs build --strict`` itself runs in .ci/run.
"""

from __future__ import annotations

import ast
import linecache
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import script_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 2  # the first line of code
        found.append(Block(page, line, textwrap.dedent(match.group(1))))
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
    return "<!-- test: slow -->" in page.read_text() or _is_script(page)


def _is_script(page: Path) -> bool:
    return "<!-- test: script -->" in page.read_text()


def _page_params():
    for page in PAGES:
        if blocks(page):
            marks = [pytest.mark.slow] if _is_slow(page) else []
            yield pytest.param(page, id=str(page.relative_to(DOCS)), marks=marks)


@pytest.mark.parametrize("page", list(_page_params()))
def test_the_page_runs(page: Path, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp(page.stem)
    if not _is_script(page):
        run_page(page, folder)
        return
    script = folder / f"{page.stem}.py"
    script.write_text("\n".join(block.code for block in blocks(page)))
    done = subprocess.run(
        [sys.executable, script.name],
        cwd=folder,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{page}: the script failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def test_no_block_is_left_out() -> None:
    """Every block runs: the markers that used to exempt one are gone for good."""
    for page in PAGES:
        assert not re.search(r"<!--\s*(not-tested|pending)", page.read_text()), page


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


def test_the_guides_tune_scale_example_brackets_its_optimum(tmp_path_factory) -> None:
    """The example's candidates reach past the best scale on both sides, so it shows no edge warning."""
    scores = run_page(DOCS / "guide" / "module.md", tmp_path_factory.mktemp("module"))["scores"]
    best = min(scores, key=scores.__getitem__)
    assert min(scores) < best < max(scores), scores


def test_the_guides_multiswag_loop_keeps_three_posteriors(tmp_path_factory) -> None:
    """One SWAGCallback, a new Trainer per run: three separate posteriors, pooled by SWAGModule."""
    namespace = run_page(DOCS / "guide" / "module.md", tmp_path_factory.mktemp("module"))
    posteriors = namespace["posteriors"]
    assert len({id(p) for p in posteriors}) == 3 and all(p.num_snapshots == 10 for p in posteriors)
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
