"""The course's shipped data: where it lives, its checksums, and loading text.

Every file in ``data/`` is listed with its sha256 in ``data/MANIFEST.sha256``
(``sha256sum`` format; check by hand with ``cd data && sha256sum -c MANIFEST.sha256``).
``data/PROVENANCE.md`` says where each file comes from.

Where ``data/`` is found (:func:`data_dir`), first match wins:

1. the folder named by the environment variable ``LABSUPPORT_DATA_DIR``;
2. ``data/`` next to the ``labsupport`` package — a clone of the repository,
   installed editable (``pip install -e .``, what ``bin/lab`` and the Colab
   set-up cell do after cloning the repository);
3. ``labsupport/_data/`` inside an installed wheel (``pip install
   "labsupport @ git+https://..."``, the Colab set-up cell), when the packaging
   ships ``data/`` as package data ``labsupport._data``;
4. ``data/`` in the current directory or its parent (a notebook runs in ``notebooks/``).

Failing all of these, clone the repository or point ``LABSUPPORT_DATA_DIR`` at a copy of ``data/``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["DATA_DIR_ENV_VAR", "MANIFEST_NAME", "data_dir", "load_text", "read_manifest", "sha256_file", "verify_manifest"]

DATA_DIR_ENV_VAR = "LABSUPPORT_DATA_DIR"
MANIFEST_NAME = "MANIFEST.sha256"
_IGNORED_NAMES = frozenset({"__pycache__", ".DS_Store", ".ipynb_checkpoints"})


def _candidates() -> list[Path]:
    found = []
    if os.environ.get(DATA_DIR_ENV_VAR):
        found.append(Path(os.environ[DATA_DIR_ENV_VAR]).expanduser())
    package = Path(__file__).resolve().parent.parent  # labsupport/
    found.append(package.parent / "data")  # a clone of the repository
    found.append(package / "_data")  # an installed wheel
    found.append(Path.cwd() / "data")
    found.append(Path.cwd().parent / "data")
    return found


def data_dir() -> Path:
    """The course's ``data/`` folder (the first holding ``MANIFEST.sha256``; see the module docstring).

    Raises:
        FileNotFoundError: no candidate folder holds a manifest; the message lists where it looked.
    """
    candidates = _candidates()
    for candidate in candidates:
        if (candidate / MANIFEST_NAME).is_file():
            return candidate.resolve()
    looked = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"could not find the course's data/ folder (with {MANIFEST_NAME}); looked in:\n  {looked}\n"
        f"Clone the course repository and install it with `pip install -e .`, or set "
        f"{DATA_DIR_ENV_VAR} to a copy of its data/ folder."
    )


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path | str | None = None) -> dict[str, str]:
    """The manifest as ``{relative path: sha256}``.

    Raises:
        FileNotFoundError: no manifest in the folder.
        ValueError: a line is not ``<64 hex digits><two spaces or ' *'><path>``, or a path repeats.
    """
    folder = Path(directory) if directory is not None else data_dir()
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}")
    entries: dict[str, str] = {}
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, separator, name = line[:64], line[64:66], line[66:]
        if (
            len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
            or separator not in ("  ", " *")
            or not name
        ):
            raise ValueError(f"{manifest}, line {number}: expected '<sha256>  <path>' (sha256sum format), got {line!r}")
        if name in entries:
            raise ValueError(f"{manifest}, line {number}: {name!r} is listed twice")
        entries[name] = digest
    return entries


def _files_on_disk(folder: Path) -> set[str]:
    files = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part in _IGNORED_NAMES or part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and relative.as_posix() != MANIFEST_NAME:
            files.add(relative.as_posix())
    return files


def verify_manifest(directory: Path | str | None = None) -> list[str]:
    """Check every file against ``MANIFEST.sha256``; return the problems found (empty when all is well).

    A problem is: a missing or malformed manifest, a listed file that is missing,
    a file whose sha256 differs, or a file in the folder that the manifest does
    not list (hidden files and ``__pycache__`` are ignored).
    """
    try:
        folder = Path(directory) if directory is not None else data_dir()
        entries = read_manifest(folder)
    except (FileNotFoundError, ValueError) as error:
        return [str(error)]
    problems = []
    for name, expected in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST_NAME} but missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 differs from {MANIFEST_NAME} (the file was changed or is corrupt)")
    for name in sorted(_files_on_disk(folder) - set(entries)):
        problems.append(f"{name}: not listed in {MANIFEST_NAME}")
    return problems


def load_text(name: str = "shakespeare.txt") -> str:
    """The UTF-8 text of ``data/<name>``, after checking its sha256 against the manifest.

    Raises:
        TypeError / ValueError: ``name`` is not a plain file name listed in the manifest.
        ValueError: the file's checksum does not match (re-download or re-clone the data).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    folder = data_dir()
    entries = read_manifest(folder)
    if name not in entries or name == MANIFEST_NAME:
        listed = sorted(n for n in entries if n.endswith((".txt", ".md")))
        raise ValueError(f"no data file {name!r}; text files in {folder}: {listed}")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in {MANIFEST_NAME} but missing")
    if sha256_file(path) != entries[name]:
        raw = path.read_bytes()
        if b"\r\n" in raw and hashlib.sha256(raw.replace(b"\r\n", b"\n")).hexdigest() == entries[name]:
            raise ValueError(
                f"{path}: its line endings were converted to Windows CRLF (git's core.autocrlf), so its sha256 "
                f"differs from {MANIFEST_NAME} although the text is intact. Fix: delete the file and run "
                "`git checkout -- data` (the repository's .gitattributes keeps data/ byte-exact), or clone again "
                "after `git config --global core.autocrlf input`."
            )
        raise ValueError(f"{path}: sha256 differs from {MANIFEST_NAME}; the file was changed or is corrupt "
                         "(download or clone the course again)")
    return path.read_text(encoding="utf-8")
