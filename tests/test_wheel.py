"""A wheel built from this repository installs into a fresh virtual environment and works without the clone.

The wheel is built (``pip wheel --no-deps``) from a copy of the files the
package needs, installed with ``--no-index`` into a new venv, and then used
from a folder outside the repository with ``PYTHONPATH`` cleared: ``import
labsupport`` must come from the venv, the shipped data must be found there
with its checksums intact, and one chapter must run top to bottom in quick
mode in a kernel of that venv.

Nothing is downloaded: the venv sees the dependencies (torch, plotly, ...) of
the environment running the tests through a ``.pth`` line, which keeps torch
from being fetched again; ``pip install --no-index`` still resolves the wheel's
declared dependencies against them. Deselect with ``-m 'not wheel'``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, chapter_notebooks

pytestmark = pytest.mark.wheel

# The chapter run from the installed wheel (the quickest in quick mode).
CHAPTER = "00_where_the_time_goes.ipynb"

RUN_NOTEBOOK = """
import sys
import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

class ThisPython(KernelSpecManager):
    def get_kernel_spec(self, kernel_name):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="venv", language="python")

source, folder, target = sys.argv[1:4]
notebook = nbformat.read(source, as_version=4)
manager = KernelManager(kernel_spec_manager=ThisPython(), kernel_name="python3")
client = NotebookClient(notebook, km=manager, timeout=600, resources={"metadata": {"path": folder}})
try:
    client.execute()
finally:
    nbformat.write(notebook, target)
"""

CHECK_INSTALL = """
import json, labsupport
from labsupport.harness.data import data_dir, load_text, verify_manifest
print(json.dumps({"module": labsupport.__file__, "data": str(data_dir()), "problems": verify_manifest(),
                  "characters": len(load_text())}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points back at the clone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel built from this repository installed; returns its python."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "labsupport", source / "labsupport", ignore=ignore)
    shutil.copytree(REPO / "data", source / "data", ignore=ignore)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(source)],
        check=True, capture_output=True, text=True, cwd=work,
    )
    [wheel] = dist.glob("labsupport-*.whl")

    venv = work / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    [venv_site] = json.loads(
        subprocess.run([str(python), "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
                       check=True, capture_output=True, text=True, env=clean_env()).stdout
    )
    # The dependencies of the environment running this test, after the venv's own site-packages.
    (Path(venv_site) / "zz-course-test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index",
         "--no-build-isolation", str(wheel)],
        capture_output=True, text=True, cwd=work, env=clean_env(),
    )
    assert done.returncode == 0, f"pip install {wheel.name} into a fresh venv failed:\n{done.stderr[-3000:]}"
    return python


def test_the_wheel_carries_the_package_and_its_data(installed) -> None:
    outside = installed.parent.parent.parent  # the test's scratch folder, not the clone
    done = subprocess.run([str(installed), "-c", CHECK_INSTALL], capture_output=True, text=True, cwd=outside, env=clean_env())
    assert done.returncode == 0, f"labsupport or its data did not work from the installed wheel:\n{done.stderr[-2000:]}"
    found = json.loads(done.stdout)
    venv = installed.parent.parent
    assert Path(found["module"]).is_relative_to(venv), f"labsupport was imported from {found['module']}, not the venv"
    assert Path(found["data"]).is_relative_to(venv), f"the data was found in {found['data']}, not in the installed wheel"
    assert found["problems"] == [] and found["characters"] > 100_000


def test_a_chapter_runs_from_the_installed_wheel(installed, tmp_path) -> None:
    [chapter] = [p for p in chapter_notebooks() if p.name == CHAPTER]
    executed = tmp_path / f"executed-{CHAPTER}"
    done = subprocess.run(
        [str(installed), "-c", RUN_NOTEBOOK, str(chapter), str(tmp_path), str(executed)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
        env=clean_env(LABSUPPORT_QUICK="1", LABSUPPORT_STRICT_CHECKS="1", MPLBACKEND="Agg", PYTHONHASHSEED="0"),
    )
    assert done.returncode == 0, f"{CHAPTER} failed from the installed wheel:\n{done.stderr[-4000:]}"
    notebook = nbformat.read(executed, as_version=4)
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "✅" in text and "❌" not in text, "the chapter's checkers did not all pass from the installed wheel"
