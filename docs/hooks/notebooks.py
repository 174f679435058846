"""MkDocs hook: the stored notebooks in examples/ become the pages tutorials/<name>.ipynb.

The notebooks stay single-source in examples/ (where tests/test_notebooks.py and
examples/execute_notebooks.py expect them): no copy, no symlink. Before mkdocs-jupyter sees the
file list, this hook adds each notebook as a file of the site whose source is read from examples/,
so mkdocs-jupyter renders it (with its stored outputs, ``execute: false``) like a notebook in docs/,
and links such as ``[the sine tutorial](../tutorials/sine.ipynb)`` are checked by ``--strict``.

Two repairs of mkdocs-jupyter's output on those pages: the table of contents is rebuilt from the
rendered headings (mkdocs-jupyter builds it from a Markdown conversion that cuts a heading short at
inline code, so the sidebar linked anchors that do not exist), and the MathJax loader it always
writes is removed (the site's own KaTeX typesets the maths, with no CDN).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.nav import Navigation
from mkdocs.structure.pages import Page
from mkdocs.structure.toc import get_toc

NOTEBOOKS = {
    "tutorials/sine.ipynb": "examples/sine.ipynb",
    "tutorials/mnist.ipynb": "examples/mnist.ipynb",
    "tutorials/lora.ipynb": "examples/lora.ipynb",
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


_HEADING = re.compile(r'<h([1-6])\b[^>]*\bid="([^"]+)"[^>]*>(.*?)</h\1>', re.S)
_MATHJAX = re.compile(r"\s*<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


def _text(inner: str) -> str:
    """A heading's text: its HTML without tags and without the pilcrow of its anchor link."""
    inner = re.sub(r'<a class="anchor-link".*?</a>', "", inner, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", inner)).strip()


def on_page_content(content: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """The notebook page's table of contents, from its rendered headings (ids and full text)."""
    if page.file.src_uri not in NOTEBOOKS:
        return content
    roots: list[dict] = []
    stack: list[dict] = []
    for level, anchor, inner in _HEADING.findall(content):
        token = {"level": int(level), "id": anchor, "name": _text(inner), "children": []}
        while stack and stack[-1]["level"] >= token["level"]:
            stack.pop()
        (stack[-1]["children"] if stack else roots).append(token)
        stack.append(token)
    page.toc = get_toc(roots)
    return _MATHJAX.sub("", content)
