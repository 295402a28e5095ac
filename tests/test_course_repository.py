"""The course's repository address: one setting (course.toml), copied into every notebook's Colab set-up cell."""

from __future__ import annotations

import importlib.util
import shutil

import nbformat
import pytest
from conftest import REPO, chapter_notebooks, notebook_params

spec = importlib.util.spec_from_file_location("course_repository", REPO / "tools" / "course_repository.py")
course_repository = importlib.util.module_from_spec(spec)
spec.loader.exec_module(course_repository)

SETTINGS = course_repository.read_course_settings(REPO / "course.toml")


@pytest.mark.parametrize("path", notebook_params(chapter_notebooks()))
def test_every_set_up_cell_installs_from_course_toml(path) -> None:
    cell = course_repository.first_code_cell(nbformat.read(path, as_version=4))
    assert cell is not None and cell.source == course_repository.setup_cell(SETTINGS["repository"], SETTINGS["branch"]), (
        f"{path.name}: its first code cell is not the Colab set-up cell made from course.toml; "
        "run `python tools/course_repository.py`"
    )


def test_the_set_up_cell_installs_only_on_colab_and_from_the_address() -> None:
    source = course_repository.setup_cell("https://github.com/someone/fork", "spring-2027")
    assert 'COURSE_REPOSITORY = "https://github.com/someone/fork"' in source
    assert 'COURSE_BRANCH = "spring-2027"' in source
    assert 'if "google.colab" in sys.modules:\n    %pip install' in source
    assert "git+{COURSE_REPOSITORY}@{COURSE_BRANCH}" in source and "torch" not in source.split("\n", 2)[2]


def test_a_fork_changes_course_toml_and_the_tool_rewrites_every_set_up_cell(tmp_path, capsys) -> None:
    settings = tmp_path / "course.toml"
    settings.write_text('repository = "https://github.com/someone/fork"  # mine\nbranch = "main"\n')
    notebook = tmp_path / chapter_notebooks()[0].name
    shutil.copy2(chapter_notebooks()[0], notebook)
    assert course_repository.main(["--settings", str(settings), "--check", str(notebook)]) == 1
    assert "does not install from https://github.com/someone/fork@main" in capsys.readouterr().out
    assert course_repository.main(["--settings", str(settings), str(notebook)]) == 0
    assert course_repository.main(["--settings", str(settings), "--check", str(notebook)]) == 0
    rewritten = nbformat.read(notebook, as_version=4)
    original = nbformat.read(chapter_notebooks()[0], as_version=4)
    assert 'COURSE_REPOSITORY = "https://github.com/someone/fork"' in course_repository.first_code_cell(rewritten).source
    changed = [i for i, (a, b) in enumerate(zip(rewritten.cells, original.cells)) if a.source != b.source]
    assert len(changed) == 1 and len(rewritten.cells) == len(original.cells)  # only the set-up cell


@pytest.mark.parametrize(
    ("text", "match"),
    [('branch = "main"\n', "repository"), ('repository = "git@github.com:x/y"\nbranch = "main"\n', "https://")],
)
def test_a_broken_course_toml_is_named(tmp_path, text, match) -> None:
    (tmp_path / "course.toml").write_text(text)
    with pytest.raises(ValueError, match=match):
        course_repository.read_course_settings(tmp_path / "course.toml")
