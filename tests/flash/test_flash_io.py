"""Chapter 01 IO model (labsupport.flash.io): the two-level memory and the byte counts of both algorithms."""

from __future__ import annotations

import pytest

from labsupport.flash.io import TwoLevelMemory, flash_attention_io, flash_block_sizes, standard_attention_io


# --------------------------------------------------------------------------- IO model


def test_memory_refuses_to_overflow():
    mem = TwoLevelMemory(100)
    mem.load("a", 60)
    with pytest.raises(MemoryError):
        mem.load("b", 41)
    with pytest.raises(ValueError):
        TwoLevelMemory(0)
    with pytest.raises(KeyError):
        mem.store("nothing")
    with pytest.raises(ValueError):
        mem.load("c", -1)
    mem.free("a")
    mem.load("b", 41)
    mem.store("b")
    assert mem.read_bytes == (60 + 41) * 2 and mem.write_bytes == 41 * 2 and mem.peak_resident == 60


def test_io_counts_follow_the_theory():
    d, m = 64, 32 * 1024
    std = [standard_attention_io(n, d, m).total_bytes for n in (512, 1024, 2048)]
    fl = [flash_attention_io(n, d, m).total_bytes for n in (512, 1024, 2048)]
    # standard: 4 N^2 element moves (2 bytes each) for S and P, plus the tiled products' re-reads
    assert all(1.0 < s / (4 * n * n * 2) < 1.5 for s, n in zip(std, (512, 1024, 2048)))
    # both quadratic in N at fixed M, the tiled one several times smaller
    assert 3.5 < fl[2] / fl[1] < 4.5 and 3.5 < std[2] / std[1] < 4.5
    assert fl[2] * 4 < std[2]
    # tiled ~ 1/M: doubling the fast memory roughly halves the traffic; standard does not care
    n = 2048
    f1, f2 = flash_attention_io(n, d, m).total_bytes, flash_attention_io(n, d, 2 * m).total_bytes
    s1, s2 = standard_attention_io(n, d, m).total_bytes, standard_attention_io(n, d, 2 * m).total_bytes
    assert 1.7 < f1 / f2 < 2.3 and s1 / s2 < 1.2
    # causal skips about half of the key blocks
    assert flash_attention_io(n, d, m, causal=True).total_bytes < 0.6 * f1


def test_io_blocks_fit_and_tiny_memory_is_refused():
    for m in (300, 4096, 100_000):
        report = flash_attention_io(256, 64, m)
        assert report.peak_resident <= m
        assert standard_attention_io(256, 64, m).peak_resident <= m
    with pytest.raises(ValueError):
        flash_block_sizes(256, 64, 200)
    with pytest.raises(ValueError):
        flash_attention_io(0, 64, 4096)
