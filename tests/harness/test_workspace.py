"""A learner's workspace (labsupport.harness.workspace) and ``bash bin/lab``, which makes and opens it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labsupport.harness.editions import CODE_PLACEHOLDER
from labsupport.harness.workspace import RECORD_NAME, main, update_workspace

REPO = Path(__file__).resolve().parents[2]


def chapter(folder: Path, name: str, answer: str = "1") -> Path:
    notebook = new_notebook(
        cells=[
            new_markdown_cell(f"# {name}"),
            new_code_cell(f"def f():\n    ### BEGIN SOLUTION\n    return {answer}\n    ### END SOLUTION"),
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    nbformat.write(notebook, path)
    return path


def test_first_run_writes_student_editions_then_keeps_edits_and_adds_new_chapters(tmp_path) -> None:
    source, workspace = tmp_path / "notebooks", tmp_path / "my-notebooks"
    first = [chapter(source, "00_a.ipynb"), chapter(source, "01_b.ipynb")]
    update = update_workspace(first, workspace)
    assert update.created and update.added == ["00_a.ipynb", "01_b.ipynb"] and update.kept == []
    assert "created your workspace" in update.summary()
    written = nbformat.read(workspace / "00_a.ipynb", as_version=4)
    assert CODE_PLACEHOLDER in written.cells[1].source and "BEGIN SOLUTION" not in written.cells[1].source

    (workspace / "00_a.ipynb").write_text((workspace / "00_a.ipynb").read_text().replace(CODE_PLACEHOLDER, "return 42"))
    edited = (workspace / "00_a.ipynb").read_text()
    second = update_workspace(first, workspace)
    assert not second.created and second.added == [] and second.kept == ["00_a.ipynb", "01_b.ipynb"]
    assert "up to date" in second.summary()
    assert (workspace / "00_a.ipynb").read_text() == edited

    new = chapter(source, "02_c.ipynb")
    chapter(source, "01_b.ipynb", answer="2")  # changed upstream after the copy was made
    third = update_workspace([*first, new], workspace)
    assert third.added == ["02_c.ipynb"] and third.changed_upstream == ["01_b.ipynb"]
    assert "02_c.ipynb" in third.summary() and "rename or delete" in third.summary()
    assert (workspace / "00_a.ipynb").read_text() == edited
    assert json.loads((workspace / RECORD_NAME).read_text()).keys() == {"00_a.ipynb", "01_b.ipynb", "02_c.ipynb"}


def test_a_deleted_copy_comes_back_as_a_fresh_edition(tmp_path) -> None:
    source, workspace = tmp_path / "notebooks", tmp_path / "ws"
    paths = [chapter(source, "00_a.ipynb")]
    update_workspace(paths, workspace)
    (workspace / "00_a.ipynb").unlink()
    assert update_workspace(paths, workspace).added == ["00_a.ipynb"]


def test_bad_arguments_are_refused(tmp_path, capsys) -> None:
    with pytest.raises(TypeError, match="list of paths"):
        update_workspace("notebooks/00_a.ipynb", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="must be a folder"):
        update_workspace([chapter(tmp_path / "nb", "00_a.ipynb")], tmp_path / "file")
    assert main(["--folder", str(tmp_path / "file"), str(tmp_path / "nb" / "00_a.ipynb")]) == 1
    assert "must be a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------- bash bin/lab, end to end


@pytest.fixture
def course_clone(tmp_path) -> Path:
    """A small git clone of the course (bin/, two chapters, .gitignore) and a stand-in for its .venv."""
    clone = tmp_path / "course"
    shutil.copytree(REPO / "bin", clone / "bin")
    for name in (".gitignore", "requirements.txt", "pyproject.toml"):
        shutil.copy2(REPO / name, clone / name)
    (clone / "notebooks").mkdir()
    for path in sorted((REPO / "notebooks").glob("*.ipynb"))[:2]:
        shutil.copy2(path, clone / "notebooks" / path.name)
    venv = clone / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "python").chmod(0o755)
    stamp = hashlib.sha256((clone / "requirements.txt").read_bytes() + (clone / "pyproject.toml").read_bytes())
    (clone / ".venv" / ".course-stamp").write_text(stamp.hexdigest()[:16] + "\n")  # as bin/_env.sh computes it
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    return clone


def run_lab(clone: Path, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COURSE_VENV", None)
    env.pop("COURSE_WORKSPACE", None)
    done = subprocess.run(
        ["bash", str(clone / "bin" / "lab"), "--prepare-only", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_bin_lab_makes_the_workspace_keeps_edits_adds_chapters_and_git_ignores_it(course_clone) -> None:
    first = run_lab(course_clone)
    workspace = course_clone / "my-notebooks"
    names = sorted(p.name for p in (course_clone / "notebooks").glob("*.ipynb"))
    assert "created your workspace" in first
    assert sorted(p.name for p in workspace.glob("*.ipynb")) == names
    assert "BEGIN SOLUTION" not in (workspace / names[0]).read_text()

    mine = workspace / names[0]
    notebook = nbformat.read(mine, as_version=4)
    notebook.cells.append(new_markdown_cell("My notes: the KV cache grows with the context."))
    nbformat.write(notebook, mine)
    edited = mine.read_text()
    shutil.copy2(sorted((REPO / "notebooks").glob("*.ipynb"))[2], course_clone / "notebooks" / "99_new_chapter.ipynb")
    second = run_lab(course_clone)
    assert "new since your last visit" in second and "99_new_chapter.ipynb" in second
    assert (workspace / "99_new_chapter.ipynb").is_file()
    assert mine.read_text() == edited

    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(mine.relative_to(course_clone))], cwd=course_clone, check=False
    )
    assert ignored.returncode == 0, "my-notebooks/ must be ignored by git"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=course_clone, capture_output=True, text=True)
    assert "my-notebooks" not in status.stdout

    assert "instructor edition" in run_lab(course_clone, "--instructor")


def test_bin_lab_starts_jupyterlab_without_the_news_pop_up_or_an_update_check(course_clone) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COURSE_LAB_DRY_RUN": "1"}
    env.pop("COURSE_VENV", None)
    env.pop("COURSE_WORKSPACE", None)
    done = subprocess.run(["bash", str(course_clone / "bin" / "lab"), "--no-browser", "--port", "8899"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    command = done.stdout.splitlines()
    settings = course_clone / "bin" / "lab-settings"
    assert f"--LabApp.app_settings_dir={settings}" in command
    assert "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate" in command
    own = command.index("--no-browser")  # the learner's own arguments come after the course's, and win
    assert command[own:own + 3] == ["--no-browser", "--port", "8899"] and own > command.index(
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate")
    overrides = json.loads((settings / "overrides.json").read_text())
    notification = overrides["@jupyterlab/apputils-extension:notification"]
    assert notification == {"fetchNews": "false", "checkForUpdates": False}
    schema_dir = Path(sys.prefix) / "share" / "jupyter" / "lab" / "schemas" / "@jupyterlab" / "apputils-extension"
    if (schema_dir / "notification.json").is_file():  # the names must be the installed JupyterLab's own
        schema = json.loads((schema_dir / "notification.json").read_text())
        assert {"fetchNews", "checkForUpdates"} <= set(schema["properties"])
        assert "false" in [choice["const"] for choice in schema["properties"]["fetchNews"]["oneOf"]]
