"""The small trained models chapter 05 ships in ``data/`` (safetensors), and how to rebuild and load them.

``benchmarks/sparse_train_checkpoints.py`` trains them with :func:`char_model` and :func:`mqar_model`; the
training settings and final validation figures travel in each file's metadata (``settings``).

=================================  ===========================================================================
file                               model
=================================  ===========================================================================
``sparse_char_lm.safetensors``     character-level LM on Shakespeare (2 layers, width 96, 4 RoPE heads, MLP)
``sparse_char_lm_sink.safetensors``  the same, trained with a dedicated sink token opening every window
``sparse_mqar.safetensors``        2-layer recall model (2 RoPE heads, short convolution, no MLP) on MQAR
=================================  ===========================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labsupport.harness.data import data_dir, read_manifest, sha256_file
from labsupport.harness.validation import require_choice
from labsupport.lm.model import TinyLM
from labsupport.lm.tasks import TaskBatch
from labsupport.sparse.mixers import sparse_mixer

__all__ = ["CHECKPOINTS", "Checkpoint", "char_model", "load_checkpoint", "load_checkpoint_file", "mqar_model",
           "with_sink_token"]

CHECKPOINTS = {
    "char": "sparse_char_lm.safetensors",
    "char_sink": "sparse_char_lm_sink.safetensors",
    "mqar": "sparse_mqar.safetensors",
}


def char_model(vocab_size: int, *, d_model: int = 96, n_layers: int = 2, n_heads: int = 4) -> TinyLM:
    """The character LM: ``SparseAttention`` (RoPE, so no learned positions and no length limit) with an MLP."""
    return TinyLM(vocab_size, d_model=d_model, n_layers=n_layers, max_len=1 << 20,
                  sequence_mixer=sparse_mixer(n_heads), positional="none")


def mqar_model(vocab_size: int = 128, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
               short_conv: int = 4) -> TinyLM:
    """The recall model: ``SparseAttention`` mixers with a short convolution in front, no MLP (as in Zoology)."""
    return TinyLM(vocab_size, d_model=d_model, n_layers=n_layers, max_len=1 << 20,
                  sequence_mixer=sparse_mixer(n_heads), channel_mixer=None, positional="none", short_conv=short_conv)


def with_sink_token(batch: TaskBatch, sink_id: int) -> TaskBatch:
    """Open every window with the sink token ``sink_id`` (dropping its last position, so the length stays)."""
    sink = torch.full_like(batch.inputs[:, :1], sink_id)
    inputs = torch.cat([sink, batch.inputs[:, :-1]], dim=1)
    targets = torch.cat([batch.inputs[:, :1], batch.targets[:, :-1]], dim=1)
    return TaskBatch(inputs, targets, dict(batch.info))


@dataclass
class Checkpoint:
    """A loaded model and the settings it was trained with."""

    name: str
    model: TinyLM
    settings: dict[str, Any]


def load_checkpoint(name: str) -> Checkpoint:
    """Load a shipped model (a key of :data:`CHECKPOINTS`) from ``data/`` after checking its sha256 (eval mode)."""
    require_choice("name", name, tuple(CHECKPOINTS))
    folder = data_dir()
    filename = CHECKPOINTS[name]
    expected = read_manifest(folder).get(filename)
    path = folder / filename
    if expected is None or not path.is_file():
        raise FileNotFoundError(f"{filename} is not in {folder} (or not in its manifest); "
                                "run benchmarks/sparse_train_checkpoints.py to make it")
    if sha256_file(path) != expected:
        raise ValueError(f"{path}: sha256 differs from the manifest; the file was changed or is corrupt")
    return load_checkpoint_file(path, name)


def load_checkpoint_file(path: str | Path, name: str) -> Checkpoint:
    """Build the model its ``settings`` metadata describes and load the file's tensors into it (no sha256 check).

    ``name`` picks the architecture (``"mqar"``: :func:`mqar_model`, else :func:`char_model`). A file whose
    settings disagree with its tensors (another width, a missing or extra tensor) raises a ``ValueError``
    naming the first tensor that differs, rather than torch's ``load_state_dict`` error.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "settings" not in metadata:
        raise ValueError(f"{path}: no 'settings' in the safetensors metadata; it was not written by "
                         "benchmarks/sparse_train_checkpoints.py")
    settings = json.loads(metadata["settings"])
    shape_keys = ("vocab_size", "d_model", "n_layers", "n_heads") + (("short_conv",) if name == "mqar" else ())
    missing = [key for key in shape_keys if key not in settings]
    if missing:
        raise ValueError(f"{path}: settings lack {missing}")
    shape = {key: settings[key] for key in shape_keys if key != "vocab_size"}
    model = (mqar_model if name == "mqar" else char_model)(settings["vocab_size"], **shape)
    tensors = load_file(str(path))
    wanted = model.state_dict()
    for key in sorted(set(wanted) | set(tensors)):
        if key not in tensors or key not in wanted:
            where = "missing from the file" if key not in tensors else "in the file but not in the model"
            raise ValueError(f"{path}: tensor {key!r} is {where}; the settings {shape} describe another model")
        if tensors[key].shape != wanted[key].shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, but the settings "
                             f"{shape} (vocab_size {settings['vocab_size']}) give {tuple(wanted[key].shape)}")
    model.load_state_dict(tensors)
    return Checkpoint(name, model.eval(), settings)
