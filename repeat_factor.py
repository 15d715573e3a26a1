"""LVIS repeat-factor sampling: rare-tag images repeated within an epoch, sharded and resumable.

Gupta et al. (2019, "LVIS: A Dataset for Large Vocabulary Instance Segmentation") oversample
images that carry rare categories. With f_t the share of training images tagged t and a
threshold th, tag t gets r_t = max(1, sqrt(th / f_t)) and image i gets r(i) = max over its tags of
r_t (1 for an image with no tag). Each epoch every image appears floor(r) or ceil(r) times, ceil
with probability frac(r), so its expected count is r.

The rounding is systematic (one uniform offset per epoch over a freshly shuffled image order)
rather than one independent coin per image: every image still gets floor(r) or ceil(r) with the
right probability, but the epoch's total is floor(S) or ceil(S) for S = sum r, never hundreds
away from S. That lets the epoch have one fixed length (`effective_epoch_length` = floor(S)), so
batches per epoch, the LR schedule's step count and resume positions work exactly as with
`batching.ResumableSampler`, whose interface (set_epoch(epoch, start_batch), __iter__ of
(index, epoch) keys, __len__, batches_per_epoch, state_dict/load_state_dict) this sampler
mirrors. Counts use integer fixed-point arithmetic (2**-24 steps of r), so an integer r is
repeated exactly r times and rounding error never yields a count outside {floor(r), ceil(r)}.

Everything random comes from (seed, epoch) alone: the same seed gives the same epochs on every
machine and rank, and a resumed epoch is the same epoch. Sharding, the resume position and the
checkpoint state are batching.ShardedEpochSampler's, shared with ResumableSampler.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np

from batching import ShardedEpochSampler

__all__ = ["FIXED_POINT_BITS", "repeat_factors", "tag_image_frequencies", "RepeatFactorSampler"]

# r is held as an integer multiple of 2**-FIXED_POINT_BITS (about 6e-8): exact sums, exact counts.
FIXED_POINT_BITS = 24
_ONE = 1 << FIXED_POINT_BITS
# Cumulative fixed-point sums must stay below this (int64 with headroom for the offset).
_MAX_FIXED_SUM = 1 << 62


def _image_tag_pairs(image_tags: Sequence[Sequence[int] | np.ndarray], num_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (image, tag) pairs as two int64 arrays; ValueError on a tag outside [0, num_tags)."""
    lengths = np.fromiter((len(t) for t in image_tags), dtype=np.int64, count=len(image_tags))
    flat = np.zeros(0, dtype=np.int64)
    if lengths.sum():
        flat = np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in image_tags])
    if flat.size and (flat.min() < 0 or flat.max() >= num_tags):
        raise ValueError(f"tag indices must be in [0, {num_tags}), got range [{flat.min()}, {flat.max()}]")
    images = np.repeat(np.arange(len(image_tags), dtype=np.int64), lengths)
    # A tag listed twice on one image must count once towards f_t.
    keys = np.unique(images * num_tags + flat)
    return keys // num_tags, keys % num_tags


def tag_image_frequencies(image_tags: Sequence[Sequence[int] | np.ndarray], num_tags: int) -> np.ndarray:
    """f_t: share of images (list of per-image tag indices) that carry tag t, (T,) float64."""
    if len(image_tags) == 0:
        raise ValueError("image_tags is empty: repeat factors need at least one training image")
    _, tags = _image_tag_pairs(image_tags, num_tags)
    return np.bincount(tags, minlength=num_tags).astype(np.float64) / len(image_tags)


