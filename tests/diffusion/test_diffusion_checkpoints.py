"""labsupport.diffusion.checkpoints: the shipped models load after a sha256 check; a corrupt file is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from labsupport.diffusion import checkpoints as ck
from labsupport.diffusion.process import MaskedDenoiser
from labsupport.harness.data import data_dir, sha256_file
from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import CharCorpus


def test_both_shipped_checkpoints_load_with_their_corpus() -> None:
    denoiser, config = ck.load_checkpoint(ck.DIFFUSION_CHECKPOINT)
    ar, ar_config = ck.load_checkpoint(ck.AR_CHECKPOINT)
    assert isinstance(denoiser, MaskedDenoiser) and isinstance(ar, TinyLM) and ar.causal
    assert not denoiser.training and not ar.training
    assert config["chars"] == ar_config["chars"] == "".join(CharCorpus.from_data().chars)
    same = ("d_model", "n_layers", "n_heads", "max_len", "vocab_size")
    assert all(config[k] == ar_config[k] for k in same)
    assert config["settings"]["steps"] == ar_config["settings"]["steps"]  # equal training budgets
    sizes = [sum(p.numel() for p in m.parameters()) for m in (denoiser, ar)]
    assert abs(sizes[0] - sizes[1]) < 0.001 * sizes[1]
    assert all(p.dtype == torch.float32 for p in denoiser.parameters())
    for name in (ck.DIFFUSION_CHECKPOINT, ck.AR_CHECKPOINT):
        assert (data_dir() / name).stat().st_size < 4_000_000


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    source = data_dir()
    shutil.copy(source / "MANIFEST.sha256", folder / "MANIFEST.sha256")
    shutil.copy(source / ck.DIFFUSION_CHECKPOINT, folder)
    return folder


def test_a_flipped_byte_is_refused_before_loading(data_copy: Path) -> None:
    path = data_copy / ck.DIFFUSION_CHECKPOINT
    ck.load_checkpoint(ck.DIFFUSION_CHECKPOINT, directory=data_copy)  # intact: loads
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256 differs.*refusing"):
        ck.load_checkpoint(ck.DIFFUSION_CHECKPOINT, directory=data_copy)


def test_unlisted_missing_and_odd_names_are_refused(data_copy: Path) -> None:
    with pytest.raises(ValueError, match="shipped checkpoints"):
        ck.load_checkpoint("other.safetensors", directory=data_copy)
    with pytest.raises(FileNotFoundError, match="missing"):
        ck.load_checkpoint(ck.AR_CHECKPOINT, directory=data_copy)
    with pytest.raises(TypeError, match="plain file name"):
        ck.load_checkpoint("../shakespeare.txt", directory=data_copy)


def test_a_checkpoint_without_our_metadata_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "data"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "other.safetensors"))
    (folder / "MANIFEST.sha256").write_text(f"{sha256_file(folder / 'other.safetensors')}  other.safetensors\n")
    with pytest.raises(ValueError, match="not one of chapter 08's checkpoints"):
        ck.load_checkpoint("other.safetensors", directory=folder)


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = {"kind": "diffusion", "vocab_size": 5, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8}
    model = ck.build_model(config)
    folder = tmp_path / "data"
    path = folder / "tiny.safetensors"
    ck.save_checkpoint(model, path, config, dtype=torch.float32)
    (folder / "MANIFEST.sha256").write_text(f"{sha256_file(path)}  tiny.safetensors\n")
    loaded, meta = ck.load_checkpoint("tiny.safetensors", directory=folder)
    assert meta == config
    x = torch.randint(0, 6, (2, 8))
    assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="kind"):
        ck.build_model({**config, "kind": "gan"})


@pytest.mark.parametrize("change", [{"d_model": 32}, {"n_layers": 2}, {"vocab_size": 6}])
def test_a_config_that_disagrees_with_the_tensors_is_refused_clearly(tmp_path: Path, change: dict) -> None:
    torch.manual_seed(0)
    config = {"kind": "diffusion", "vocab_size": 5, "d_model": 16, "n_layers": 1, "n_heads": 2, "max_len": 8}
    folder = tmp_path / "data"
    path = folder / "tiny.safetensors"
    ck.save_checkpoint(ck.build_model(config), path, {**config, **change}, dtype=torch.float32)
    (folder / "MANIFEST.sha256").write_text(f"{sha256_file(path)}  tiny.safetensors\n")
    with pytest.raises(ValueError, match="config and the weights disagree"):
        ck.load_checkpoint("tiny.safetensors", directory=folder)


def test_the_early_stopped_ar_model_is_the_same_run_stopped_at_its_best_step() -> None:
    early, config = ck.load_checkpoint(ck.AR_EARLY_CHECKPOINT)
    _, ar_config = ck.load_checkpoint(ck.AR_CHECKPOINT)
    assert isinstance(early, TinyLM) and early.causal
    same = ("d_model", "n_layers", "n_heads", "max_len", "vocab_size", "chars")
    assert all(config[k] == ar_config[k] for k in same)
    # the same schedule (a 3,000-step run) and settings, stopped after 1,250 steps
    settings, shipped = config["settings"], ar_config["settings"]
    assert settings["stop_after"] == 1250 and settings["steps"] == shipped["steps"] == 3000
    for key in ("batch", "seq_len", "lr", "weight_decay", "seed"):
        assert settings[key] == shipped[key], key
    assert sha256_file(data_dir() / ck.AR_EARLY_CHECKPOINT) != sha256_file(data_dir() / ck.AR_CHECKPOINT)
