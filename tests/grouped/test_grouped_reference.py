"""Chapter 02 references (labsupport.grouped.reference): GQA/MQA as one function, its decode step, RoPE, MLA absorption."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labsupport import grouped as ga
from labsupport.attention import causal_attention
from labsupport.harness.numerics import rel_err

f64 = torch.float64


# ----------------------------------------------------------------------------- MHA / GQA / MQA

@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_grouped_attention_equals_mha_with_repeated_heads_and_sdpa(groups: int) -> None:
    gen = torch.Generator().manual_seed(groups)
    q = torch.randn(2, 8, 11, 4, generator=gen, dtype=f64)
    k, v = (torch.randn(2, groups, 11, 4, generator=gen, dtype=f64) for _ in range(2))
    out = ga.grouped_attention(q, k, v)
    repeated = causal_attention(q, k.repeat_interleave(8 // groups, 1), v.repeat_interleave(8 // groups, 1))
    assert rel_err(out, repeated) < 1e-14
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, sdpa) < 1e-14


def test_n_kv_heads_equal_n_heads_is_plain_mha() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 8, generator=gen, dtype=f64) for _ in range(3))
    assert rel_err(ga.grouped_attention(q, k, v), causal_attention(q, k, v)) < 1e-14
    assert ga.repeat_kv(k, 1) is k


def test_repeat_kv_maps_consecutive_query_heads_to_one_kv_head() -> None:
    k = torch.arange(3.0).view(1, 3, 1, 1)
    assert ga.repeat_kv(k, 2).flatten().tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("heads", "groups", "length"), [(4, 4, 1), (8, 2, 13), (6, 1, 7)])
def test_grouped_decode_step_is_the_last_row_of_full_attention(heads: int, groups: int, length: int) -> None:
    gen = torch.Generator().manual_seed(heads)
    q = torch.randn(2, heads, length, 8, generator=gen, dtype=f64)
    k, v = (torch.randn(2, groups, length, 8, generator=gen, dtype=f64) for _ in range(2))
    step = ga.grouped_decode_step(q[:, :, -1:], k, v)
    assert rel_err(step, ga.grouped_attention(q, k, v)[:, :, -1:]) < 1e-14


def test_grouped_attention_bad_inputs_name_what_was_expected() -> None:
    q = torch.randn(1, 6, 3, 4)
    with pytest.raises(ValueError, match="must divide"):
        ga.grouped_attention(q, torch.randn(1, 4, 3, 4), torch.randn(1, 4, 3, 4))
    with pytest.raises(ValueError, match=r"\(batch, heads, length, head_dim\)"):
        ga.grouped_attention(q[0], q, q)
    with pytest.raises(ValueError, match="k and v must have the same length"):
        ga.grouped_attention(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="one position"):
        ga.grouped_decode_step(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    with pytest.raises(TypeError, match="n_rep must be an int"):
        ga.repeat_kv(q, 1.5)


# ----------------------------------------------------------------------------- MLA

def test_absorb_mla_weights_gives_the_same_scores_and_outputs() -> None:
    gen = torch.Generator().manual_seed(5)
    h, d_model, d_c, d_h, t = 3, 10, 6, 4, 7
    w_q, w_uk, w_uv = (torch.randn(h, a, d_h, generator=gen, dtype=f64) for a in (d_model, d_c, d_c))
    w_o = torch.randn(h, d_h, d_model, generator=gen, dtype=f64)
    x = torch.randn(d_model, generator=gen, dtype=f64)
    c = torch.randn(t, d_c, generator=gen, dtype=f64)
    wq_abs, wo_abs = ga.absorb_mla_weights(w_q, w_uk, w_uv, w_o)
    assert wq_abs.shape == (h, d_model, d_c) and wo_abs.shape == (h, d_c, d_model)
    naive_scores = torch.einsum("hd,htd->ht", torch.einsum("m,hmd->hd", x, w_q), torch.einsum("tc,hcd->htd", c, w_uk))
    absorbed_scores = torch.einsum("hc,tc->ht", torch.einsum("m,hmc->hc", x, wq_abs), c)
    assert rel_err(absorbed_scores, naive_scores) < 1e-14
    p = naive_scores.softmax(-1)
    naive_out = torch.einsum("ht,htd,hdm->m", p, torch.einsum("tc,hcd->htd", c, w_uv), w_o)
    absorbed_out = torch.einsum("ht,tc,hcm->m", p, c, wo_abs)
    assert rel_err(absorbed_out, naive_out) < 1e-14
    with pytest.raises(ValueError, match="incompatible"):
        ga.absorb_mla_weights(w_q, w_uk, w_uv[:, :-1], w_o)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 8, generator=gen, dtype=f64), torch.randn(1, 8, generator=gen, dtype=f64)
    s = [float(ga.rotary(q, torch.tensor([m + 5])) @ ga.rotary(k, torch.tensor([m])).T) for m in (0, 3, 40)]
    assert max(s) - min(s) < 1e-12
    with pytest.raises(ValueError, match="even"):
        ga.rotary(torch.randn(2, 3), torch.arange(2))


def test_grouped_attention_aligns_its_causal_mask_bottom_right():
    # With fewer queries than keys (a chunk of new tokens after a cached prefix), query i sits at position
    # Lk - Lq + i and sees every key up to there; a top-left mask would hide most of the prefix.
    from labsupport.flash.reference import naive_attention
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 3, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = naive_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal=True)
    assert torch.allclose(ga.grouped_attention(q, k, v, causal=True), expected, atol=1e-12)
