// Typesets the site's maths with the KaTeX shipped in docs/javascripts/katex/ (no network needed):
// \( \) and \[ \] everywhere (pymdownx.arithmatex's output on Markdown pages), and also $ $ and
// $$ $$ inside the notebooks (mkdocs-jupyter keeps their Markdown cells' TeX as text).
document$.subscribe(() => {
  const tex = [
    { left: "\\[", right: "\\]", display: true },
    { left: "\\(", right: "\\)", display: false },
  ];
  const dollars = [
    { left: "$$", right: "$$", display: true },
    { left: "$", right: "$", display: false },
  ];
  const options = (delimiters) => ({ delimiters, throwOnError: false });
  document.querySelectorAll(".arithmatex").forEach((el) => renderMathInElement(el, options(tex)));
  document.querySelectorAll(".jupyter-wrapper").forEach((el) => renderMathInElement(el, options(dollars.concat(tex))));
});
