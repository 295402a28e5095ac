"""The machine probes behind chapter 00's roofline (labsupport.harness.hardware)."""

from __future__ import annotations

import pytest

from labsupport.harness.hardware import MachineProfile, copy_bandwidth_gbs, matmul_gflops


def test_hardware_probes_are_positive_and_validate():
    assert matmul_gflops(64, repeats=1) > 0
    assert copy_bandwidth_gbs(8, repeats=1) > 0
    m = MachineProfile(100.0, 10.0)
    assert m.balance_flops_per_byte == 10.0
    assert m.attainable_gflops(1.0) == 10.0 and m.attainable_gflops(100.0) == 100.0
    with pytest.raises(ValueError):
        matmul_gflops(4)
    with pytest.raises(ValueError):
        m.attainable_gflops(0)
