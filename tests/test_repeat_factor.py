"""Tests for repeat_factor.py: LVIS factors against the formula, per-epoch counts, sharding and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from augmentation import sample_rng
from batching import ResumableSampler, _copy_words
from repeat_factor import RepeatFactorSampler, repeat_factors, tag_image_frequencies


def _random_image_tags(num_images: int, num_tags: int, seed: int) -> list[list[int]]:
    """Per-image tag lists with a Zipf-like tag distribution (some tags rare, some untagged images)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_tags + 1) ** 1.3
    weights /= weights.sum()
    out = []
    for _ in range(num_images):
        k = int(rng.integers(0, 6))
        out.append(sorted(set(rng.choice(num_tags, size=k, p=weights).tolist())))
    return out


def test_factors_match_the_lvis_formula_computed_by_loops() -> None:
    """f_t = images with t / N; r(i) = max(1, max_t sqrt(th / f_t)); duplicate tags count once."""
    tags = _random_image_tags(300, 40, seed=1)
    tags[7] = [3, 3, 3]  # a duplicated tag must not raise f_3
    tags[8] = []
    threshold = 0.05
    freq = tag_image_frequencies(tags, 40)
    for t in range(40):
        assert freq[t] == sum(1 for image in tags if t in image) / 300
    got = repeat_factors(tags, 40, threshold)
    for i, image in enumerate(tags):
        expected = max([1.0] + [max(1.0, math.sqrt(threshold / freq[t])) for t in set(image)])
        assert got[i] == pytest.approx(expected, rel=1e-15)
    assert got[8] == 1.0
    assert (got > 1.0).any() and (got == 1.0).any()
    with pytest.raises(ValueError, match="tag indices"):
        repeat_factors([[0, 40]], 40, 0.1)
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors(tags, 40, 0.0)


def test_integer_factors_repeat_exactly() -> None:
    """Integer r: every epoch holds each image exactly r times, and the epoch length is sum r."""
    factors = np.array([1, 2, 3, 1, 4, 1, 2, 2], dtype=np.float64)
    sampler = RepeatFactorSampler(factors, batch_size=4, seed=5)
    assert sampler.effective_epoch_length == 16
    for epoch in range(5):
        np.testing.assert_array_equal(sampler.repeat_counts(epoch), factors.astype(np.int64))
        sampler.set_epoch(epoch)
        got = np.bincount([key[0] for key in sampler], minlength=8)  # 16 = 4 batches: nothing dropped
        np.testing.assert_array_equal(got, factors.astype(np.int64))


def test_fractional_counts_are_floor_or_ceil_with_mean_r() -> None:
    """Each epoch gives floor(r) or ceil(r); the mean over many epochs is r within 5 standard errors."""
    rng = np.random.default_rng(2)
    factors = 1.0 + rng.random(60) * 3.0
    factors[:5] = [1.0, 1.5, 2.25, 3.999, 1.001]
    sampler = RepeatFactorSampler(factors, batch_size=8, seed=11)
    epochs = 1500
    counts = np.stack([sampler.repeat_counts(e) for e in range(epochs)])  # (E, N)
    assert ((counts == np.floor(factors)) | (counts == np.ceil(factors))).all()
    totals = counts.sum(1)
    assert set(totals.tolist()) <= {math.floor(factors.sum()), math.ceil(factors.sum())}
    frac = factors - np.floor(factors)
    stderr = np.sqrt(frac * (1.0 - frac) / epochs)
    assert (np.abs(counts.mean(0) - factors) <= 5.0 * stderr + 1e-12).all()
    # Not vacuous: the rounding does vary between epochs.
    assert counts[:, 1].min() == 1 and counts[:, 1].max() == 2


