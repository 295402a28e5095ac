"""labsupport.harness.editions: solution blocks replaced, outputs cleared, marker errors named."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labsupport.harness.editions import (
    SolutionMarkerError,
    find_solution_blocks,
    main,
    make_student_edition,
    replace_solutions,
    write_student_editions,
)

EXERCISE = '''def square(x):
    """Return x squared."""
    ### BEGIN SOLUTION
    y = x * x
    return y
    ### END SOLUTION

check(square)'''

STUDENT_EXERCISE = '''def square(x):
    """Return x squared."""
    raise NotImplementedError("your code here")

check(square)'''


def test_code_block_becomes_not_implemented_at_the_markers_indentation() -> None:
    assert replace_solutions(EXERCISE, cell_type="code") == STUDENT_EXERCISE
    edition = replace_solutions(EXERCISE, cell_type="code")
    compile(edition, "<student>", "exec")  # still valid Python


def test_several_blocks_top_level_and_trailing_newline() -> None:
    source = "### BEGIN SOLUTION\na = 1\n### END SOLUTION\nb = 2\n        ### BEGIN SOLUTION\nc\n        ### END SOLUTION\n"
    expected = 'raise NotImplementedError("your code here")\nb = 2\n        raise NotImplementedError("your code here")\n'
    assert replace_solutions(source, cell_type="code") == expected


def test_markdown_block_becomes_your_answer_here() -> None:
    source = "**Question.** Why?\n\n### BEGIN SOLUTION\nBecause memory bandwidth.\n### END SOLUTION\n"
    assert replace_solutions(source, cell_type="markdown") == "**Question.** Why?\n\n*Your answer here.*\n"


def test_source_without_markers_is_unchanged() -> None:
    assert replace_solutions("x = 1\n# ### not a marker", cell_type="code") == "x = 1\n# ### not a marker"


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("### BEGIN SOLUTION\nx = 1", "line 1 is never closed"),
        ("x = 1\n### END SOLUTION", "line 2 without"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION", "nested .* line 2"),
    ],
)
def test_unbalanced_or_nested_markers_are_errors(source, match) -> None:
    with pytest.raises(SolutionMarkerError, match=match):
        find_solution_blocks(source, where="nb.ipynb, cell 3")
    with pytest.raises(SolutionMarkerError, match="^nb.ipynb, cell 3"):
        replace_solutions(source, cell_type="code", where="nb.ipynb, cell 3")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        find_solution_blocks(None)
    with pytest.raises(ValueError, match="cell_type"):
        replace_solutions("x", cell_type="raw")
    with pytest.raises(TypeError, match="NotebookNode"):
        make_student_edition({"cells": []})


def chapter() -> nbformat.NotebookNode:
    run_cell = new_code_cell("print('hi')", execution_count=3, outputs=[new_output("stream", name="stdout", text="hi\n")])
    notebook = new_notebook(
        cells=[
            new_markdown_cell("# Chapter\n### BEGIN SOLUTION\nsecret\n### END SOLUTION"),
            new_code_cell(EXERCISE, execution_count=1),
            run_cell,
        ]
    )
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return notebook


def test_student_edition_replaces_solutions_and_clears_outputs() -> None:
    original = chapter()
    student = make_student_edition(original, name="00_x.ipynb")
    assert student.cells[0].source == "# Chapter\n*Your answer here.*"
    assert student.cells[1].source == STUDENT_EXERCISE
    assert all(c.outputs == [] and c.execution_count is None for c in student.cells if c.cell_type == "code")
    assert "widgets" not in student.metadata
    assert student.metadata["kernelspec"]["name"] == "python3"  # JupyterLab opens it without "Select Kernel"
    assert "BEGIN SOLUTION" in original.cells[1].source and original.cells[2].outputs  # input untouched
    assert "kernelspec" not in original.metadata
    nbformat.validate(student)


def test_marker_error_names_notebook_and_cell() -> None:
    notebook = chapter()
    notebook.cells[2].source = "x = 1\n### END SOLUTION"
    with pytest.raises(SolutionMarkerError, match=r"00_x.ipynb, cell 3 \(id .+\): '### END SOLUTION' on line 2"):
        make_student_edition(notebook, name="00_x.ipynb")


def write(path: Path, notebook: nbformat.NotebookNode) -> Path:
    nbformat.write(notebook, path)
    return path


def test_write_student_editions_and_the_command_line(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "notebooks").mkdir()
    source = write(tmp_path / "notebooks" / "00_x.ipynb", chapter())
    written = write_student_editions([source], tmp_path / "out")
    assert written == [tmp_path / "out" / "00_x.ipynb"]
    assert nbformat.read(written[0], as_version=4).cells[1].source == STUDENT_EXERCISE

    monkeypatch.chdir(tmp_path)
    assert main([]) == 0  # default: notebooks/*.ipynb -> student-editions/
    assert "wrote student-editions/00_x.ipynb" in capsys.readouterr().out
    assert nbformat.read(tmp_path / "student-editions" / "00_x.ipynb", as_version=4).cells[1].source == STUDENT_EXERCISE
    assert main(["--out", "elsewhere", "notebooks/00_x.ipynb"]) == 0
    assert (tmp_path / "elsewhere" / "00_x.ipynb").is_file()


def test_command_line_errors_are_one_clear_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([]) == 1
    assert "no notebooks" in capsys.readouterr().err
    broken = chapter()
    broken.cells[1].source = "### BEGIN SOLUTION\npass"
    good = write(tmp_path / "good.ipynb", chapter())
    bad = write(tmp_path / "bad.ipynb", broken)
    assert main(["--out", "out", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.ipynb, cell 2" in err and "never closed" in err
    assert not (tmp_path / "out").exists()  # nothing written when any notebook is broken
    assert main(["missing.ipynb"]) == 1
    assert "no such notebook" in capsys.readouterr().err
    with pytest.raises(ValueError, match="overwrite the notebook itself"):
        write_student_editions([good], tmp_path)
