"""A Mamba-2 (SSD) block as a sequence mixer, built from chapter 04's SSD forms.

Chapter 04 builds the SSD algorithm (:func:`labsupport.ssm.ssd_chunked`, :func:`~labsupport.ssm.ssd_recurrent`:
scalar decay per head, ``S_t = exp(Δ_t A) S_{t−1} + B_t (Δ_t x_t)ᵀ``, ``y_t = S_tᵀ C_t``) but ships no mixer
around it, so the frontier gets one here (Dao & Gu, arXiv:2405.21060, §7 — simplified)::

    z, x, B, C, Δ = in_proj(u)                      # one projection, as Mamba-2's "parallel" block
    x, B, C = silu(causal_depthwise_conv([x, B, C]))
    y = SSD(x; Δ = softplus(Δ + bias), A, B, C) + D x   # heads of P channels, one A per head
    out = out_proj(rmsnorm(y · silu(z)))              # Mamba-2's gated normalisation

What is left out: the grouped B/C heads (one group here), the learnable initial state, the fused kernel.
Decoding keeps the conv window ``(batch, d_conv − 1, d_inner + 2N)`` and the state ``(batch, H, N, P)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_int, require_positive_int
from labsupport.lm.contracts import MixerFactory
from labsupport.ssm import ssd_chunked

__all__ = ["SSDMixer", "ssd_mixer"]


class SSDMixer(nn.Module):
    """Mamba-2's mixer: one input projection, a short conv, the SSD recurrence, a gated RMSNorm.

    Args:
        d_model: model width. d_state: ``N``. head_dim: ``P`` channels per head (``d_inner`` must divide).
        expand: ``d_inner = expand · d_model``. d_conv: conv width. chunk_size: SSD chunk length in ``forward``.
    """

    def __init__(self, d_model: int, d_state: int = 32, *, head_dim: int = 16, expand: int = 2, d_conv: int = 4,
                 chunk_size: int = 32, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.d_state = require_positive_int("d_state", d_state)
        self.d_inner = require_positive_int("expand", expand) * d_model
        self.head_dim = require_positive_int("head_dim", head_dim)
        if self.d_inner % head_dim:
            raise ValueError(f"head_dim={head_dim} must divide d_inner={self.d_inner}")
        self.n_heads = self.d_inner // head_dim
        self.d_conv = require_int("d_conv", d_conv, minimum=2)
        self.chunk_size = require_positive_int("chunk_size", chunk_size)
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.n_heads, bias=False)
        self.conv = nn.Conv1d(conv_dim, conv_dim, self.d_conv, groups=conv_dim, padding=self.d_conv - 1)
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = nn.RMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Mamba-2's start: ``A`` uniform in ``[1, 16]`` per head, ``Δ`` log-uniform in ``[dt_min, dt_max]``."""
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.linspace(1.0, 16.0, self.n_heads)))
            dt = torch.exp(torch.rand(self.n_heads) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D.fill_(1.0)

    def _split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected (batch, length, d_model={self.d_model}), got {tuple(u.shape)}")
        z, xbc, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_state, self.n_heads], dim=-1)
        return z, xbc, dt

    def _ssd_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        shape = x.shape[:-1]
        x = x.reshape(*shape, self.n_heads, self.head_dim)
        B = B.unsqueeze(-2).expand(*shape, self.n_heads, self.d_state)
        C = C.unsqueeze(-2).expand(*shape, self.n_heads, self.d_state)
        return x, F.softplus(dt + self.dt_bias), -torch.exp(self.A_log), B, C

    def _finish(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y + self.D[:, None] * x).flatten(-2)
        return self.out_proj(self.norm(y * F.silu(z)))

    def _sequence(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, xbc_raw, dt = self._split(u)
        length = u.shape[1]
        xbc = F.silu(self.conv(xbc_raw.transpose(1, 2))[..., :length].transpose(1, 2))
        x, dt, A, B, C = self._ssd_inputs(xbc, dt)
        y, state = ssd_chunked(x, dt, A, B, C, chunk_size=self.chunk_size)
        return self._finish(y, x, z), xbc_raw, state

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``(batch, L, d_model) → (batch, L, d_model)``, causal."""
        return self._sequence(u)[0]

    def prefill(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The whole prompt; the state is the last ``d_conv − 1`` conv inputs and the SSD state ``(B, H, N, P)``."""
        out, xbc_raw, state = self._sequence(u)
        keep = self.d_conv - 1
        tail = xbc_raw[:, -keep:]
        conv_state = torch.cat([tail.new_zeros(tail.shape[0], keep - tail.shape[1], tail.shape[2]), tail], dim=1)
        return out, (conv_state, state)

    def decode_step(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token ``(batch, 1, d_model)``: a conv window, then one SSD step. Constant memory."""
        if u.dim() != 3 or u.shape[1] != 1:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, d_model); got {tuple(u.shape)}")
        z, xbc_raw, dt = self._split(u)
        if state is None:
            state = (u.new_zeros(u.shape[0], self.d_conv - 1, xbc_raw.shape[-1]),
                     u.new_zeros(u.shape[0], self.n_heads, self.d_state, self.head_dim))
        conv_state, s = state
        window = torch.cat([conv_state, xbc_raw], dim=1)
        xbc = F.silu((window * self.conv.weight[:, 0, :].t()).sum(1, keepdim=True) + self.conv.bias)
        x, dt, A, B, C = self._ssd_inputs(xbc, dt)                       # x (b, 1, H, P), dt (b, 1, H)
        x, dt, B, C = x[:, 0], dt[:, 0], B[:, 0], C[:, 0]
        s = torch.exp(dt * A)[..., None, None] * s + B[..., :, None] * (dt[..., None] * x)[..., None, :]
        y = (C[..., :, None] * s).sum(-2)                                # (b, H, P)
        return self._finish(y[:, None], x[:, None], z), (window[:, 1:], s)

    def cache_bytes(self, state: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Bytes of the decoding state (conv window and SSD state), independent of the context."""
        return sum(t.numel() * t.element_size() for t in state)


def ssd_mixer(d_state: int = 32, *, head_dim: int = 16, expand: int = 2, chunk_size: int = 32) -> MixerFactory:
    """A ``TinyLM`` factory building :class:`SSDMixer` in every layer."""
    require_positive_int("d_state", d_state)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return SSDMixer(d_model, d_state, head_dim=head_dim, expand=expand, chunk_size=chunk_size)
    return build
