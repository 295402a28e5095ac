"""Build data/digits.safetensors from scikit-learn's copy of the UCI handwritten digits, exactly and repeatably.

Usage (run once by the maintainers; nothing is downloaded here):

    python data/build_digits.py /path/to/scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl \
        [--out data/digits.safetensors]

The wheel (a zip archive) ships ``sklearn/datasets/data/digits.csv.gz``: 1,797 rows of 64 pixel counts
(0..16, an 8×8 image in row-major order) followed by the class (0..9). This script

1. checks the sha256 of that member (so the input is exactly the one in PROVENANCE.md);
2. reads it straight from the archive (no extraction, no scikit-learn import);
3. checks every row: 65 integers, pixels in 0..16, labels in 0..9, 1,797 rows;
4. writes ``images`` (uint8, 1797×8×8) and ``labels`` (uint8, 1797) to safetensors, with the source and
   licence in the metadata (one JSON key, so the bytes are repeatable), keeping the original row order.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

MEMBER = "sklearn/datasets/data/digits.csv.gz"
MEMBER_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
ROWS = 1797


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="scikit-learn wheel (any that ships the member above)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "digits.safetensors")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    with zipfile.ZipFile(args.wheel) as archive:
        packed = archive.read(MEMBER)
    digest = hashlib.sha256(packed).hexdigest()
    if digest != MEMBER_SHA256:
        print(f"{MEMBER}: sha256 {digest}, expected {MEMBER_SHA256}", file=sys.stderr)
        return 1
    rows = [line.split(",") for line in gzip.decompress(packed).decode("ascii").splitlines() if line.strip()]
    if len(rows) != ROWS or any(len(r) != 65 for r in rows):
        print(f"expected {ROWS} rows of 65 values", file=sys.stderr)
        return 1
    values = torch.tensor([[int(float(v)) for v in r] for r in rows], dtype=torch.int64)
    pixels, labels = values[:, :64], values[:, 64]
    if not (0 <= int(pixels.min()) and int(pixels.max()) <= 16 and 0 <= int(labels.min()) and int(labels.max()) <= 9):
        print("pixel or label out of range", file=sys.stderr)
        return 1
    metadata = {
        "source": "UCI ML Optical Recognition of Handwritten Digits (Alpaydin & Kaynak, 1998), test-set copy "
                  f"shipped by scikit-learn as {MEMBER} (sha256 {MEMBER_SHA256})",
        "licence": "CC BY 4.0",
        "pixels": "counts of on-pixels in 4x4 blocks of a 32x32 bitmap, 0..16, row-major 8x8",
    }
    save_file({"images": pixels.to(torch.uint8).reshape(ROWS, 8, 8).contiguous(),
               "labels": labels.to(torch.uint8).contiguous()}, str(args.out),
              metadata={"provenance": json.dumps(metadata, sort_keys=True)})  # one key: a repeatable header
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
