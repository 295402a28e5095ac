"""Repository hygiene: clean, valid notebooks with balanced solution markers; README commands; data manifest."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from conftest import REPO, chapter_notebooks, notebook_params

from labsupport.harness.data import verify_manifest
from labsupport.harness.editions import SolutionMarkerError, find_solution_blocks

NOTEBOOKS = chapter_notebooks()


def notebook_problems(path: Path) -> list[str]:
    """What is wrong with a committed notebook: invalid format, outputs, execution counts, unbalanced markers."""
    try:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # NotJSONError, ValidationError, ...
        return [f"not a valid notebook: {type(error).__name__}: {str(error)[:300]}"]
    problems = []
    for index, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type == "code":
            if cell.get("outputs"):
                problems.append(f"cell {index} has outputs (strip them before committing)")
            if cell.get("execution_count") is not None:
                problems.append(f"cell {index} has an execution count (strip outputs before committing)")
        try:
            find_solution_blocks(cell.source, where=f"cell {index}")
        except SolutionMarkerError as error:
            problems.append(str(error))
    if "widgets" in notebook.metadata:
        problems.append("notebook metadata holds saved widget state (clear it before committing)")
    if (notebook.metadata.get("kernelspec") or {}).get("name") != "python3":
        problems.append("notebook metadata has no python3 kernelspec (JupyterLab would ask 'Select Kernel' "
                        "and mark it modified at once); add labsupport.harness.editions.KERNELSPEC")
    return problems


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_committed_notebook_is_clean_and_valid(path: Path) -> None:
    assert notebook_problems(path) == [], f"{path.name}: {notebook_problems(path)}"


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_student_edition_names_the_python3_kernel(path: Path) -> None:
    """The edition a learner opens (my-notebooks/, bin/book --student) starts its kernel without asking."""
    from labsupport.harness.editions import make_student_edition

    student = make_student_edition(nbformat.read(path, as_version=4), name=path.name)
    assert student.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: student edition has no kernelspec"
    assert student.metadata["kernelspec"].get("language") == "python"


@pytest.mark.parametrize("path", notebook_params(NOTEBOOKS))
def test_set_up_cell_matches_threads_to_the_cpus(path: Path) -> None:
    """Every chapter caps torch's threads early (surplus threads make small models several times slower)."""
    code = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    assert any("configure_torch_threads()" in source for source in code[:3]), (
        f"{path.name}: call labsupport.harness.settings.configure_torch_threads() in the set-up cell"
    )


def test_hygiene_check_catches_dirty_notebooks(tmp_path) -> None:
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from labsupport.harness.editions import KERNELSPEC

    clean = new_notebook(cells=[new_code_cell("def f():\n    ### BEGIN SOLUTION\n    pass\n    ### END SOLUTION")],
                         metadata={"kernelspec": dict(KERNELSPEC)})
    nbformat.write(clean, tmp_path / "clean.ipynb")
    assert notebook_problems(tmp_path / "clean.ipynb") == []
    clean.metadata.pop("kernelspec")
    nbformat.write(clean, tmp_path / "no_kernel.ipynb")
    assert [p for p in notebook_problems(tmp_path / "no_kernel.ipynb") if "kernelspec" in p]

    dirty = new_notebook(
        cells=[
            new_code_cell("print(1)", execution_count=1, outputs=[new_output("stream", name="stdout", text="1\n")]),
            new_code_cell("### BEGIN SOLUTION\npass"),
        ]
    )
    nbformat.write(dirty, tmp_path / "dirty.ipynb")
    problems = notebook_problems(tmp_path / "dirty.ipynb")
    assert problems[0] == "cell 1 has outputs (strip them before committing)"
    assert "execution count" in problems[1]
    assert "cell 2" in problems[2] and "never closed" in problems[2]
    (tmp_path / "broken.ipynb").write_text("{not json")
    assert notebook_problems(tmp_path / "broken.ipynb")[0].startswith("not a valid notebook")


def test_readme_names_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash bin/lab" in readme
    assert "bash bin/test" in readme


def test_readme_documents_the_workspace_the_book_and_the_browser_test() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for needed in ("my-notebooks/", "bash bin/lab --instructor", "bash bin/book", "tests/test_browser.py",
                   "course.toml", "python tools/course_repository.py", '-m "not browser"'):
        assert needed in readme, f"README.md should mention {needed!r}"


def test_data_manifest_is_intact() -> None:
    assert verify_manifest(REPO / "data") == []
