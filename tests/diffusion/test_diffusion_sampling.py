"""labsupport.diffusion.sampling and cache: schedules, commits, every sampler's invariants, infilling, the cache."""

from __future__ import annotations

import pytest
import torch

from labsupport.diffusion import BlockKVCache, MaskedDenoiser
from labsupport.diffusion import sampling as s
from labsupport.lm.model import TinyLM

VOCAB, LENGTH = 9, 24


@pytest.fixture(scope="module")
def model() -> MaskedDenoiser:
    torch.manual_seed(0)
    m = MaskedDenoiser(VOCAB, 32, 2, max_len=LENGTH)
    with torch.no_grad():  # sharper predictions than the initialisation gives, so confidences differ
        m.backbone.head.weight.mul_(40)
    return m.eval()


def canvas_with_prompt(prompt_len: int = 8, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(1))
    canvas = clean.clone()
    canvas[:, prompt_len:] = VOCAB
    return clean, canvas


def test_transfer_schedule_shares_evenly_remainder_first() -> None:
    assert s.transfer_schedule(10, 4).tolist() == [3, 3, 2, 2]
    assert s.transfer_schedule(3, 5).tolist() == [1, 1, 1, 0, 0]
    assert s.transfer_schedule(0, 2).tolist() == [0, 0]
    assert s.transfer_schedule(10, 4).dtype == torch.long
    with pytest.raises(ValueError, match="steps"):
        s.transfer_schedule(4, 0)


def test_commit_tokens_picks_the_most_confident_masked_positions_only() -> None:
    canvas = torch.tensor([[7, 9, 9, 3, 9]])
    predicted = torch.tensor([[1, 2, 4, 5, 6]])
    confidence = torch.tensor([[0.99, 0.2, 0.8, 0.95, 0.5]])  # the unmasked positions are the most confident
    new, now = s.commit_tokens(canvas, predicted, confidence, torch.tensor([2]), torch.ones_like(now_mask := canvas,
                                                                                                  dtype=torch.bool), 9)
    assert new.tolist() == [[7, 9, 4, 3, 6]]
    assert now.tolist() == [[False, False, True, False, True]]
    assert now_mask.tolist() == [[7, 9, 9, 3, 9]]  # input untouched


SAMPLERS = [
    dict(steps=16, remasking="low_confidence"),
    dict(steps=16, remasking="random"),
    dict(steps=4, remasking="low_confidence"),
    dict(steps=16, remasking="low_confidence", block_length=4),
    dict(steps=8, remasking="random", block_length=8),
    dict(steps=16, remasking="low_confidence", block_length=4, cache=True),
    dict(steps=16, remasking="random", temperature=1.0),
]