def test_same_seed_same_order_and_epochs_differ() -> None:
    """Same (seed, epoch) gives the same keys; another epoch or seed gives another order."""
    factors = repeat_factors(_random_image_tags(200, 30, seed=3), 30, 0.1)

    def keys(seed: int, epoch: int) -> list[tuple[int, int]]:
        sampler = RepeatFactorSampler(factors, batch_size=5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert keys(7, 2) == keys(7, 2)
    assert keys(7, 2) != keys(7, 3)
    assert keys(7, 2) != keys(8, 2)
    assert all(key[1] == 2 for key in keys(7, 2))


def test_ranks_partition_the_epoch() -> None:
    """The ranks' keys are disjoint slices whose union is the (truncated) epoch expansion."""
    factors = repeat_factors(_random_image_tags(150, 25, seed=4), 25, 0.2)
    world, batch = 3, 4
    samplers = [RepeatFactorSampler(factors, batch_size=batch, seed=9, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(4)
    per_rank = [[key[0] for key in s] for s in samplers]
    lengths = {len(p) for p in per_rank}
    assert lengths == {samplers[0].batches_per_epoch() * batch} and len(samplers[0]) == lengths.pop()
    expansion = samplers[0]._expansion(4)
    used = samplers[0].batches_per_epoch() * batch * world
    interleaved = [per_rank[k % world][k // world] for k in range(used)]
    assert interleaved == (expansion[:used] % 150).tolist()
    assert used <= samplers[0].effective_epoch_length < used + world * batch


def test_repeated_copies_get_their_own_keys_and_augmentation() -> None:
    """An image repeated k times in an epoch comes as (i, e), (i, e, 1), ... (i, e, k-1): the dataset
    draws each copy's flip and jitter apart, and the first copy's draws are those of a plain epoch."""
    factors = np.asarray([3.0, 1.0, 2.0, 1.0])
    sampler = RepeatFactorSampler(factors, batch_size=1, seed=5, shuffle=False)
    sampler.set_epoch(2)
    assert list(sampler) == [(0, 2), (0, 2, 1), (0, 2, 2), (1, 2), (2, 2), (2, 2, 1), (3, 2)]
    assert sample_rng(0, 2, 0).random() != sample_rng(0, 2, 0, *_copy_words(1)).random() != sample_rng(0, 2, 0, *_copy_words(2)).random()
    assert _copy_words(0) == ()


def test_resume_mid_epoch_yields_exactly_the_rest() -> None:
    """state_dict after b batches + load_state_dict in a new sampler yields the remaining keys bit-exactly."""
    factors = repeat_factors(_random_image_tags(120, 20, seed=5), 20, 0.15)
    full = RepeatFactorSampler(factors, batch_size=6, seed=1, rank=1, world_size=2)
    full.set_epoch(3)
    keys = list(full)
    for done in (0, 1, 5, full.batches_per_epoch()):
        fresh = RepeatFactorSampler(factors, batch_size=6, seed=1, rank=1, world_size=2)
        fresh.load_state_dict(full.state_dict(batches_done=done))
        if done == full.batches_per_epoch():  # a finished epoch resumes at the next one's start
            assert fresh.epoch == 4 and fresh.start_batch == 0
            continue
        assert list(fresh) == keys[done * 6 :] and len(fresh) == len(keys) - done * 6
    other = RepeatFactorSampler(factors * 1.5, batch_size=6, seed=1, rank=1, world_size=2)
    with pytest.raises(ValueError, match="effective_epoch_length|factors_digest"):
        other.load_state_dict(full.state_dict(2))


def test_interface_matches_resumable_sampler() -> None:
    """Every public method and state key of ResumableSampler exists here with the same meaning."""
    public = {n for n in dir(ResumableSampler) if not n.startswith("_")}
    assert public <= set(dir(RepeatFactorSampler))
    plain = ResumableSampler(40, batch_size=4, seed=2)
    ones = RepeatFactorSampler(np.ones(40), batch_size=4, seed=2)
    assert set(plain.state_dict()) <= set(ones.state_dict())
    assert ones.effective_epoch_length == 40 and ones.batches_per_epoch() == plain.batches_per_epoch()
    ones.set_epoch(1)
    assert sorted(i for i, _ in ones) == list(range(40))  # r = 1: a plain permutation
    with pytest.raises(ValueError, match="start_batch"):
        ones.set_epoch(0, start_batch=11)
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorSampler([0.5, 2.0], batch_size=1)
