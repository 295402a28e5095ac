"""The Mamba block as a sequence mixer of the ``lm`` bench, selective (S6) or time-invariant (S4D).

One block (Gu & Dao, arXiv:2312.00752)::

    x, z = in_proj(u).chunk(2)                 # expand d_model -> 2 · d_inner
    x = silu(causal_depthwise_conv(x))         # width d_conv (4)
    Δ, B, C = from x (selective) or learned constants (time-invariant)
    y = SSM(x; Δ, B, C) + D x                  # a scan (selective) or an FFT convolution (LTI)
    out = out_proj(y · silu(z))                # the gate (optional)

With ``selective=True`` (S6), ``Δ = softplus(dt_proj(x_proj(x)) )`` per token and channel and
``B, C`` per token: the layer chooses what to remember. With ``selective=False`` the same
block holds an LTI SSM (S4D-Real, Euler ``B̄``): one kernel for every input, computed by
FFT, which is the model that cannot do selective copying.

Decoding keeps ``(conv_state (batch, d_conv − 1, d_inner), ssm_state (batch, d_inner, N))``:
constant memory whatever the context. :func:`mamba_mixer` is the factory for ``TinyLM``.

:class:`SSDMixer` is the Mamba-2 block around this chapter's SSD forms (Dao & Gu, arXiv:2405.21060, §7 —
simplified)::

    z, x, B, C, Δ = in_proj(u)                      # one projection, as Mamba-2's "parallel" block
    x, B, C = silu(causal_depthwise_conv([x, B, C]))
    y = SSD(x; Δ = softplus(Δ + bias), A, B, C) + D x   # heads of P channels, one scalar A per head
    out = out_proj(rmsnorm(y · silu(z)))              # Mamba-2's gated normalisation

Left out: the grouped B/C heads (one group here), the learnable initial state, the fused kernel. Decoding keeps
the conv window ``(batch, d_conv − 1, d_inner + 2N)`` and the state ``(batch, H, N, P)``; :func:`ssd_mixer` is
its factory. Chapter 07's registry lists both blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labsupport.harness.validation import require_choice, require_int, require_positive_int
from labsupport.lm.contracts import MixerFactory
from labsupport.ssm.reference import fft_causal_conv, selective_scan, selective_step, ssd_chunked
from labsupport.ssm.scans import SCANS

__all__ = ["MambaMixer", "SSDMixer", "mamba_mixer", "ssd_mixer"]


class MambaMixer(nn.Module):
    """Mamba's mixer: projections, a short causal convolution, an SSM, an optional SiLU gate.

    Args:
        d_model: model width.
        d_state: ``N``, state numbers per channel (16 in Mamba).
        expand: ``d_inner = expand · d_model`` channels inside the block (2 in Mamba).
        d_conv: width of the causal depthwise convolution (4 in Mamba).
        dt_rank: rank of the ``Δ`` projection (default ``⌈d_model / 16⌉``).
        selective: ``True`` for Mamba's S6, ``False`` for a time-invariant S4D layer.
        gated: multiply by ``silu(z)`` before the output projection.
        scan: the scan :func:`~labsupport.ssm.reference.selective_scan` uses in ``forward``.
        dt_min, dt_max: ``Δ`` starts log-uniform in ``[dt_min, dt_max]``.
        reference_init: also start the projections as Mamba's reference code does (PyTorch's default uniform
            init for ``in_proj``, ``x_proj``, ``out_proj``; ``dt_proj``'s weight uniform in ``±dt_rank^−½``),
            overriding ``TinyLM``'s std-0.02 start; the default keeps the ``TinyLM`` start.
    """

    def __init__(self, d_model: int, d_state: int = 16, *, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None, selective: bool = True, gated: bool = True, scan: str = "chunked",
                 dt_min: float = 1e-3, dt_max: float = 0.1, reference_init: bool = False) -> None:
        super().__init__()
        self.d_model = require_positive_int("d_model", d_model)
        self.d_state = require_positive_int("d_state", d_state)
        self.d_inner = require_positive_int("expand", expand) * d_model
        self.d_conv = require_int("d_conv", d_conv, minimum=1)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else require_positive_int("dt_rank", dt_rank)
        self.selective, self.gated = bool(selective), bool(gated)
        self.scan = require_choice("scan", scan, tuple(SCANS))
        if not (0 < dt_min <= dt_max):
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        if not isinstance(reference_init, bool):
            raise TypeError(f"reference_init must be a bool, got {type(reference_init).__name__}")
        self.reference_init = reference_init
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner if gated else self.d_inner, bias=False)
        self.conv = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, padding=self.d_conv - 1)
        if self.selective:
            self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        else:
            self.log_dt = nn.Parameter(torch.zeros(self.d_inner))
            self.B = nn.Parameter(torch.zeros(self.d_inner, d_state))
            self.C = nn.Parameter(torch.zeros(self.d_inner, d_state))
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, d_state))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Mamba's start: ``A_n = −n`` (S4D-Real), ``D = 1``, ``Δ`` log-uniform in ``[dt_min, dt_max]``."""
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
            self.D.fill_(1.0)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(self.dt_max) - math.log(self.dt_min))
                           + math.log(self.dt_min))
            if self.selective:
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
            else:
                self.log_dt.copy_(torch.log(dt))
                nn.init.normal_(self.B, std=1.0)
                nn.init.normal_(self.C, std=1.0 / math.sqrt(self.d_state))
            if self.reference_init:
                for layer in (self.in_proj, self.out_proj) + ((self.x_proj,) if self.selective else ()):
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))   # nn.Linear's own default
                if self.selective:
                    bound = self.dt_rank ** -0.5
                    nn.init.uniform_(self.dt_proj.weight, -bound, bound)

    # ------------------------------------------------------------------ pieces

    @property
    def A(self) -> torch.Tensor:
        """``(d_inner, N)`` negative decay rates."""
        return -torch.exp(self.A_log)

    def _split(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        xz = self.in_proj(u)
        return xz.chunk(2, dim=-1) if self.gated else (xz, None)

    def _parameters_from(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Δ (…, d_inner)``, ``B, C (…, N)`` for the activations ``x (…, d_inner)`` (selective only)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C

    def step_sizes(self, u: torch.Tensor) -> torch.Tensor:
        """The selective layer's ``Δ (batch, L, d_inner)`` for the mixer's input ``u (batch, L, d_model)``.

        What the layer decides per token and channel: a small ``Δ`` keeps the state and barely writes
        the token (``b = Δ B x`` is small too); a large ``Δ`` forgets the state and writes the token.
        """
        if not self.selective:
            raise ValueError("a time-invariant layer has one fixed Δ per channel (exp(log_dt)), not one per token")
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected (batch, length, d_model={self.d_model}), got {tuple(u.shape)}")
        x, _ = self._split(u)
        length = x.shape[1]
        x_conv = F.silu(self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2))
        return self._parameters_from(x_conv)[0]

    def lti_kernel(self, length: int) -> torch.Tensor:
        """The time-invariant layer's kernel ``K_l = Σ_n C_n exp(Δ A_n)ˡ Δ B_n``: ``(d_inner, L)``."""
        if self.selective:
            raise ValueError("a selective layer has no single kernel: its Δ, B, C change with every token")
        steps = torch.arange(length, dtype=self.A.dtype, device=self.A.device)
        dt = self.log_dt.exp()[:, None]
        powers = torch.exp((dt * self.A)[..., None] * steps)            # (D, N, L)
        return ((self.C * self.B * dt)[..., None] * powers).sum(-2)

    def _finish(self, y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if z is not None:
            y = y * F.silu(z)
        return self.out_proj(y)

    # ------------------------------------------------------------------ the SequenceMixer contract

    def _sequence(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"expected (batch, length, d_model={self.d_model}), got {tuple(u.shape)}")
        x, z = self._split(u)
        length = x.shape[1]
        x_conv = F.silu(self.conv(x.transpose(1, 2))[..., :length].transpose(1, 2))
        if self.selective:
            dt, B, C = self._parameters_from(x_conv)
            y, state = selective_scan(x_conv, dt, self.A, B, C, self.D, scan=self.scan)
        else:
            y = fft_causal_conv(x_conv, self.lti_kernel(length)) + self.D * x_conv
            state = self._lti_state(x_conv)
        return self._finish(y, z), x, state, x_conv

    def _lti_state(self, x_conv: torch.Tensor) -> torch.Tensor:
        """The LTI layer's state after the sequence: ``Σ_s exp(ΔA)^{L−1−s} Δ B x_s``."""
        length = x_conv.shape[1]
        dt = self.log_dt.exp()[:, None]
        back = torch.arange(length - 1, -1, -1, dtype=x_conv.dtype, device=x_conv.device)
        weights = torch.exp((dt * self.A)[..., None] * back)                   # (D, N, L)
        return torch.einsum("dnl,bld->bdn", weights, x_conv) * (dt * self.B)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``(batch, L, d_model) → (batch, L, d_model)``, causal."""
        return self._sequence(u)[0]

    def prefill(self, u: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The whole prompt at once; the state is the last ``d_conv − 1`` conv inputs and the SSM state."""
        out, x, state, _ = self._sequence(u)
        keep = self.d_conv - 1
        tail = x[:, max(0, x.shape[1] - keep):] if keep else x[:, :0]
        conv_state = torch.cat([x.new_zeros(x.shape[0], keep - tail.shape[1], self.d_inner), tail], dim=1)
        return out, (conv_state, state)

    def decode_step(self, u: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token ``(batch, 1, d_model)``: a conv window, then one recurrence step. Constant memory."""
        if u.dim() != 3 or u.shape[1] != 1 or u.shape[-1] != self.d_model:
            raise ValueError(f"decode_step expects one token, shape (batch, 1, {self.d_model}); got {tuple(u.shape)}")
        x, z = self._split(u)
        if state is None:
            state = (x.new_zeros(x.shape[0], self.d_conv - 1, self.d_inner),
                     x.new_zeros(x.shape[0], self.d_inner, self.d_state))
        conv_state, h = state
        window = torch.cat([conv_state, x], dim=1)                                    # (batch, d_conv, d_inner)
        x_conv = F.silu((window * self.conv.weight[:, 0, :].t()).sum(1) + self.conv.bias)   # (batch, d_inner)
        if self.selective:
            dt, B, C = self._parameters_from(x_conv)
            y, h = selective_step(h, x_conv, dt, self.A, B, C, self.D)
        else:  # the same step with Δ, B, C fixed (B, C per channel)
            dt = self.log_dt.exp().expand_as(x_conv)
            h = torch.exp(dt[..., None] * self.A) * h + (dt * x_conv)[..., None] * self.B
            y = (h * self.C).sum(-1) + self.D * x_conv
        out = self._finish(y[:, None], None if z is None else z)
        return out, (window[:, 1:], h)

    def cache_bytes(self, state: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Bytes of the decoding state: the conv window and the SSM state (independent of the context)."""
        return sum(t.numel() * t.element_size() for t in state)


def mamba_mixer(d_state: int = 16, *, expand: int = 2, d_conv: int = 4, selective: bool = True,
                gated: bool = True, scan: str = "chunked") -> MixerFactory:
    """A factory ``(d_model, layer_index) -> MambaMixer`` for :class:`~labsupport.lm.model.TinyLM`."""
    require_positive_int("d_state", d_state)

    def build(d_model: int, layer_index: int) -> nn.Module:
        return MambaMixer(d_model, d_state, expand=expand, d_conv=d_conv, selective=selective, gated=gated,
                          scan=scan)
    return build


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
