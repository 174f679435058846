"""MkDocs hook: the stored notebooks in examples/ become the pages tutorials/<name>.ipynb.

The notebooks stay single-source in examples/ (where tests/test_notebooks.py and
examples/execute_notebooks.py expect them): no copy, no symlink. Before mkdocs-jupyter sees the
file list, this hook adds each notebook as a file of the site whose source is read from examples/,
so mkdocs-jupyter renders it (with its stored outputs, ``execute: false``) like a notebook in docs/,
and links such as ``[the sine tutorial](../tutorials/sine.ipynb)`` are checked by ``--strict``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.nav import Navigation

NOTEBOOKS = {
    "tutorials/sine.ipynb": "examples/sine.ipynb",
    "tutorials/mnist.ipynb": "examples/mnist.ipynb",
}


def _source(config: MkDocsConfig, uri: str) -> str:
    path = Path(config.config_file_path).resolve().parent / NOTEBOOKS[uri]
    if not path.is_file():
        raise FileNotFoundError(f"docs/hooks/notebooks.py: {NOTEBOOKS[uri]} is missing")
    return str(path)


@event_priority(100)  # before mkdocs-jupyter's on_files (priority 0), which wraps .ipynb files
def on_files(files: Files, config: MkDocsConfig) -> Files:
    for uri in NOTEBOOKS:
        files.append(File.generated(config, uri, abs_src_path=_source(config, uri)))
    return files


def on_nav(nav: Navigation, config: MkDocsConfig, files: Files) -> Navigation:
    """After every plugin's on_files: mkdocs-jupyter's wrapper recomputes ``abs_src_path`` from
    ``src_dir`` (None for a file outside docs/) instead of asking the wrapped file; give it the path."""
    for uri in NOTEBOOKS:
        files.get_file_from_path(uri).abs_src_path = _source(config, uri)
    return nav
