"""The course book (``bash bin/book`` = tools/build_book.py): every chapter and figure in it, nothing loaded from elsewhere.

The book is built once for this module, in quick mode, into a temporary
folder. When the browser test (tests/test_browser.py, which runs earlier in
the same session, on the same worker) has left every chapter's student edition executed by JupyterLab in
``.screenshots/browser/executed/``, the book is built from those (``--executed``) instead of running each chapter
a second time; otherwise the build executes the chapters itself. A student edition differs from its chapter only
in the sources of the solution cells, so each executed copy gets the chapter's own sources back first: the
instructor book built here shows every solution (folded) above the output the learner's placeholder gave, which is
all these tests look at (pages, figures, folds, links, nothing loaded from elsewhere); that each solution runs is
nbval's check, at full size. Likewise the student book takes chapter 00's student edition as the browser test (or
tests/test_notebooks.py) executed it (``.screenshots/student/executed/``), when
that copy carries the stamp the build would give it (same notebook, library sources, quick mode, edition).
Skipped, with a one-line reason, when the book's tools (requirements-dev.txt)
are missing; deselect with ``-m 'not book'``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, chapter_notebooks

pytestmark = pytest.mark.book

EXECUTED_BY_BROWSER = REPO / ".screenshots" / "browser" / "executed"
EXECUTED_STUDENT_EDITIONS = REPO / ".screenshots" / "student" / "executed"  # by tests/test_browser.py
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, //cdn..., any scheme with //
CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])([^'")\s]+)""", re.I)


def _why_no_book_tools() -> str | None:
    missing = [m for m in ("sphinx", "myst_nb", "sphinx_book_theme") if importlib.util.find_spec(m) is None]
    return f"book test skipped: {', '.join(missing)} not installed (pip install -r requirements-dev.txt)" if missing else None


def executed_by_browser_is_current(path: Path) -> bool:
    """Did the browser test leave this chapter executed, from its current source?"""
    executed = EXECUTED_BY_BROWSER / path.name
    if not executed.is_file():
        return False
    source = nbformat.read(executed, as_version=4).metadata.get("course_source_sha256")
    return source == hashlib.sha256(path.read_bytes()).hexdigest()


