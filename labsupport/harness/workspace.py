"""A learner's own workspace: student editions of the chapters, in a folder git ignores.

``bash bin/lab`` runs ``python -m labsupport.harness.workspace [--folder my-notebooks]``
before it opens JupyterLab there. The first run writes the student edition
(solutions replaced, outputs cleared; see :mod:`labsupport.harness.editions`)
of every chapter in ``notebooks/``. Later runs add only the chapters that are
new since and say so; a notebook already in the workspace is never written
again, so a learner's edits survive every ``git pull``. When a chapter changed
upstream after the learner's copy was made, the run says so and keeps the copy
(delete or rename it to get the new edition).

The workspace remembers, in ``.course-editions.json``, the checksum of each
chapter its copy was made from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from labsupport.harness.editions import write_student_editions

__all__ = ["DEFAULT_FOLDER", "RECORD_NAME", "WorkspaceUpdate", "main", "update_workspace"]

DEFAULT_FOLDER = "my-notebooks"
RECORD_NAME = ".course-editions.json"


@dataclass
class WorkspaceUpdate:
    """What :func:`update_workspace` did.

    Attributes:
        folder: the workspace.
        created: True when the folder did not exist before this run.
        added: chapters written in this run (file names).
        kept: chapters already there, left untouched.
        changed_upstream: kept chapters whose source changed since their copy was made.
    """

    folder: Path
    created: bool = False
    added: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    changed_upstream: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the learner."""
        where = f"{self.folder}"
        lines = []
        if self.created:
            lines.append(
                f"[course] created your workspace {where} with the student editions of {len(self.added)} chapter(s): "
                "solutions removed, your edits stay there and `git pull` never touches them."
            )
        elif self.added:
            lines.append(f"[course] new since your last visit, added to {where}: {', '.join(self.added)}")
        else:
            lines.append(f"[course] your workspace {where} is up to date ({len(self.kept)} chapter(s), your edits kept).")
        if self.changed_upstream:
            lines.append(
                f"[course] updated in the course since your copy was made (your copy is kept; rename or delete it "
                f"to get the new edition): {', '.join(self.changed_upstream)}"
            )
        return "\n".join(lines)


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_record(folder: Path) -> dict[str, str]:
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def update_workspace(notebooks: Sequence[Path | str], folder: Path | str) -> WorkspaceUpdate:
    """Write the student edition of each notebook that ``folder`` does not hold yet; touch nothing else.

    Args:
        notebooks: the chapters (``.ipynb`` files).
        folder: the workspace; created when missing.

    Returns:
        A :class:`WorkspaceUpdate` naming what was added, kept and changed upstream.
    """
    if isinstance(notebooks, (str, Path)) or not isinstance(notebooks, Sequence):
        raise TypeError("notebooks must be a list of paths")
    paths = sorted((Path(p) for p in notebooks), key=lambda p: p.name)
    workspace = Path(folder)
    if workspace.exists() and not workspace.is_dir():
        raise NotADirectoryError(f"{workspace}: the workspace must be a folder, found a file")
    update = WorkspaceUpdate(folder=workspace, created=not workspace.exists())
    record = _read_record(workspace)
    missing = [p for p in paths if not (workspace / p.name).exists()]
    if missing:
        write_student_editions(missing, workspace)
    for path in paths:
        if path in missing:
            update.added.append(path.name)
            record[path.name] = _checksum(path)
        else:
            update.kept.append(path.name)
            if path.name in record and record[path.name] != _checksum(path):
                update.changed_upstream.append(path.name)
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / RECORD_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return update


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 1 on an error)."""
    parser = argparse.ArgumentParser(
        prog="python -m labsupport.harness.workspace",
        description="Create or update a learner's workspace of student editions (never overwriting a file).",
    )
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapters (default: notebooks/*.ipynb)")
    parser.add_argument("--folder", type=Path, default=Path(DEFAULT_FOLDER), help="workspace (default: %(default)s)")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(Path("notebooks").glob("*.ipynb"))
    if not notebooks:
        print("error: no notebooks given and none found in notebooks/", file=sys.stderr)
        return 1
    try:
        update = update_workspace(notebooks, args.folder)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(update.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
