"""The sampler: greedy, top-k, top-p, min-p and temperature checked by the support and frequencies
of many seeded draws; per-row generators make a row's samples independent of its batch; logprobs
are log_softmax of the raw logits. Frequencies are compared within 0.03 over 4000 draws (a few
standard errors; the draws are seeded, so the test is deterministic)."""

from __future__ import annotations

import pytest
import torch

from mnemosyne.layers.sampler import SamplingBatch, make_generator, sample

CPU = torch.device("cpu")
NUM_DRAWS = 4000


def _batch(num_rows: int = 1, *, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
           min_p: float = 0.0, seeds: list[int | None] | None = None,
           num_logprobs: list[int | None] | None = None) -> SamplingBatch:
    seeds = seeds if seeds is not None else [0] * num_rows
    return SamplingBatch(
        temperatures=tuple(temperature if s is not None else 0.0 for s in seeds),
        top_ks=(top_k,) * len(seeds),
        top_ps=(top_p,) * len(seeds),
        min_ps=(min_p,) * len(seeds),
        generators=tuple(None if s is None else make_generator(s, CPU) for s in seeds),
        num_logprobs=tuple(num_logprobs) if num_logprobs is not None else (None,) * len(seeds),
    )


def _draws(logits: torch.Tensor, num_draws: int = NUM_DRAWS, **settings) -> torch.Tensor:
    """Token counts [V] of num_draws single-row samples sharing one seeded generator."""
    batch = _batch(**settings)
    counts = torch.zeros(logits.shape[-1], dtype=torch.int64)
    for _ in range(num_draws):
        counts[sample(logits.unsqueeze(0), batch).token_ids[0]] += 1
    return counts


def _support(counts: torch.Tensor) -> set[int]:
    return set(torch.nonzero(counts).flatten().tolist())


# Token probabilities out of order (so a sort/scatter mix-up shows) and with no ties:
# sorted, 0.40, 0.25, 0.20, 0.10, 0.05, with cumulative mass 0.40, 0.65, 0.85, 0.95, 1.00.
PROBS = torch.tensor([0.10, 0.40, 0.05, 0.25, 0.20])
LOGITS = PROBS.log() + 3.0  # a shift changes nothing


def test_greedy_is_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, _batch(seeds=[None] * 6))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


def test_greedy_rows_stay_argmax_beside_sampled_rows() -> None:
    logits = torch.zeros(3, 20)
    logits[:, 7] = 1.0  # the argmax, but only ~1/8 likely when sampled
    for step in range(20):
        out = sample(logits, _batch(seeds=[None, step, None]))
        assert out.token_ids[0] == 7 and out.token_ids[2] == 7


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_top_k_keeps_exactly_k_tokens(top_k: int) -> None:
    counts = _draws(LOGITS, top_k=top_k, num_draws=1500)
    assert _support(counts) == set(PROBS.argsort(descending=True)[:top_k].tolist())


def test_top_k_at_or_above_vocab_keeps_everything() -> None:
    logits = torch.zeros(8)
    assert _support(_draws(logits, top_k=8, num_draws=500)) == set(range(8))
    assert _support(_draws(logits, top_k=100, num_draws=500)) == set(range(8))


def test_top_k_renormalises_the_kept_mass() -> None:
    counts = _draws(LOGITS, top_k=2)
    kept = torch.tensor([0.0, 0.40, 0.0, 0.25, 0.0])
    torch.testing.assert_close(counts / NUM_DRAWS, kept / kept.sum(), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        (0.30, {1}),  # 0.40 alone reaches it
        (0.60, {1, 3}),  # 0.40 does not, 0.65 does
        (0.70, {1, 3, 4}),
        (0.90, {1, 3, 4, 0}),
        (0.97, {0, 1, 2, 3, 4}),
        (1.00, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p: float, kept: set[int]) -> None:
    counts = _draws(LOGITS, top_p=top_p, num_draws=2000)
    assert _support(counts) == kept
    mass = torch.zeros(5)
    mass[list(kept)] = PROBS[list(kept)]
    torch.testing.assert_close(counts / 2000, mass / mass.sum(), atol=0.035, rtol=0)


@pytest.mark.parametrize(
    ("min_p", "kept"),
    [
        (0.0, {0, 1, 2, 3, 4}),
        (0.2, {0, 1, 3, 4}),  # threshold 0.08: 0.05 goes
        (0.3, {1, 3, 4}),  # threshold 0.12: 0.10 goes
        (0.55, {1, 3}),  # threshold 0.22: 0.20 goes
        (0.9, {1}),
    ],
)
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p: float, kept: set[int]) -> None:
    assert _support(_draws(LOGITS, min_p=min_p, num_draws=2000)) == kept


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(temperature: float) -> None:
    counts = _draws(LOGITS, temperature=temperature)
    want = torch.softmax(LOGITS / temperature, dim=-1)
    torch.testing.assert_close(counts / NUM_DRAWS, want, atol=0.03, rtol=0)


