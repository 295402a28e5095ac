"""Write the course's repository address (course.toml) into the Colab set-up cell of every notebook.

    python tools/course_repository.py            # rewrite notebooks/*.ipynb from course.toml
    python tools/course_repository.py --check    # only report notebooks that disagree (exit status 1)

Colab opens a notebook on its own, without the repository around it, so the
set-up cell cannot read course.toml there: it carries a copy of the address,
and this script keeps every copy equal to course.toml. A fork edits
course.toml and runs this once. The first code cell of each notebook is
replaced by :func:`setup_cell` (outputs, if any, are kept out of the commit
by the hygiene test as usual).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
SETTINGS_FILE = REPO / "course.toml"
_SETTING = re.compile(r'^\s*(\w+)\s*=\s*"([^"]*)"\s*(?:#.*)?$')


def read_course_settings(path: Path = SETTINGS_FILE) -> dict[str, str]:
    """``repository`` and ``branch`` from course.toml (plain ``key = "value"`` lines)."""
    settings = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _SETTING.match(line)
        if match:
            settings[match.group(1)] = match.group(2)
    for key in ("repository", "branch"):
        if not settings.get(key):
            raise ValueError(f'{path}: needs a line {key} = "..."')
    if not re.fullmatch(r"https://\S+", settings["repository"]):
        raise ValueError(f"{path}: repository must be an https:// address, got {settings['repository']!r}")
    return settings


def setup_cell(repository: str, branch: str) -> str:
    """The source of every notebook's first code cell."""
    return (
        "# Set-up: on Colab only, install the course's support library (torch is already there and is not reinstalled).\n"
        "# The address is a copy of course.toml's (a fork changes it there and runs tools/course_repository.py).\n"
        f'COURSE_REPOSITORY = "{repository}"\n'
        f'COURSE_BRANCH = "{branch}"\n'
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        '    %pip install -q "labsupport @ git+{COURSE_REPOSITORY}@{COURSE_BRANCH}"'
    )


def first_code_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    return next((cell for cell in notebook.cells if cell.cell_type == "code"), None)


def disagreeing(notebooks: list[Path], expected: str) -> list[Path]:
    """The notebooks whose first code cell is not ``expected``."""
    found = []
    for path in notebooks:
        cell = first_code_cell(nbformat.read(path, as_version=4))
        if cell is None or cell.source != expected:
            found.append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="report disagreeing notebooks, change nothing")
    parser.add_argument("--settings", type=Path, default=SETTINGS_FILE, help="default: course.toml")
    args = parser.parse_args(argv)
    settings = read_course_settings(args.settings)
    expected = setup_cell(settings["repository"], settings["branch"])
    notebooks = args.notebooks or sorted((REPO / "notebooks").glob("*.ipynb"))
    wrong = disagreeing(notebooks, expected)
    if args.check:
        for path in wrong:
            print(f"{path}: the set-up cell does not install from {settings['repository']}@{settings['branch']}")
        return 1 if wrong else 0
    for path in wrong:
        notebook = nbformat.read(path, as_version=4)
        cell = first_code_cell(notebook)
        if cell is None or "google.colab" not in cell.source:
            print(f"{path}: skipped, its first code cell is not a Colab set-up cell", file=sys.stderr)
            continue
        cell.source = expected
        nbformat.write(notebook, path)
        print(f"updated {path}")
    print(f"every set-up cell installs from {settings['repository']}@{settings['branch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
