"""labsupport.harness.data and data/: manifest intact, every file listed, tampering detected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from labsupport.harness import data
from labsupport.harness.data import MANIFEST_NAME, data_dir, load_text, read_manifest, verify_manifest

REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def test_data_dir_is_the_repository_data_folder(monkeypatch) -> None:
    monkeypatch.delenv("LABSUPPORT_DATA_DIR", raising=False)
    assert data_dir() == REPO_DATA.resolve()


def test_shipped_manifest_is_intact_and_lists_every_file() -> None:
    assert verify_manifest() == []
    listed = set(read_manifest(REPO_DATA))
    on_disk = {p.name for p in REPO_DATA.iterdir() if p.is_file() and p.name != MANIFEST_NAME}
    assert listed == on_disk
    assert {"shakespeare.txt", "PROVENANCE.md", "build_shakespeare.py"} <= listed


def test_shakespeare_corpus_is_plain_text_of_about_a_megabyte() -> None:
    text = load_text()
    assert 900_000 < len(text) < 1_200_000
    assert text.isascii() and "\r" not in text
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "gutenberg" not in text.lower()
    assert "To be, or not to be" in text


@pytest.fixture
def data_copy(tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(REPO_DATA, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("LABSUPPORT_DATA_DIR", str(copy))
    assert data_dir() == copy.resolve() and verify_manifest() == []
    return copy


def test_a_changed_file_is_detected(data_copy) -> None:
    with (data_copy / "shakespeare.txt").open("a") as stream:
        stream.write("tampered")
    assert verify_manifest() == [f"shakespeare.txt: sha256 differs from {MANIFEST_NAME} (the file was changed or is corrupt)"]
    with pytest.raises(ValueError, match="sha256 differs"):
        load_text()


def test_missing_and_unlisted_files_are_detected(data_copy) -> None:
    (data_copy / "PROVENANCE.md").unlink()
    (data_copy / "extra.bin").write_bytes(b"x")
    (data_copy / "__pycache__").mkdir()
    (data_copy / "__pycache__" / "ignored.pyc").write_bytes(b"x")
    assert verify_manifest(data_copy) == [
        f"PROVENANCE.md: listed in {MANIFEST_NAME} but missing",
        f"extra.bin: not listed in {MANIFEST_NAME}",
    ]


def test_malformed_or_missing_manifest_is_a_problem_not_a_crash(data_copy) -> None:
    manifest = data_copy / MANIFEST_NAME
    manifest.write_text("not a checksum line\n")
    [problem] = verify_manifest()
    assert "line 1" in problem and "sha256sum format" in problem
    manifest.unlink()
    assert verify_manifest(data_copy) == [f"no {MANIFEST_NAME} in {data_copy}"]


def test_data_dir_explains_where_it_looked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LABSUPPORT_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "__file__", str(tmp_path / "site-packages" / "labsupport" / "harness" / "data.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="LABSUPPORT_DATA_DIR"):
        data_dir()


def test_load_text_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="no data file"):
        load_text("../README.md")
    with pytest.raises(ValueError, match="no data file"):
        load_text(MANIFEST_NAME)
    with pytest.raises(TypeError):
        load_text(None)


def test_data_dir_finds_package_data_of_an_installed_wheel(tmp_path, monkeypatch) -> None:
    package = tmp_path / "site-packages" / "labsupport"
    shutil.copytree(REPO_DATA, package / "_data", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.delenv("LABSUPPORT_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "__file__", str(package / "harness" / "data.py"))
    monkeypatch.chdir(tmp_path)
    assert data_dir() == (package / "_data").resolve()
    assert verify_manifest() == []


def test_crlf_line_endings_get_an_error_that_says_how_to_fix_them(data_copy) -> None:
    path = data_copy / "shakespeare.txt"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))  # what core.autocrlf=true does on Windows
    with pytest.raises(ValueError, match="line endings were converted.*git checkout -- data"):
        load_text()


def test_gitattributes_keeps_the_data_byte_exact() -> None:
    attributes = (REPO_DATA.parent / ".gitattributes").read_text(encoding="utf-8")
    assert "data/** -text" in attributes