def test_temperature_sharpens_and_flattens() -> None:
    cold, hot = _draws(LOGITS, temperature=0.3), _draws(LOGITS, temperature=3.0)
    top = int(PROBS.argmax())
    assert cold[top] > 0.6 * NUM_DRAWS > hot[top]
    assert hot.min() > cold.min()


def test_same_seed_same_samples_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    vocab, num_steps = 64, 30
    steps = [torch.randn(4, vocab, generator=gen) for _ in range(num_steps)]

    alone = _batch(seeds=[1234], top_k=20, top_p=0.9)
    # The same request at row 2, beside a greedy row and two rows with other seeds and settings.
    mixed = SamplingBatch(
        temperatures=(0.0, 0.7, 1.0, 1.3),
        top_ks=(-1, 5, 20, -1),
        top_ps=(1.0, 1.0, 0.9, 0.5),
        min_ps=(0.0, 0.1, 0.0, 0.0),
        generators=(None, make_generator(7, CPU), make_generator(1234, CPU), make_generator(99, CPU)),
        num_logprobs=(None, 2, None, 5),
    )
    alone_ids = [int(sample(logits[2:3], alone).token_ids[0]) for logits in steps]
    mixed_ids = [int(sample(logits, mixed).token_ids[2]) for logits in steps]
    assert alone_ids == mixed_ids
    assert len(set(alone_ids)) > 3  # it really sampled

    other_seed = _batch(seeds=[4321], top_k=20, top_p=0.9)
    assert [int(sample(logits[2:3], other_seed).token_ids[0]) for logits in steps] != alone_ids


def test_make_generator_is_reproducible() -> None:
    a, b = make_generator(5, CPU), make_generator(5, CPU)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) * 3
    # Tempered and filtered rows still report logprobs under the raw distribution.
    batch = SamplingBatch(
        temperatures=(0.0, 0.5, 2.0),
        top_ks=(-1, 5, -1),
        top_ps=(1.0, 1.0, 0.8),
        min_ps=(0.0, 0.0, 0.05),
        generators=(None, make_generator(1, CPU), make_generator(2, CPU)),
        num_logprobs=(3, 0, None),
    )
    out = sample(logits, batch)
    want = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    torch.testing.assert_close(out.logprobs.double(), want.gather(1, out.token_ids.unsqueeze(1)).squeeze(1),
                               atol=1e-6, rtol=0)
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.top_token_ids.shape == out.top_logprobs.shape == (3, 3)  # the largest request wins
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])  # sorted, most likely first
    want_top = want.topk(3, dim=-1)
    assert torch.equal(out.top_token_ids, want_top.indices)
    torch.testing.assert_close(out.top_logprobs.double(), want_top.values, atol=1e-6, rtol=0)


def test_zero_logprobs_gives_the_chosen_token_but_no_alternatives() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    out = sample(logits, _batch(seeds=[None, None], num_logprobs=[0, None]))
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1).gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_token_ids is None and out.top_logprobs is None


def test_sampling_never_picks_a_zero_probability_token() -> None:
    logits = torch.full((10,), float("-inf"))
    logits[[2, 5]] = torch.tensor([0.0, 0.5])
    assert _support(_draws(logits, temperature=1.5, num_draws=500)) == {2, 5}
