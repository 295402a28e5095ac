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


def test_profile_machine_measures_on_the_threads_asked_and_restores_them(monkeypatch):
    import torch

    from labsupport.harness import hardware, settings

    seen = []
    monkeypatch.setattr(settings, "cpu_budget", lambda *args: 2)
    monkeypatch.setattr(hardware, "matmul_gflops", lambda n: seen.append(torch.get_num_threads()) or 10.0)
    monkeypatch.setattr(hardware, "copy_bandwidth_gbs", lambda mb: seen.append(torch.get_num_threads()) or 5.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        profile = hardware.profile_machine(threads=1)
        assert seen == [1, 1] and profile.balance_flops_per_byte == 2.0
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            hardware.profile_machine(threads=0)
    finally:
        torch.set_num_threads(before)


def test_cache_sizes_read_one_instance_of_each_data_level(tmp_path):
    from labsupport.harness.hardware import cache_sizes, last_level_cache_bytes

    for index, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"),
                                                  (2, "Unified", "512K"), (3, "Unified", "32768K")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "type").write_text(f"{kind}\n")
        (entry / "size").write_text(f"{size}\n")
    assert cache_sizes(tmp_path) == {1: 32 * 2**10, 2: 512 * 2**10, 3: 32 * 2**20}
    assert last_level_cache_bytes(tmp_path) == 32 * 2**20
    assert cache_sizes(tmp_path / "missing") == {} and last_level_cache_bytes(tmp_path / "missing") is None
    (tmp_path / "index3" / "size").write_text("lots\n")  # unreadable: that level is left out
    assert last_level_cache_bytes(tmp_path) == 512 * 2**10
