"""The shipped checkpoints: a masked-diffusion denoiser and the autoregressive model of the same size.

Both are trained by ``benchmarks/train_diffusion_checkpoints.py`` (settings and losses in
``data/PROVENANCE.md``) and stored as safetensors in ``data/``: weights in float16 and, in the
file's metadata, the model's shape, the corpus's character set and the training settings. Loading never
unpickles anything, and it first checks the file's sha256 against ``data/MANIFEST.sha256``: a changed or
corrupt file is refused with a message that says so.

* :func:`save_checkpoint` — write a model and its metadata (used by the training script).
* :func:`load_checkpoint` — verify, read and rebuild a model from ``data/<name>``.
* :func:`build_model` — the model a metadata record describes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labsupport.diffusion.process import MaskedDenoiser
from labsupport.harness.data import data_dir, read_manifest, sha256_file
from labsupport.harness.validation import require_choice
from labsupport.lm.model import TinyLM

__all__ = ["AR_CHECKPOINT", "AR_EARLY_CHECKPOINT", "DIFFUSION_CHECKPOINT", "build_model", "load_checkpoint", "save_checkpoint"]

DIFFUSION_CHECKPOINT = "diffusion_denoiser.safetensors"
AR_CHECKPOINT = "diffusion_ar_baseline.safetensors"
#: The AR model stopped early, after 1,250 of the same 3,000-step schedule (where its held-out loss was lowest).
AR_EARLY_CHECKPOINT = "diffusion_ar_early_stopped.safetensors"
_KINDS = ("diffusion", "autoregressive")


def build_model(config: dict[str, Any]) -> nn.Module:
    """A fresh model of the shape in ``config`` (keys: kind, vocab_size, d_model, n_layers, n_heads, max_len)."""
    kind = require_choice("kind", config.get("kind"), _KINDS)
    shape = {k: int(config[k]) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len")}
    if kind == "diffusion":
        return MaskedDenoiser(shape["vocab_size"], shape["d_model"], shape["n_layers"], n_heads=shape["n_heads"],
                              max_len=shape["max_len"])
    return TinyLM(shape["vocab_size"], shape["d_model"], shape["n_layers"], shape["max_len"],
                  n_heads=shape["n_heads"])


def save_checkpoint(model: nn.Module, path: Path | str, config: dict[str, Any], *,
                    dtype: torch.dtype = torch.float16) -> None:
    """Write ``model``'s weights (as ``dtype``) and ``config`` (JSON in the safetensors metadata) to ``path``."""
    from safetensors.torch import save_file

    require_choice("kind", config.get("kind"), _KINDS)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"config": json.dumps(config, sort_keys=True)})


def load_checkpoint(name: str, *, directory: Path | str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Verify and load ``data/<name>``: returns ``(model in eval mode, float32; config)``.

    Raises:
        ValueError: ``name`` is not listed in the manifest, or the file's sha256 differs from it (corrupt or
            changed: re-clone the repository or re-run the training script and update the manifest), or the
            config in its metadata describes a model whose tensors are not the ones stored.
        FileNotFoundError: the file is listed but missing.
    """
    if not isinstance(name, str) or "/" in name or "\\" in name:
        raise TypeError(f"name must be a plain file name such as {DIFFUSION_CHECKPOINT!r}, got {name!r}")
    folder = Path(directory) if directory is not None else data_dir()
    entries = read_manifest(folder)
    relative = name
    if relative not in entries or not name.endswith(".safetensors"):
        shipped = sorted(n for n in entries if n.endswith(".safetensors"))
        raise ValueError(f"no checkpoint {name!r} in the manifest of {folder}; shipped checkpoints: {shipped}")
    path = folder / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in the manifest but missing")
    if sha256_file(path) != entries[relative]:
        raise ValueError(f"{path}: sha256 differs from MANIFEST.sha256 — the file is corrupt or was changed; "
                         "refusing to load it (re-clone the data, or re-run "
                         "benchmarks/train_diffusion_checkpoints.py and update the manifest)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{path} is not one of chapter 08's checkpoints (no 'config' in its metadata); "
                             f"they are {DIFFUSION_CHECKPOINT!r} and {AR_CHECKPOINT!r}")
        config = json.loads(metadata["config"])
        state = {key: handle.get_tensor(key).float() for key in handle.keys()}
    model = build_model(config)
    _require_matching(model, state, config, path)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, config


def _require_matching(model: nn.Module, state: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    """Refuse a file whose tensors do not fit the model its own config describes, naming the first difference."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: tuple(t.shape) for name, t in state.items()}
    shape = {k: config.get(k) for k in ("kind", "vocab_size", "d_model", "n_layers", "n_heads", "max_len")}
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: its config {shape} describes a model with tensors the file does not hold "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); the config and the weights disagree")
    for name, want in expected.items():
        if stored[name] != want:
            raise ValueError(f"{path}: tensor {name!r} has shape {stored[name]}, but the config {shape} needs "
                             f"{want}; the config and the weights disagree")
