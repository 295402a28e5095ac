"""The release's bookkeeping: one version, a changelog entry for it, and a Binder environment that is the lock.

``environment.yml`` (what Binder and conda build) must install exactly ``requirements.txt`` (what ``bin/lab``,
``bin/test`` and CI install): it installs the lock with ``pip -r requirements.txt``, names the Python version the
lock is tested on, and pins nothing of its own that the lock pins differently. ``bin/test-latest`` (the
compatibility check, not run here) must exist and be documented.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*==\s*([^\s;#]+)")


def _version() -> str:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def _lock(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        found = _PIN.match(line)
        if found:
            pins[found.group(1).lower().replace("_", "-")] = found.group(2)
    return pins


def _environment() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))


def _drift(environment: dict, requirements: str) -> list[str]:
    """Every way ``environment`` fails to install exactly the lock ``requirements``."""
    problems = []
    lock = _lock(requirements)
    unpinned = [line.strip() for line in requirements.splitlines()
                if line.strip() and not line.lstrip().startswith("#") and not _PIN.match(line)]
    if unpinned:
        problems.append(f"requirements.txt lines without an exact pin: {unpinned}")
    deps = environment.get("dependencies", [])
    conda = [d for d in deps if isinstance(d, str)]
    pip = [line for d in deps if isinstance(d, dict) for line in d.get("pip", [])]
    if "-r requirements.txt" not in [" ".join(p.split()) for p in pip]:
        problems.append("environment.yml does not install the lock (`-r requirements.txt` under pip:)")
    tested = re.search(r"Python (\d+\.\d+)", requirements)
    pythons = [d.split("=", 1)[1].strip() for d in conda if d.replace(" ", "").startswith("python=")]
    if not tested or pythons != [tested.group(1)]:
        problems.append(f"environment.yml's python {pythons} is not the lock's tested Python "
                        f"({tested.group(1) if tested else 'unnamed in requirements.txt'})")
    for entry in conda + pip:
        name = re.split(r"[=<>!~ ]", entry.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name in lock and name != "python" and entry.replace(" ", "") != f"{name}=={lock[name]}":
            problems.append(f"environment.yml names {entry!r}; the lock pins {name}=={lock[name]}")
    return problems


def test_environment_yml_installs_exactly_the_lock() -> None:
    assert _drift(_environment(), (REPO / "requirements.txt").read_text(encoding="utf-8")) == []


def test_the_drift_check_catches_a_drifted_environment() -> None:
    requirements = "# tested on Python 3.11\ntorch==2.13.0\nplotly==7.1.0\n"
    good = {"dependencies": ["python=3.11", "pip", {"pip": ["-r requirements.txt", "-e ."]}]}
    assert _drift(good, requirements) == []
    assert _drift({"dependencies": ["python=3.12", "pip", {"pip": ["-r requirements.txt"]}]}, requirements)
    assert _drift({"dependencies": ["python=3.11", "plotly=6.0", {"pip": ["-r requirements.txt"]}]}, requirements)
    assert _drift({"dependencies": ["python=3.11", {"pip": ["torch==2.15.0", "-r requirements.txt"]}]}, requirements)
    assert _drift({"dependencies": ["python=3.11", {"pip": ["torch", "plotly"]}]}, requirements)
    assert _drift(good, requirements + "numpy>=2\n")


def test_the_version_has_a_changelog_entry() -> None:
    version = _version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## (\d+\.\d+\.\d+) — \d{4}-\d{2}-\d{2}$", changelog, flags=re.MULTILINE)
    assert releases and releases[0] == version, f"CHANGELOG.md's latest release is {releases[:1]}, pyproject {version}"


def test_the_compatibility_check_exists_and_is_documented() -> None:
    script = REPO / "bin" / "test-latest"
    assert script.is_file() and os.access(script, os.X_OK)
    release = (REPO / "docs" / "release.md").read_text(encoding="utf-8")
    assert "bin/test-latest" in release and "CHANGELOG.md" in release
