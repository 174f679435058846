"""The built documentation site, read as a browser would: nothing loaded from the network (the maths
is typeset by the KaTeX shipped with it), and no link to an anchor that does not exist (including the
tutorials' sidebars, which mkdocs-jupyter builds itself)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
KATEX = "javascripts/katex/katex.min.js"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def pages(site: Path) -> list[Path]:
    found = sorted(site.rglob("*.html"))
    assert len(found) > 30
    return found


def ids(page: Path, cache: dict[Path, set[str]] = {}) -> set[str]:  # noqa: B006 - a per-run cache
    if page not in cache:
        cache[page] = set(re.findall(r'\b(?:id|name)="([^"]+)"', page.read_text(encoding="utf-8")))
    return cache[page]


def target(site: Path, page: Path, href: str) -> tuple[Path, str] | None:
    """The file and anchor a link of ``page`` points to, or None for links off the site."""
    url = urlparse(href)
    if url.scheme or url.netloc or not url.fragment:
        return None
    base = "file://" + str(page)
    path = Path(unquote(urlparse(urljoin(base, url.path)).path)) if url.path else page
    if path.is_dir() or not path.suffix:
        path = path / "index.html"
    return path, unquote(url.fragment)


@pytest.mark.slow
def test_nothing_is_loaded_from_the_network(site: Path) -> None:
    loaded = re.compile(r'<(?:script|img|iframe|source)\b[^>]*\bsrc="([^"]*)"|<link\b[^>]*\bhref="([^"]*)"')
    for page in pages(site):
        for src, href in loaded.findall(page.read_text(encoding="utf-8")):
            url = src or href
            assert url, f"{page.relative_to(site)}: an element with an empty src"
            assert not urlparse(url).scheme.startswith("http") and not url.startswith("//"), (
                f"{page.relative_to(site)} loads {url}"
            )


@pytest.mark.slow
def test_every_page_with_maths_loads_the_shipped_katex(site: Path) -> None:
    assert (site / KATEX).is_file()
    css = (site / "javascripts/katex/katex.min.css").read_text()
    fonts = re.findall(r"url\(([^)]+)\)", css)
    assert fonts and all((site / "javascripts/katex" / f).is_file() for f in fonts)
    with_maths = [
        page
        for page in pages(site)
        if 'class="arithmatex"' in (text := page.read_text(encoding="utf-8")) or "jupyter-wrapper" in text
    ]
    names = {p.relative_to(site).as_posix() for p in with_maths}
    assert {"guide/subset/index.html", "tutorials/sine/index.html", "tutorials/mnist/index.html"} <= names
    for page in with_maths:
        scripts = re.findall(r'<script\b[^>]*\bsrc="([^"]+)"', page.read_text(encoding="utf-8"))
        local = [Path(unquote(urlparse(urljoin("file://" + str(page), s)).path)) for s in scripts]
        assert site / KATEX in local and site / "javascripts/katex-init.js" in local, page
        assert "mathjax" not in page.read_text(encoding="utf-8").lower(), page


@pytest.mark.slow
def test_no_link_points_to_a_missing_anchor(site: Path) -> None:
    broken = []
    for page in pages(site):
        for href in re.findall(r'<a\b[^>]*\bhref="([^"]+)"', page.read_text(encoding="utf-8")):
            found = target(site, page, href)
            if found is None:
                continue
            path, anchor = found
            if not path.is_file() or anchor not in ids(path):
                broken.append(f"{page.relative_to(site)} -> {href}")
    assert not broken, "\n".join(sorted(set(broken))[:40])
