"""Chapter 08's second-edition mechanisms: BD3-LM's exact block cache, LLaDA's classifier-free guidance, ReMDM-style
revision of committed tokens, and speculative decoding of the AR model (exact acceptance rule)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from labsupport import diffusion as dif
from labsupport.diffusion import speculative as spec
from labsupport.diffusion.cache import ExactBlockCache, block_causal_logits
from labsupport.diffusion.exercises import check_speculative_verify
from labsupport.lm.model import TinyLM

VOCAB, LENGTH, PROMPT = 9, 32, 8


@pytest.fixture(scope="module")
def model() -> dif.MaskedDenoiser:
    torch.manual_seed(0)
    m = dif.MaskedDenoiser(VOCAB, 32, 2, max_len=LENGTH)
    with torch.no_grad():
        m.backbone.head.weight.mul_(20)
    return m.eval()


def canvas(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(1))
    c = clean.clone()
    c[:, PROMPT:] = VOCAB
    return clean, c


def finite_equal(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    same_inf = torch.equal(torch.isinf(a), torch.isinf(b))
    return same_inf and float((a - b).nan_to_num(0, 0, 0).abs().max()) <= atol


# ----------------------------------------------------------------------------- BD3-LM's exact block cache

def test_exact_cache_equals_the_uncached_block_causal_forward_block_after_block(model) -> None:
    clean, c = canvas()
    cache = ExactBlockCache(model)
    cache.append_clean(clean[:, :PROMPT])
    starts = [PROMPT]
    for s in range(PROMPT, LENGTH, 8):
        block = c[:, s:s + 8].clone()
        block[:, :3] = clean[:, s:s + 3]                       # a block part-way through its steps
        prefix = torch.cat([clean[:, :s], block], dim=1)
        reference = block_causal_logits(model, prefix, starts)[:, s:s + 8]
        assert finite_equal(cache.block_logits(block), reference)
        cache.append_clean(clean[:, s:s + 8])                  # finished: its clean tokens' keys and values
        starts.append(s + 8)
    assert cache.length == LENGTH


def test_block_causal_forward_hides_later_blocks_and_sees_earlier_ones(model) -> None:
    clean, _ = canvas(1)
    logits = block_causal_logits(model, clean, [PROMPT, PROMPT + 8])
    changed = clean.clone()
    changed[:, PROMPT + 8:] = (changed[:, PROMPT + 8:] + 1) % VOCAB       # change the last block only
    again = block_causal_logits(model, changed, [PROMPT, PROMPT + 8])
    assert finite_equal(logits[:, :PROMPT + 8], again[:, :PROMPT + 8], atol=0)
    noisy = clean.clone()
    noisy[:, PROMPT + 8:] = VOCAB                                         # the last block still masked
    changed = noisy.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB                           # the prompt is seen by every block
    before = block_causal_logits(model, noisy, [PROMPT, PROMPT + 8])
    after = block_causal_logits(model, changed, [PROMPT, PROMPT + 8])
    assert not torch.allclose(before[:, -1, :VOCAB], after[:, -1, :VOCAB])


def test_exact_cached_sampler_equals_the_uncached_block_causal_sampler_at_less_work(model) -> None:
    _, c = canvas()
    kwargs = dict(steps=12, block_length=8, attention="block_causal", temperature=1.0)
    cached = dif.diffusion_sample(model, c, cache="exact", generator=torch.Generator().manual_seed(3), **kwargs)
    uncached = dif.diffusion_sample(model, c, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert not bool((cached.tokens == VOCAB).any())
    # cached: the prompt and each finished block once, plus each step's block; uncached: the whole prefix per step
    assert cached.forward_tokens == 3 * (LENGTH - 8 + 12 * 8)
    assert cached.forward_tokens < uncached.forward_tokens


def test_exact_cache_and_block_causal_refuse_what_they_cannot_do(model) -> None:
    _, c = canvas()
    with pytest.raises(ValueError, match="block_causal"):
        dif.diffusion_sample(model, c, steps=8, block_length=8, cache="exact")
    with pytest.raises(ValueError, match="block_length"):
        dif.diffusion_sample(model, c, steps=8, attention="block_causal")
    with pytest.raises(ValueError, match="cache must be one of"):
        dif.diffusion_sample(model, c, steps=8, block_length=8, cache="fast")
    with pytest.raises(ValueError, match="no mask_id"):
        ExactBlockCache(model).append_clean(c[:, :12])
    with pytest.raises(TypeError, match="MaskedDenoiser"):
        ExactBlockCache(TinyLM(5, 16, 1, 8))


# ----------------------------------------------------------------------------- LLaDA's classifier-free guidance

def test_guidance_zero_is_plain_sampling_and_the_formula_holds_at_the_masks(model) -> None:
    _, c = canvas()
    plain = dif.diffusion_sample(model, c, steps=6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    zero = dif.diffusion_sample(model, c, steps=6, temperature=1.0, generator=torch.Generator().manual_seed(5),
                                guidance=0.0)
    assert torch.equal(plain.tokens, zero.tokens)
    prompt = c != VOCAB
    w = 1.5
    guided = dif.guided_logits(model, c, prompt, w)
    with torch.no_grad():
        cond = model(c)[..., :VOCAB].log_softmax(-1)
        uncond = model(c.masked_fill(prompt, VOCAB))[..., :VOCAB].log_softmax(-1)
    expected = (1 + w) * cond - w * uncond
    assert torch.allclose(guided[:, PROMPT:, :VOCAB], expected[:, PROMPT:], atol=1e-5)
    assert bool(torch.isinf(guided[..., VOCAB]).all())                       # never predicts [MASK]
    assert finite_equal(guided[:, :PROMPT], model(c)[:, :PROMPT].detach(), atol=0)   # given tokens copied
    # guidance changes the answer and doubles the rows each step processes
    out = dif.diffusion_sample(model, c, steps=6, temperature=1.0, generator=torch.Generator().manual_seed(5),
                               guidance=w)
    assert out.forward_tokens == 2 * plain.forward_tokens
    assert not bool((out.tokens == VOCAB).any())


def test_guidance_refuses_bad_settings(model) -> None:
    _, c = canvas()
    with pytest.raises(ValueError, match="scale"):
        dif.guided_logits(model, c, c != VOCAB, -1.0)
    with pytest.raises(ValueError, match="prompt"):
        dif.guided_logits(model, c, (c != VOCAB).long(), 1.0)
    with pytest.raises(ValueError, match="guidance"):
        dif.diffusion_sample(model, c, steps=8, block_length=8, cache=True, guidance=1.0)


# ----------------------------------------------------------------------------- ReMDM-style revision

def test_revision_without_a_loop_is_low_confidence_sampling(model) -> None:
    _, c = canvas()
    for temperature in (0.0, 1.0):
        plain = dif.diffusion_sample(model, c, steps=8, temperature=temperature,
                                     generator=torch.Generator().manual_seed(7))
        revised = dif.revision_sample(model, c, steps=8, loop_steps=0, remask=4, temperature=temperature,
                                      generator=torch.Generator().manual_seed(7))
        assert torch.equal(plain.tokens, revised.tokens)


def test_revision_remasks_committed_tokens_and_still_finishes(model) -> None:
    clean, c = canvas()
    trace = dif.revision_sample(model, c, steps=16, loop_steps=8, remask=3, temperature=1.0,
                                generator=torch.Generator().manual_seed(2), record=True)
    masks = [int((f == VOCAB).sum(dim=1)[0]) for f in trace.frames]
    n = LENGTH - PROMPT
    assert masks[7] == 3 and masks[8:15] == [3] * 7 and masks[-1] == 0    # loop: 3 remasked, 3 re-decoded
    assert masks[:7] == [n - 3 * (k + 1) for k in range(7)]
    assert torch.equal(trace.tokens[:, :PROMPT], clean[:, :PROMPT])       # the prompt is never remasked
    assert trace.steps == 16 and trace.forward_tokens == 16 * c.numel()
    # something was revised: a position's last commit came in the loop although it was first decoded earlier
    assert bool((trace.commit_step[:, PROMPT:] >= 8).any())


def test_remask_tokens_takes_the_highest_scores_among_the_eligible_only() -> None:
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    eligible = torch.tensor([[False, True, True, True, False, True]])
    score = torch.tensor([[9.0, 0.1, 0.5, 0.3, 8.0, 0.2]])
    out, chosen = dif.remask_tokens(x, eligible, score, 2, 0)
    assert out.tolist() == [[1, 2, 0, 0, 5, 6]] and chosen.sum() == 2
    out, _ = dif.remask_tokens(x, eligible, score, 10, 0)                  # more than eligible: all of them
    assert out.tolist() == [[1, 0, 0, 0, 5, 0]]
    with pytest.raises(ValueError, match="eligible"):
        dif.remask_tokens(x, eligible.long(), score, 1, 0)


def test_revision_refuses_bad_settings(model) -> None:
    _, c = canvas()
    with pytest.raises(ValueError, match="loop_steps"):
        dif.revision_sample(model, c, steps=4, loop_steps=4, remask=1)
    with pytest.raises(ValueError, match="choose"):
        dif.revision_sample(model, c, steps=4, loop_steps=1, remask=1, choose="worst")


# ----------------------------------------------------------------------------- speculative decoding

@pytest.fixture(scope="module")
def target() -> TinyLM:
    torch.manual_seed(3)
    m = TinyLM(3, 16, 1, 12, n_heads=2)
    with torch.no_grad():
        m.head.weight.mul_(6.0)
    return m.eval()


def test_causal_cache_extends_several_positions_like_the_full_forward(target) -> None:
    tokens = torch.randint(0, 3, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = spec.CausalCache(target)
    parts = [cache.extend(tokens[:, :5]), cache.extend(tokens[:, 5:9])]
    full = target(tokens[:, :9]).detach()
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    cache.truncate(6)
    assert torch.allclose(cache.extend(tokens[:, 6:12]), target(tokens).detach()[:, 6:], atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        cache.extend(tokens[:, :1])


def test_one_round_emits_exactly_the_target_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.rand(7, generator=gen, dtype=torch.float64) ** 3
        q = torch.rand(7, generator=gen, dtype=torch.float64) ** 3
        p, q = p / p.sum(), q / q.sum()
        assert torch.allclose(spec.round_output_distribution(p, q), p, atol=1e-12)
    # the proof can fail: redrawing a rejected token from p (not the residual) is biased towards q
    p, q = torch.tensor([0.2, 0.8], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    wrong = torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * p
    assert not torch.allclose(wrong, p, atol=1e-3)


def test_verify_draft_reference_passes_its_checker() -> None:
    assert check_speculative_verify(spec.verify_draft)


def _exact_continuations(target: TinyLM, prompt: list[int], n: int) -> dict[tuple[int, ...], float]:
    probs = {}
    for tail in itertools.product(range(3), repeat=n):
        seq = torch.tensor([prompt + list(tail)])
        log_p = target(seq[:, :-1]).detach().double().log_softmax(-1)[0]
        picked = log_p[len(prompt) - 1:].gather(-1, torch.tensor(tail)[:, None]).sum()
        probs[tail] = math.exp(float(picked))
    return probs


def _chi_square(target: TinyLM, rule=None, samples: int = 1500) -> float:
    prompt, n = [0, 2], 3
    exact = _exact_continuations(target, prompt, n)

    def skewed(context: torch.Tensor) -> torch.Tensor:              # a draft far from the target
        return torch.tensor([0.75, 0.2, 0.05], dtype=torch.float64)

    counts = dict.fromkeys(exact, 0)
    gen = torch.Generator().manual_seed(11)
    original = spec.verify_draft
    try:
        if rule is not None:
            spec.verify_draft = rule
        for _ in range(samples):
            out = spec.speculative_generate(target, skewed, torch.tensor([prompt]), n, draft_length=2,
                                            temperature=1.0, generator=gen)
            counts[tuple(out.tokens[0, 2:].tolist())] += 1
    finally:
        spec.verify_draft = original
    return sum((counts[k] - samples * p) ** 2 / (samples * p) for k, p in exact.items())


CHI2_26_P001 = 54.05   # the 0.999 quantile of chi-square with 26 degrees of freedom (27 continuations)


def test_speculative_sampling_has_the_target_distribution_statistically(target) -> None:
    assert _chi_square(target) < CHI2_26_P001


def test_the_statistical_check_catches_a_biased_rule(target) -> None:
    right = spec.verify_draft

    def redraw_from_p(p, q, drafted, u):
        n, probs = right(p, q, drafted, u)
        return n, (p[int(n)].clone() if int(n) < drafted.shape[0] else probs)

    assert _chi_square(target, rule=redraw_from_p) > CHI2_26_P001


def test_greedy_speculative_decoding_is_greedy_decoding(target) -> None:
    prompt = torch.tensor([[1, 0, 2]])
    drafter = spec.NGramDrafter(torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(2)), 3, order=3)
    out = spec.speculative_generate(target, drafter, prompt, 9, draft_length=3, temperature=0.0)
    assert torch.equal(out.tokens, dif.ar_generate(target, prompt, 9))
    assert out.target_calls <= 9 and out.drafted >= out.accepted


def test_ngram_drafter_backs_off_and_never_gives_zero() -> None:
    text = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3])
    drafter = spec.NGramDrafter(text, 5, order=3, beta=1.0)
    after_01 = drafter(torch.tensor([0, 1]))
    assert after_01.argmax() == 2 and bool((after_01 > 0).all()) and abs(float(after_01.sum()) - 1) < 1e-12
    unseen = drafter(torch.tensor([4, 4]))                 # never seen: the unigram with its prior
    assert abs(float(unseen.sum()) - 1) < 1e-12 and unseen.argmax() in (0, 1)
    with pytest.raises(ValueError, match="ids in 0..4"):
        spec.NGramDrafter(torch.tensor([0, 7, 1]), 5, order=2)


def test_speculative_generate_refuses_bad_inputs(target) -> None:
    def uniform(context: torch.Tensor) -> torch.Tensor:
        return torch.full((3,), 1 / 3, dtype=torch.float64)

    with pytest.raises(ValueError, match="batch 1"):
        spec.speculative_generate(target, uniform, torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_len"):
        spec.speculative_generate(target, uniform, torch.zeros(1, 3, dtype=torch.long), 20)
    with pytest.raises(TypeError, match="drafter"):
        spec.speculative_generate(target, None, torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="drafted"):
        spec.verify_draft(torch.rand(3, 3), torch.rand(2, 3), torch.tensor([0.0, 1.0]), torch.rand(2))