def repeat_factors(image_tags: Sequence[Sequence[int] | np.ndarray], num_tags: int, threshold: float) -> np.ndarray:
    """r(i) = max(1, max over the image's tags of sqrt(threshold / f_t)), (N,) float64; untagged images get 1."""
    if not (threshold > 0.0 and math.isfinite(threshold)):
        raise ValueError(f"repeat-factor threshold must be a positive finite number, got {threshold!r}")
    freq = tag_image_frequencies(image_tags, num_tags)  # (T,)
    images, tags = _image_tag_pairs(image_tags, num_tags)
    # Tags never seen have f_t = 0 but also no image, so their (infinite) factor is never read.
    with np.errstate(divide="ignore"):
        per_tag = np.maximum(1.0, np.sqrt(threshold / freq))  # (T,)
    factors = np.ones(len(image_tags), dtype=np.float64)  # (N,)
    np.maximum.at(factors, images, per_tag[tags])
    return factors


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Generator for one epoch from a 63-bit hash of (seed, epoch): (0, 1) and (1, 0) differ."""
    digest = hashlib.blake2b(f"repeat-factor:{seed}:{epoch}".encode("utf-8"), digest_size=8).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "big") & 0x7FFFFFFFFFFFFFFF))


class RepeatFactorSampler(ShardedEpochSampler):
    """Sharded per-epoch expansion (image i floor(r_i) or ceil(r_i) times), shuffled, yielding (index, epoch)."""

    def __init__(
        self,
        factors: Sequence[float] | np.ndarray,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        """Same arguments as batching.ResumableSampler, with per-image repeat factors (N,) >= 1 for num_samples."""
        r = np.asarray(factors, dtype=np.float64).reshape(-1)
        if r.size == 0:
            raise ValueError("factors is empty: need one repeat factor per training image")
        if not np.isfinite(r).all() or (r < 1.0).any():
            raise ValueError(f"repeat factors must be finite and >= 1, got min {r.min()!r}, max {r.max()!r}")
        self._fixed = np.rint(r * _ONE).astype(np.int64)  # (N,) r in units of 2**-24
        if int(self._fixed.sum(dtype=np.float64)) >= _MAX_FIXED_SUM:
            raise ValueError(f"sum of repeat factors {r.sum():.3g} is too large for the fixed-point expansion")
        # The digest ties a checkpoint's position to these exact factors (data or threshold changes).
        self.factors_digest = hashlib.blake2b(self._fixed.tobytes(), digest_size=16).hexdigest()
        super().__init__(
            int(r.size),
            self.effective_epoch_length,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )

    @property
    def effective_epoch_length(self) -> int:
        """Samples in one expanded epoch over all ranks, floor(sum of r), before drop_last trims it."""
        return int(self._fixed.sum() >> FIXED_POINT_BITS)

    def _expansion(self, epoch: int) -> np.ndarray:
        """All ranks' index sequence for `epoch` before sharding, (floor(S) or ceil(S),) int64."""
        rng = _epoch_rng(self.seed, epoch)
        visit = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        # Systematic rounding: image j (in visit order) gets floor(C_j + u) - floor(C_{j-1} + u) copies,
        # C the running sum of r, u ~ U[0, 1) once per epoch: floor(r_j) or ceil(r_j), ceil w.p. frac(r_j),
        # because (C_{j-1} + u) mod 1 is uniform. Here in fixed point, so every step is exact.
        offset = int(rng.integers(0, _ONE))
        cumulative = np.cumsum(self._fixed[visit]) + offset  # (N,)
        counts = np.diff(cumulative >> FIXED_POINT_BITS, prepend=offset >> FIXED_POINT_BITS)  # (N,)
        expanded = np.repeat(visit, counts)
        # the k-th copy of an image is item index + k * N: its key carries k (own augmentation draws)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        items = expanded + (np.arange(expanded.size) - first) * self.num_samples
        if self.shuffle:
            items = items[rng.permutation(items.size)]  # spread an image's copies over the epoch
        else:
            items = items[np.argsort(items % self.num_samples, kind="stable")]
        return items

    STATE_KEYS = (*ShardedEpochSampler.STATE_KEYS, "effective_epoch_length", "factors_digest")

    def _epoch_sequence(self, epoch: int) -> list[int]:
        """The epoch's expansion over all ranks (ShardedEpochSampler pads and shards it)."""
        return self._expansion(epoch).tolist()

    def _key(self, item: int, epoch: int) -> tuple[int, ...]:
        """(index, epoch) for an image's first copy, (index, epoch, k) for its k-th repeat."""
        copy, index = divmod(item, self.num_samples)
        return (index, epoch, copy) if copy else (index, epoch)

    def repeat_counts(self, epoch: int) -> np.ndarray:
        """How often each image appears in `epoch`'s expansion over all ranks (before drop_last), (N,) int64."""
        return np.bincount(self._expansion(epoch) % self.num_samples, minlength=self.num_samples)