@pytest.mark.parametrize("kwargs", SAMPLERS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_no_sampler_ever_changes_a_committed_or_given_token(model, kwargs) -> None:
    clean, canvas = canvas_with_prompt()
    trace = s.diffusion_sample(model, canvas, record=True, generator=torch.Generator().manual_seed(2), **kwargs)
    assert trace.steps == kwargs["steps"] and len(trace.frames) == kwargs["steps"]
    assert torch.equal(trace.tokens[:, :8], clean[:, :8])
    assert not bool((trace.tokens == VOCAB).any())
    previous = canvas
    for frame in trace.frames:
        fixed = previous != VOCAB
        assert torch.equal(frame[fixed], previous[fixed])
        previous = frame
    assert torch.equal(trace.frames[-1], trace.tokens)
    generated = canvas == VOCAB
    assert bool((trace.commit_step[generated] >= 0).all()) and bool((trace.commit_step[~generated] == -1).all())
    # each step commits what the transfer schedule says
    per_step = torch.stack([(trace.commit_step == k).sum(dim=1) for k in range(trace.steps)])
    assert int(per_step.sum()) == int(generated.sum())


def test_blocks_are_finished_left_to_right(model) -> None:
    _, canvas = canvas_with_prompt(prompt_len=8)
    trace = s.diffusion_sample(model, canvas, steps=8, block_length=4, record=True)
    for frame in trace.frames:
        open_blocks = [b for b in range(2, 6) if bool((frame[:, 4 * b:4 * b + 4] == VOCAB).any())]
        if open_blocks:  # everything after the first unfinished block is still masked
            first = open_blocks[0]
            assert bool((frame[:, 4 * (first + 1):] == VOCAB).all())


def test_low_confidence_commits_the_argmax_of_its_most_confident_position_first(model) -> None:
    _, canvas = canvas_with_prompt()
    probs = model(canvas).softmax(-1)
    confidence, predicted = probs.max(-1)
    confidence[canvas != VOCAB] = -1
    first = confidence.argmax(dim=1)
    trace = s.diffusion_sample(model, canvas, steps=16)
    rows = torch.arange(canvas.shape[0])
    assert bool((trace.commit_step[rows, first] == 0).all())
    assert torch.equal(trace.tokens[rows, first], predicted[rows, first])


def test_infilling_keeps_both_ends(model) -> None:
    clean = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    canvas = s.infill_canvas(clean, 8, 16, VOCAB)
    assert bool((canvas[:, 8:16] == VOCAB).all()) and torch.equal(canvas[:, :8], clean[:, :8])
    for kwargs in (dict(steps=8), dict(steps=2, remasking="random"), dict(steps=4, block_length=4, cache=True)):
        out = s.diffusion_sample(model, canvas, **kwargs).tokens
        assert torch.equal(out[:, :8], clean[:, :8]) and torch.equal(out[:, 16:], clean[:, 16:])
        assert not bool((out == VOCAB).any())
    with pytest.raises(ValueError, match="end"):
        s.infill_canvas(clean, 8, 30, VOCAB)


def test_the_cache_is_exact_right_after_a_refresh_and_close_after(model) -> None:
    _, canvas = canvas_with_prompt()
    cache = BlockKVCache(model)
    full = cache.refresh(canvas)
    assert torch.allclose(full, model(canvas), atol=1e-5)
    window = cache.window(canvas[:, 8:12], 8)
    assert torch.allclose(window, model(canvas)[:, 8:12], atol=1e-5)
    assert cache.nbytes == 2 * 2 * 3 * LENGTH * 32 * 4  # 2 layers × (K, V) × B × L × d_model × fp32
    with pytest.raises(ValueError, match="does not fit"):
        cache.window(canvas[:, :8], 20)


def test_cached_sampling_does_less_work(model) -> None:
    _, canvas = canvas_with_prompt()
    plain = s.diffusion_sample(model, canvas, steps=16, block_length=4)
    cached = s.diffusion_sample(model, canvas, steps=16, block_length=4, cache=True)
    assert cached.forward_tokens < plain.forward_tokens / 2
    assert float((cached.tokens == plain.tokens).float().mean()) > 0.7


def test_sampler_refuses_bad_settings(model) -> None:
    _, canvas = canvas_with_prompt()
    with pytest.raises(ValueError, match="block_length"):
        s.diffusion_sample(model, canvas, steps=4, cache=True)
    with pytest.raises(ValueError, match="fewer than"):
        s.diffusion_sample(model, canvas, steps=2, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        s.diffusion_sample(model, canvas, steps=4, remasking="worst")
    ragged = canvas.clone()
    ragged[0, 8] = 1
    with pytest.raises(ValueError, match="same number of masks"):
        s.diffusion_sample(model, ragged, steps=4)
    with pytest.raises(TypeError, match="mask_id"):
        s.diffusion_sample(torch.nn.Identity(), canvas, steps=4)
    with pytest.raises(ValueError, match="int64"):
        s.diffusion_sample(model, canvas.float(), steps=4)
    with pytest.raises(TypeError, match="MaskedDenoiser"):
        BlockKVCache(torch.nn.Linear(2, 2))


def test_random_remasking_is_reproducible_with_a_generator(model) -> None:
    _, canvas = canvas_with_prompt()
    a = s.diffusion_sample(model, canvas, steps=8, remasking="random", generator=torch.Generator().manual_seed(4))
    b = s.diffusion_sample(model, canvas, steps=8, remasking="random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.commit_step, b.commit_step)


def test_ar_generate_greedy_equals_tinylm_generate() -> None:
    torch.manual_seed(0)
    ar = TinyLM(VOCAB, 32, 2, LENGTH).eval()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(s.ar_generate(ar, prompt, 7), ar.generate(prompt, 7))
    sampled = s.ar_generate(ar, prompt, 7, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 12) and torch.equal(sampled[:, :5], prompt)
    with pytest.raises(TypeError, match="causal TinyLM"):
        s.ar_generate(torch.nn.Identity(), prompt, 3)


def test_a_fully_masked_canvas_is_filled(model) -> None:
    canvas = torch.full((2, LENGTH), VOCAB)
    for kwargs in (dict(steps=LENGTH), dict(steps=6, block_length=8, cache=True), dict(steps=3, remasking="random")):
        trace = s.diffusion_sample(model, canvas, **kwargs)
        assert not bool((trace.tokens == VOCAB).any()) and bool((trace.commit_step >= 0).all())


def test_commit_and_schedule_at_long_length() -> None:
    length = 65_536
    gen = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 5, (1, length), generator=gen)
    canvas[:, ::2] = 5
    confidence = torch.rand(1, length, generator=gen, dtype=torch.float64).half()  # ties in half precision
    new, now = s.commit_tokens(canvas, torch.zeros_like(canvas), confidence, torch.tensor([1000]),
                               torch.ones_like(canvas, dtype=torch.bool), 5)
    assert int(now.sum()) == 1000 and bool((canvas[now] == 5).all())
    assert torch.equal(new[canvas != 5], canvas[canvas != 5])
    assert int(s.transfer_schedule(length // 2, 64).sum()) == length // 2


def test_commit_tokens_refuses_counts_of_the_wrong_length_and_mismatched_shapes() -> None:
    canvas = torch.full((2, 6), VOCAB)
    predicted = torch.zeros(2, 6, dtype=torch.long)
    confidence = torch.rand(2, 6)
    allowed = torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"one count per row"):
        s.commit_tokens(canvas, predicted, confidence, torch.tensor([1, 1, 1]), allowed, VOCAB)
    with pytest.raises(ValueError, match=r"one count per row"):
        s.commit_tokens(canvas, predicted, confidence, torch.tensor([1.0, 1.0]), allowed, VOCAB)
    with pytest.raises(ValueError, match="confidence must have the canvas's shape"):
        s.commit_tokens(canvas, predicted, confidence[:, :5], torch.tensor([1, 1]), allowed, VOCAB)
    with pytest.raises(ValueError, match="≥ 0"):
        s.commit_tokens(canvas, predicted, confidence, torch.tensor([1, -1]), allowed, VOCAB)


@pytest.mark.parametrize("prompt", [0, 3, 8, 13])
@pytest.mark.parametrize("per_step, block, cached", [(1, None, False), (3, None, False), (2, 8, False),
                                                     (2, 8, True), (1, 4, True), (3, 5, True), (2, 16, True)])
def test_denoising_work_counts_what_the_sampler_does_for_any_prompt(model, prompt, per_step, block, cached) -> None:
    from labsupport.harness.costs import denoising_work

    new = LENGTH - prompt
    _, canvas = canvas_with_prompt(prompt, batch=1)
    work = denoising_work(prompt, new, per_step, block_length=block, cached=cached)
    trace = s.diffusion_sample(model, canvas, steps=work["steps"], block_length=block, cache=cached)
    assert (trace.steps, trace.forward_tokens) == (work["steps"], work["positions"])
    assert bool((trace.tokens != VOCAB).all())


def test_threshold_sampling_commits_by_confidence_and_always_progresses(model) -> None:
    _, canvas = canvas_with_prompt(8, batch=3)
    one_at_a_time = s.threshold_sample(model, canvas, threshold=1.0)
    assert one_at_a_time.steps == 16 and bool((one_at_a_time.tokens != VOCAB).all())
    # threshold 1 commits only the single surest prediction per step: greedy low-confidence at 1 token per step
    reference = s.diffusion_sample(model, canvas, steps=16)
    assert torch.equal(one_at_a_time.tokens, reference.tokens)
    everything = s.threshold_sample(model, canvas, threshold=1e-9)
    assert everything.steps == 1
    middle = s.threshold_sample(model, canvas, threshold=0.5, block_length=4)
    assert 4 <= middle.steps <= 16
    assert torch.equal(middle.tokens[:, :8], canvas[:, :8])
    given = canvas != VOCAB
    assert bool((middle.commit_step[given] == -1).all())
    # every commit clears the threshold, except the one forced commit of a step where nothing did
    for step in range(middle.steps):
        for row in range(canvas.shape[0]):
            now = middle.commit_step[row] == step
            assert bool((middle.confidence[row][now] >= 0.5).all()) or int(now.sum()) == 1
    with pytest.raises(ValueError, match="threshold"):
        s.threshold_sample(model, canvas, threshold=0.0)
    with pytest.raises(RuntimeError, match="max_steps"):
        s.threshold_sample(model, canvas, threshold=1.0, max_steps=3)


def test_recorded_candidates_are_the_top_predictions_before_each_commit(model) -> None:
    _, canvas = canvas_with_prompt(8, batch=2)
    trace = s.diffusion_sample(model, canvas, steps=4, record=True)
    assert len(trace.candidates) == len(trace.frames) == 4
    ids, probs = trace.candidates[0]
    expected = model(canvas).softmax(-1).topk(3, dim=-1)
    assert torch.equal(ids, expected.indices) and torch.allclose(probs, expected.values)
    # what step 0 committed is each committed position's top candidate (greedy)
    now = trace.commit_step == 0
    assert torch.equal(trace.tokens[now], ids[..., 0][now])
