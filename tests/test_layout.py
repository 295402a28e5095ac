"""The package layout's rules (docs/contributing.md), checked on the source.

* ``labsupport.harness`` imports nothing else from ``labsupport``;
* ``labsupport.lm`` imports only the harness;
* a family imports only the harness and ``lm``; only ``hybrid`` and ``capstone`` may import other families;
* no module grows past 800 lines (split it by concern).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "labsupport"
SHARED = {"harness", "lm"}
MAY_IMPORT_FAMILIES = {"hybrid", "capstone"}
MAX_LINES = 800


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "_data" not in p.parts)


def _home(path: Path) -> str:
    """``harness``, ``lm``, a family's name, or ``""`` for labsupport/__init__.py."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else ""


def _labsupport_imports(path: Path) -> set[str]:
    """The top-level labsupport subpackages a module imports (``labsupport.lm.model`` → ``lm``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "labsupport":
                names = [f"labsupport.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "labsupport" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_module_lives_in_the_harness_lm_or_a_family_package() -> None:
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside a package: {loose}; move each into harness/, lm/ or its family"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layout(path: Path) -> None:
    home = _home(path)
    imported = _labsupport_imports(path) - {home}
    if home == "harness":
        allowed: set[str] = set()
    elif home == "lm":
        allowed = {"harness"}
    elif home in MAY_IMPORT_FAMILIES or home == "":
        return
    else:
        allowed = SHARED
    assert imported <= allowed, f"{path.relative_to(PACKAGE)} ({home or 'top'}) imports {sorted(imported - allowed)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it by concern"


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from labsupport.flash import naive_attention\nimport labsupport.lm.model\n")
    assert _labsupport_imports(bad) == {"flash", "lm"}


def test_every_package_is_listed_for_installation() -> None:
    """A pip or Colab install ships only the packages pyproject.toml names."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    on_disk = {"labsupport." + p.parent.name for p in PACKAGE.glob("*/__init__.py")} | {"labsupport"}
    assert on_disk - listed == set(), f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
