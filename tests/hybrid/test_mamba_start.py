"""Issue 21 (b): Mamba's reference start, kept apart from TinyLM's, and the SSD block's one home (labsupport.ssm)."""

from __future__ import annotations

import pytest
import torch

from labsupport.hybrid import registry
from labsupport.lm.model import TinyLM
from labsupport.ssm.mixers import MambaMixer, SSDMixer


def _first_mixer(reference_init: bool, width: int = 32) -> MambaMixer:
    torch.manual_seed(0)
    model = TinyLM(16, d_model=width, n_layers=1, max_len=16, channel_mixer=None, positional="none",
                   sequence_mixer=lambda d, i: MambaMixer(d, 8, reference_init=reference_init))
    return model.blocks[0].mixer


def test_reference_start_survives_tinylm_and_restores_mambas_scales() -> None:
    course, reference = _first_mixer(False), _first_mixer(True)
    assert course.dt_proj.weight.std() < 0.03 and course.x_proj.weight.std() < 0.03   # TinyLM's std 0.02
    bound = reference.dt_rank ** -0.5
    assert reference.dt_proj.weight.abs().max() <= bound and reference.dt_proj.weight.std() > 0.5 * bound / 3 ** 0.5
    assert reference.in_proj.weight.std() > 2 * course.in_proj.weight.std()        # nn.Linear's default
    assert torch.equal(reference.A_log, course.A_log) and torch.equal(reference.D, course.D)  # A, D: the same start


def test_reference_start_keeps_decode_equal_to_forward() -> None:
    mixer = _first_mixer(True).double().eval()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(x)
        state, steps = None, []
        for t in range(12):
            y, state = mixer.decode_step(x[:, t:t + 1], state)
            steps.append(y)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-10)


def test_reference_init_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="reference_init"):
        MambaMixer(16, 4, reference_init="yes")  # type: ignore[arg-type]


def test_the_registrys_ssd_row_builds_the_ssm_packages_block() -> None:
    import labsupport.ssm

    assert isinstance(registry.get("ssd").build(32, 0), SSDMixer) and labsupport.ssm.SSDMixer is SSDMixer
    with pytest.raises(ModuleNotFoundError):
        __import__("labsupport.hybrid.ssd")