def with_chapter_sources(path: Path, executed: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """An executed edition of the chapter ``path`` with the chapter's own cell sources (its solutions) put back."""
    chapter = nbformat.read(path, as_version=4)
    assert [c.cell_type for c in chapter.cells] == [c.cell_type for c in executed.cells], (
        f"{path.name}: the executed copy's cells do not match the chapter's")
    for mine, theirs in zip(executed.cells, chapter.cells):
        mine.source = theirs.source
    return executed


@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    reason = _why_no_book_tools()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("book")
    command = [sys.executable, str(REPO / "tools" / "build_book.py"), "--quick", "--out", str(out)]
    if all(executed_by_browser_is_current(path) for path in chapter_notebooks()):
        instructor = tmp_path_factory.mktemp("executed")
        for path in chapter_notebooks():
            nbformat.write(with_chapter_sources(path, nbformat.read(EXECUTED_BY_BROWSER / path.name, as_version=4)),
                           instructor / path.name)
        command += ["--executed", str(instructor)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, f"the book did not build:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


class Loads(HTMLParser):
    """Every script, stylesheet, font, image or frame a page loads, and the page's figures."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.figures = 0
        self.links: list[str] = []
        self._in_style = False
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "embed") and a.get("src"):
            self.loads.append(a["src"])
        if tag == "link" and a.get("href") and set((a.get("rel") or "").split()) & {"stylesheet", "preload", "modulepreload", "icon", "prefetch"}:
            self.loads.append(a["href"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "div" and "plotly-graph-div" in (a.get("class") or ""):
            self.figures += 1
        self._in_style = tag == "style"
        if a.get("style"):
            self.styles.append(a["style"])

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)


def parse(path: Path) -> Loads:
    page = Loads()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def figures_in(notebook: nbformat.NotebookNode) -> int:
    """Plotly figures among a notebook's outputs (an explorer's static figure included)."""
    return sum(
        "application/vnd.plotly.v1+json" in output.get("data", {})
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


def test_every_chapter_has_a_page_with_all_its_figures(book) -> None:
    html = book / "html"
    index = parse(html / "index.html")
    for path in chapter_notebooks():
        page_path = html / "notebooks" / f"{path.stem}.html"
        assert page_path.is_file(), f"{path.name}: no page in the book"
        assert any(link.endswith(f"notebooks/{path.stem}.html") for link in index.links), f"{path.name}: not in the contents"
        executed = nbformat.read(book / "src" / "notebooks" / path.name, as_version=4)
        expected = figures_in(executed)
        page = parse(page_path)
        assert expected >= 1, f"{path.name}: the executed chapter has no plotly figure"
        assert page.figures == expected, f"{path.name}: {expected} figures in the executed chapter, {page.figures} in its page"
        text = page_path.read_text(encoding="utf-8")
        assert text.count('class="static-caption"') >= 1, f"{path.name}: no explorer's static figure in the page"
        assert "Traceback (most recent call last)" not in text, f"{path.name}: an error output in the page"
    assert (html / "_static" / "plotly.min.js").is_file() and (html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_no_page_loads_a_script_stylesheet_or_font_from_elsewhere(book) -> None:
    html = book / "html"
    found = []
    for page_path in sorted(html.rglob("*.html")):
        page = parse(page_path)
        found += [f"{page_path.relative_to(html)}: {url}" for url in page.loads if EXTERNAL.match(url)]
        found += [
            f"{page_path.relative_to(html)}: {url} (inline style)"
            for style in page.styles for url in CSS_URL.findall(style) if EXTERNAL.match(url)
        ]
    for css in sorted(html.rglob("*.css")):
        found += [f"{css.relative_to(html)}: {url}" for url in CSS_URL.findall(css.read_text(encoding="utf-8", errors="replace")) if EXTERNAL.match(url)]
    assert found == [], "the book loads from elsewhere:\n" + "\n".join(found[:30])


def test_each_chapter_links_to_colab_binder_and_the_repository_of_course_toml(book) -> None:
    settings = dict(re.findall(r'^(\w+)\s*=\s*"([^"]*)"', (REPO / "course.toml").read_text(), re.M))
    repository = settings["repository"].removeprefix("https://github.com/")
    for path in chapter_notebooks():
        links = parse(book / "html" / "notebooks" / f"{path.stem}.html").links
        colab = f"https://colab.research.google.com/github/{repository}/blob/{settings['branch']}/notebooks/{path.name}"
        assert colab in links, f"{path.name}: no Colab launch link {colab}"
        assert any(link.startswith(f"https://mybinder.org/v2/gh/{repository}/") for link in links), f"{path.name}: no Binder link"


def test_the_figures_are_interactive_without_the_network(book) -> None:
    page = (book / "html" / "notebooks" / f"{chapter_notebooks()[0].stem}.html").read_text(encoding="utf-8")
    assert '<script type="module">' in page and "Plotly.newPlot" in page
    assert "cdn.plot.ly" not in page and "require.config" not in page
    assert re.search(r'<script[^>]+src="[./]*_static/plotly\.min\.js', page), "plotly.js is not loaded from the book"


# ----------------------------------------------------------------------------- solutions: folded, or gone


def _build_book_module():
    spec = importlib.util.spec_from_file_location("build_book", REPO / "tools" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solution_lines(notebook: nbformat.NotebookNode) -> set[str]:
    """Lines found only inside solution blocks (long enough to be telling): what must not reach a student."""
    from labsupport.harness.editions import find_solution_blocks

    inside, outside = set(), set()
    for cell in notebook.cells:
        lines = cell.source.splitlines()
        blocks = find_solution_blocks(cell.source)
        hidden = {n for b in blocks for n in range(b.begin + 1, b.end)}
        for number, line in enumerate(lines):
            (inside if number in hidden else outside).add(line.strip())
    elsewhere = "\n".join(outside)  # a line quoted in a hint or a later cell is not a secret
    return {line for line in inside - outside if len(line) >= 20 and not line.startswith("#") and line not in elsewhere}


@pytest.mark.parametrize("path", chapter_notebooks(), ids=lambda p: p.stem)
def test_pages_fold_solutions_for_instructors_and_drop_them_for_students(path: Path) -> None:
    from labsupport.harness.editions import make_student_edition

    build_book = _build_book_module()
    secret = solution_lines(nbformat.read(path, as_version=4))
    assert secret, f"{path.name}: no solution lines found (the test would prove nothing)"
    instructor = build_book.fold_solutions(nbformat.read(path, as_version=4), student=False)
    student = build_book.fold_solutions(make_student_edition(nbformat.read(path, as_version=4)), student=True)
    for edition, notebook in (("instructor", instructor), ("student", student)):
        text = "\n".join(cell.source for cell in notebook.cells)
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text, f"{path.name}: a marker in the {edition} page"
    student_text = "\n".join(cell.source for cell in student.cells)
    leaked = sorted(line for line in secret if line in student_text)
    assert not leaked and build_book.SOLUTION_LABEL not in student_text, f"{path.name}: solution in the student page: {leaked[:3]}"
    folds = "\n".join(c.source for c in instructor.cells if c.source.startswith('<details class="course-solution">')
                      or '<details class="course-solution">' in c.source)
    assert all(line in folds for line in secret), f"{path.name}: a solution line is not inside a folded solution"
    assert f"<summary>{build_book.SOLUTION_LABEL}</summary>" in folds


def test_the_instructor_book_shows_solutions_folded_with_a_label(book) -> None:
    for path in chapter_notebooks():
        text = (book / "html" / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8")
        assert "BEGIN SOLUTION" not in text, f"{path.name}: a solution marker is shown in the book"
        assert re.search(r'<details class="course-solution">\s*<summary>Solution \(instructor edition\)</summary>', text), (
            f"{path.name}: no folded, labelled solution in the instructor book")


STUDENT_CHAPTER = "00_where_the_time_goes.ipynb"  # one chapter (with code and markdown answers) keeps the build short


@pytest.fixture(scope="module")
def student_book(tmp_path_factory) -> Path:
    reason = _why_no_book_tools()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("student-book")
    executed = EXECUTED_STUDENT_EDITIONS / STUDENT_CHAPTER
    build_book = _build_book_module()
    if executed.is_file() and nbformat.read(executed, as_version=4).metadata.get(build_book.STAMP_KEY) == \
            build_book.source_stamp(REPO / "notebooks" / STUDENT_CHAPTER, quick=True, student=True):
        # the build reuses an executed copy whose stamp is current ("unchanged, reusing its executed copy")
        (out / "src" / "notebooks").mkdir(parents=True)
        shutil.copy2(executed, out / "src" / "notebooks" / STUDENT_CHAPTER)
    command = [sys.executable, str(REPO / "tools" / "build_book.py"), "--quick", "--student", "--out", str(out),
               str(REPO / "notebooks" / STUDENT_CHAPTER)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, f"the student book did not build:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out


def test_the_student_book_is_built_from_the_student_edition_without_solutions(student_book) -> None:
    path = REPO / "notebooks" / STUDENT_CHAPTER
    html = student_book / "html"
    text = (html / "notebooks" / f"{path.stem}.html").read_text(encoding="utf-8")
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert "Solution (instructor edition)" not in text
    assert "your code here" in text and "not done yet" in text  # executed as a learner runs it
    assert "✅" not in text, "a checker passed in the student book: a solution was executed"
    unescaped = text.replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&").replace("&quot;", '"')
    leaked = [line for line in solution_lines(nbformat.read(path, as_version=4)) if line in unescaped]
    assert not leaked, f"solution lines in the student book: {leaked[:3]}"
    assert "student edition of the book" in (html / "index.html").read_text(encoding="utf-8")
