"""Batching for training and evaluation: records -> uint8 batches in workers -> normalised on the device.

This module owns the torch.utils.data side of the data pipeline: the map-style
``SidecarJsonDataset`` (keyed by (index, epoch), records packed into arrays so spawned workers
start fast, failing files replaced deterministically), ``collate_samples``,
``targets_from_indices``, the ``FailureTracker`` that stops a run when too many loads fail, the
resumable sharded ``ResumableSampler`` (on ``ShardedEpochSampler``, which other samplers such as
``repeat_factor.RepeatFactorSampler`` share), ``build_dataloader`` (picklable worker init, for
Windows' spawned workers) and the ``ImagePreFetcher`` that moves uint8 batches to the device and
jitters and normalises them there. ``FailureTracker`` and ``ResumableSampler`` keep their
checkpoint state through ``state_dict()`` / ``load_state_dict()``.

It imports ``image_preprocess`` (decoding, normalisation), ``augmentation`` (flip and jitter
randomness), ``prepared_cache`` (pre-decoded images), ``dataset_scan`` (``SampleRecord``,
``DataQualityError``), ``orientation_handler`` (which flips are allowed) and ``shard_format``
(the encoded images of a sharded dataset, ``ShardImages``: decoded here as a file's would be).
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from augmentation import AugmentParams, apply_color_jitter, sample_rng
from dataset_scan import DataQualityError, SampleRecord, write_data_report
from image_preprocess import IMAGE_ERRORS, PreprocessParams, classify_failure, load_letterboxed, normalize_images
from orientation_handler import OrientationHandler
from prepared_cache import PreparedCache
from sample_table import as_table
from scan_limits import printable
from shard_format import ShardImages

__all__ = [
    "SidecarJsonDataset",
    "collate_samples",
    "targets_from_indices",
    "FailureTracker",
    "ResumableSampler",
    "ShardedEpochSampler",
    "build_dataloader",
    "ImagePreFetcher",
]


def _copy_words(copy: int) -> tuple[int, ...]:
    """Extra RNG key words for a repeated copy (none for the first, so its draws are unchanged)."""
    return (0, 0, copy) if copy else ()


class SidecarJsonDataset(Dataset):
    """Map-style dataset over SampleRecords, keyed by (index, epoch); a failing sample is replaced
    (training) or skipped and reported (evaluation, `substitute=False`).

    Records are held as a SampleTable keyed to the vocabulary (flat arrays): spawned workers unpickle
    it fast and forked ones never grow by touching per-sample objects.
    """

    def __init__(
        self,
        records: Sequence[SampleRecord],
        tag_to_index: Mapping[str, int],
        params: PreprocessParams,
        *,
        augment: AugmentParams | None = None,
        orientation: OrientationHandler | None = None,
        seed: int = 0,
        max_retries: int = 10,
        cache: PreparedCache | None = None,
        substitute: bool = True,
        known_bad: Mapping[str, str] | None = None,
        images: ShardImages | None = None,
    ) -> None:
        """Encode every record's tags through `tag_to_index` (unknown tags dropped); `images`: read
        each record's encoded image from a sharded dataset instead of its file.

        `cache`: a PreparedCache for these params; its images replace decoding where the
        source file is unchanged (same pixels as load_image), the rest are decoded as usual.
        `known_bad`: sample id -> reason of samples already found undecodable (an earlier epoch
        or run); they are never decoded again, only reported and replaced or skipped.
        """
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if augment is not None and augment.flip_prob > 0 and orientation is None:
            raise ValueError(
                "flip_prob > 0 needs an orientation handler to swap left/right tags; pass OrientationHandler.default() or set flip_prob=0"
            )
        if not records:
            raise ValueError("SidecarJsonDataset needs at least one record")
        self.params = params
        self.augment = augment
        self.orientation = orientation
        self.seed = int(seed)
        self.max_retries = int(max_retries)
        self.tag_to_index = dict(tag_to_index)
        num = max(self.tag_to_index.values(), default=-1) + 1
        self.index_to_tag = [""] * num
        for tag, idx in self.tag_to_index.items():
            self.index_to_tag[idx] = tag
        table = as_table(records)
        if table.tag_names != self.index_to_tag:
            table = table.rekeyed(self.tag_to_index)
        self._table = table  # shared with the caller's table when it is already keyed to the vocabulary
        self._ratings = table.ratings
        self.cache = cache
        bad = dict(known_bad or {})
        ids = table.sample_ids() if cache is not None or bad else []  # decoded once, only when needed
        self._cache_rows = cache.rows_for(ids) if cache is not None else None
        self.images = images
        self._shard_rows = images.rows_for(table) if images is not None else None  # (N,) int64 dataset rows
        self.cache_hits = 0  # per process; for benchmarks and tests
        self.substitute = bool(substitute)
        # index -> (sample id, reason); grows in each worker as it meets failing files
        self._known_bad: dict[int, tuple[str, str]] = {i: (sid, bad[sid]) for i, sid in enumerate(ids) if sid in bad}

    def __len__(self) -> int:
        """Number of records."""
        return len(self._ratings)

    def sample_id(self, index: int) -> str:
        """The sample_id of record `index`."""
        return self._table.sample_id(index)

    def image_path(self, index: int) -> str:
        """The absolute image path of record `index`."""
        return self._table.image_path(index)

    def tag_indices(self, index: int) -> np.ndarray:
        """Known tag indices of record `index` (unaugmented), int32 (k,)."""
        return self._table.tag_ids_of(index)

    def _load(self, index: int, epoch: int, copy: int = 0) -> dict[str, Any]:
        """Load and augment one record (`copy`: which repeat of it in the epoch); exceptions propagate
        to the retry loop.

        The sample holds "image" (3, S, S) uint8, or, from a jpeg cache with decode_on_device,
        "encoded" (the JPEG bytes, (n,) uint8) whose flip (flip == 1) the device applies after
        decoding (ImagePreFetcher)."""
        path = self.image_path(index)
        cached = None
        encoded: torch.Tensor | None = None
        image: torch.Tensor | None = None
        if self.cache is not None and self._cache_rows is not None and self._cache_rows[index] >= 0:
            row = int(self._cache_rows[index])
            if self.cache.decode_on_device:
                found = self.cache.get_encoded(row, path)
                if found is not None:
                    encoded, box = found
                    self.cache_hits += 1
            else:
                cached = self.cache.get_chw(row, path)
        if cached is not None:
            image, box = cached  # (3, S, S), maybe a strided view
            self.cache_hits += 1
        elif encoded is None:
            source: Any = path
            if self.images is not None and self._shard_rows is not None:
                source = io.BytesIO(self.images.read(int(self._shard_rows[index]), self.sample_id(index)))
            array, box = load_letterboxed(source, self.params)
            image = torch.from_numpy(array).permute(2, 0, 1)  # (3, S, S) view; collate's stack makes the one copy
        tags = self.tag_indices(index).astype(np.int64)
        flip = 0
        jitter = (1.0, 1.0, 1.0)
        if self.augment is not None:
            rng = sample_rng(self.seed, epoch, index, *_copy_words(copy))
            # always draw the same numbers so one setting never shifts the others' randomness
            u_flip = rng.random()
            factors = rng.uniform(-1.0, 1.0, size=3)
            aug = self.augment
            if u_flip < aug.flip_prob and self.orientation is not None:
                decision = self.orientation.decide([self.index_to_tag[i] for i in tags])
                if decision.allowed:
                    if image is not None:  # encoded images are flipped on the device, after decoding
                        image = image.flip(-1)  # (3, S, S), mirrored along the width
                    tags = np.asarray([self.tag_to_index[t] for t in decision.flipped_tags if t in self.tag_to_index], dtype=np.int64)
                    width = self.params.image_size
                    box = (width - box[2], box[1], width - box[0], box[3])
                    flip = 1
                else:
                    flip = 2
            # colour jitter is applied on the device (apply_color_jitter); here only its factors
            jitter = (1.0 + aug.brightness * float(factors[0]), 1.0 + aug.contrast * float(factors[1]), 1.0 + aug.saturation * float(factors[2]))
        pixels: dict[str, Any] = {"image": image} if image is not None else {"encoded": encoded, "image_size": self.params.image_size}
        return {
            **pixels,
            "tag_indices": torch.from_numpy(tags),
            "rating": int(self._ratings[index]),
            "index": index,
            "flip": flip,
            "jitter": jitter,
            "box": tuple(int(v) for v in box),
        }

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        """Sample for key (index, epoch), (index, epoch, copy) or index; a failing file is replaced
        deterministically. `copy` > 0 is a repeat of the image in the same epoch (repeat-factor
        sampling): its own augmentation draws, so copies are not identical."""
        copy = 0
        if isinstance(key, tuple):
            index, epoch = int(key[0]), int(key[1])
            copy = int(key[2]) if len(key) > 2 else 0
        else:
            index, epoch = int(key), 0
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        failures: list[tuple[str, str]] = []
        current = index
        for attempt in range(self.max_retries + 1):
            known = self._known_bad.get(current)
            if known is None:
                try:
                    sample = self._load(current, epoch, copy)
                except IMAGE_ERRORS as exc:
                    known = (self.sample_id(current), classify_failure(exc))
                    self._known_bad[current] = known
            if known is not None:
                failures.append(known)
                if not self.substitute:  # evaluation: never another sample in this one's place
                    return {"skipped": True, "index": index, "failure": known, "more_failures": [], "image_size": self.params.image_size}
                # replacement from (seed, epoch, index, attempt): same on every run and worker count
                current = int(sample_rng(self.seed, epoch, index, attempt + 1, 1, *_copy_words(copy)).integers(len(self)))
                continue
            sample["failure"] = failures[0] if failures else None
            sample["more_failures"] = failures[1:]
            return sample
        raise DataQualityError(
            f"sample {index} (epoch {epoch}) and {self.max_retries} replacements all failed to load: "
            + ", ".join(f"{sid} ({reason})" for sid, reason in failures[:5])
        )


def collate_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples: images (B,3,H,W) uint8, tag_indices (B,L) padded with -1, ratings, indices.

    Samples marked skipped (evaluation) are left out and listed under "skipped"; B may be 0.
    When some samples carry JPEG bytes instead of pixels (a jpeg cache with decode_on_device),
    "images" holds only the others' pixels (P, 3, H, W) at rows "image_rows" (P,) of the batch,
    and "encoded" the K byte tensors for rows "encoded_rows" (K,): ImagePreFetcher decodes and
    merges them on the device."""
    if not batch:
        raise ValueError("collate_samples got an empty batch")
    skipped = [tuple(s["failure"]) for s in batch if s.get("skipped")]
    size = int(next((s["image_size"] for s in batch if "image_size" in s), 0))
    batch = [s for s in batch if not s.get("skipped")]
    pixel_rows = [row for row, s in enumerate(batch) if "encoded" not in s]
    if pixel_rows:
        images = torch.stack([batch[row]["image"] for row in pixel_rows])  # (P, 3, H, W)
    else:
        images = torch.zeros((0, 3, size, size), dtype=torch.uint8)  # (0, 3, S, S)
    encoded: dict[str, Any] = {}
    if len(pixel_rows) < len(batch):
        encoded_rows = [row for row, s in enumerate(batch) if "encoded" in s]
        encoded = {
            "encoded": [batch[row]["encoded"] for row in encoded_rows],  # K x (n_k,) uint8
            "encoded_rows": torch.tensor(encoded_rows, dtype=torch.long),  # (K,)
            "image_rows": torch.tensor(pixel_rows, dtype=torch.long),  # (P,)
        }
    longest = max((int(s["tag_indices"].numel()) for s in batch), default=0)
    tag_indices = torch.full((len(batch), longest), -1, dtype=torch.long)  # (B, L)
    for row, s in enumerate(batch):
        n = int(s["tag_indices"].numel())
        if n:
            tag_indices[row, :n] = s["tag_indices"]
    failures: list[tuple[str, str]] = []
    for s in batch:
        if s.get("failure") is not None:
            failures.append(tuple(s["failure"]))
        failures.extend(tuple(f) for f in s.get("more_failures", ()))
    return {
        "images": images,
        "tag_indices": tag_indices,
        "ratings": torch.tensor([int(s["rating"]) for s in batch], dtype=torch.long),  # (B,)
        "indices": torch.tensor([int(s["index"]) for s in batch], dtype=torch.long),  # (B,)
        "flip": torch.tensor([int(s["flip"]) for s in batch], dtype=torch.long),  # (B,)
        "jitter": torch.tensor([s["jitter"] for s in batch], dtype=torch.float32).reshape(-1, 3),  # (B, 3)
        "box": torch.tensor([s["box"] for s in batch], dtype=torch.long).reshape(-1, 4),  # (B, 4)
        "failures": failures + skipped,
        "skipped": skipped,
        **encoded,
    }


def targets_from_indices(tag_indices: torch.Tensor, num_tags: int) -> torch.Tensor:
    """Multi-hot float (B, T) from padded indices (B, L); negative entries are padding."""
    if tag_indices.dim() != 2:
        raise ValueError(f"tag_indices must be (B, L), got shape {tuple(tag_indices.shape)}")
    idx = tag_indices.long()
    idx = torch.where(idx < 0, torch.full_like(idx, num_tags), idx)  # padding -> spare column T
    out = torch.zeros(idx.shape[0], num_tags + 1, dtype=torch.float32, device=idx.device)  # (B, T+1)
    out.scatter_(1, idx, 1.0)
    return out[:, :num_tags].contiguous()  # (B, T)


class FailureTracker:
    """Counts samples replaced during training, remembers which samples failed and why (for
    data_report.json and the next run's exclusion), and stops the run when too many are bad."""

    def __init__(
        self,
        max_bad_fraction: float,
        min_samples: int = 1000,
        *,
        report: dict[str, Any] | None = None,
        report_path: str | Path | None = None,
        skip_list: Callable[[Mapping[str, tuple[str, str]]], None] | None = None,
    ) -> None:
        """Raise once failures / attempted loads > max_bad_fraction after min_samples loads.

        With `report` and `report_path` (the run's data report, main process only),
        write_report() puts the failures into it under "replaced_during_training", and hands
        every failed sample (id -> (reason, "training" or "validation")) to `skip_list`, which
        writes the run's complete list (skip_list.py)."""
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.delivered = 0
        self.failed = 0
        self.by_reason: dict[str, int] = {}
        self.examples: list[str] = []
        self.samples: dict[str, str] = {}  # sample id -> reason, each failing sample once
        self.stages: dict[str, str] = {}  # sample id -> where it failed first: "training" or "validation"
        self.report = report
        self.report_path = Path(report_path) if report_path is not None else None
        self.skip_list = skip_list

    def record(self, samples: Mapping[str, str], where: str = "validation") -> None:
        """Remember samples that failed outside training (e.g. validation's skipped ones, id ->
        reason) for the report and the next attempt, without counting them as training loads."""
        for sample_id, reason in samples.items():
            if str(sample_id) not in self.samples:
                self.samples[str(sample_id)] = str(reason)
                self.stages[str(sample_id)] = where

    def write_report(self) -> None:
        """Store the failures seen so far in the run's data_report.json and its complete skip list (no-op without them)."""
        if self.report is None or self.report_path is None:
            return
        self.report["replaced_during_training"] = self.to_dict()
        write_data_report(self.report_path, self.report)
        if self.skip_list is not None:
            self.skip_list({sid: (reason, self.stages.get(sid, "training")) for sid, reason in self.samples.items()})

    @property
    def bad_fraction(self) -> float:
        """Failed loads over all attempted loads so far."""
        attempted = self.delivered + self.failed
        return self.failed / attempted if attempted else 0.0

    def observe(self, batch: Mapping[str, Any]) -> None:
        """Count one collated batch; DataQualityError when the bad share passes the limit."""
        failures = batch.get("failures", [])
        self.delivered += int(len(batch["indices"]))
        for sample_id, reason in failures:
            self.failed += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if sample_id not in self.samples:
                self.samples[sample_id] = reason
                self.stages[sample_id] = "training"
                if len(self.examples) < 10:
                    self.examples.append(printable(f"{sample_id}: {reason}"))
        attempted = self.delivered + self.failed
        if attempted >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise DataQualityError(
                f"{self.failed} of {attempted} image loads failed ({self.bad_fraction:.1%}), more than "
                f"the allowed {self.max_bad_fraction:.1%}; by reason {self.by_reason}; "
                f"e.g. {', '.join(self.examples[:3])}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for logs and checkpoints."""
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "bad_fraction": self.bad_fraction,
            "by_reason": dict(self.by_reason),
            "examples": list(self.examples),
            "samples": {printable(k): v for k, v in sorted(self.samples.items())},
            # only the samples found outside training (absent: all found in training)
            "validation_samples": sorted(printable(k) for k, where in self.stages.items() if where == "validation"),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters for a checkpoint: the same dict as to_dict(), which checkpoints store under "failures"."""
        return self.to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters from state_dict(); keys missing in older checkpoints count as zero/empty.

        `bad_fraction` is derived from the counters and is not read back. The limits
        (max_bad_fraction, min_samples) come from this run's config, not from the checkpoint.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"failure tracker state must be a mapping, got {type(state).__name__}")
        by_reason = state.get("by_reason", {})
        examples = state.get("examples", [])
        if not isinstance(by_reason, Mapping) or not isinstance(examples, list):
            raise ValueError(
                f"failure tracker state has by_reason={type(by_reason).__name__}, examples={type(examples).__name__}; expected a mapping and a list"
            )
        self.delivered = int(state.get("delivered", 0))
        self.failed = int(state.get("failed", 0))
        self.by_reason = {str(k): int(v) for k, v in by_reason.items()}
        self.examples = [str(e) for e in examples]
        samples = state.get("samples", {})
        if not isinstance(samples, Mapping):
            raise ValueError(f"failure tracker state has samples={type(samples).__name__}; expected a mapping")
        self.samples = {str(k): str(v) for k, v in samples.items()}
        in_validation = state.get("validation_samples", [])
        if not isinstance(in_validation, list):
            raise ValueError(f"failure tracker state has validation_samples={type(in_validation).__name__}; expected a list")
        validation = {str(k) for k in in_validation}
        self.stages = {k: ("validation" if k in validation else "training") for k in self.samples}


# --------------------------------------------------------------------------------------------
# Sampler and loader
# --------------------------------------------------------------------------------------------


class ShardedEpochSampler(Sampler):
    """Base of the training samplers: one epoch's index sequence over all ranks, padded and sharded like
    DistributedSampler, yielding (index, epoch) keys, resumable at a batch inside the epoch.

    A subclass gives the epoch's sequence (`_epoch_sequence`, the same for any number of ranks) and
    its fixed length; the sharding, the resume position and the checkpoint state live here once.
    Rank r takes every world_size-th item from r, so after k batches the ranks together have taken
    exactly the first offset + k x batch_size x world_size items of the sequence (`offset`: what an
    earlier layout took). That makes a resume elastic: with another world size or batch size
    (load_state_dict(elastic=True)) the rest of the interrupted epoch's sequence is sharded over the new
    ranks, so no sample of the epoch is seen twice or dropped (beyond drop_last's last partial batch)."""

    # State keys that must match on resume; a subclass adds its own. LAYOUT_KEYS may change in an elastic resume.
    STATE_KEYS: tuple[str, ...] = ("num_samples", "batch_size", "world_size", "seed", "shuffle", "drop_last")
    LAYOUT_KEYS: tuple[str, ...] = ("batch_size", "world_size", "drop_last")

    def __init__(
        self, num_samples: int, epoch_length: int, *, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool
    ) -> None:
        """num_samples: dataset size; epoch_length: indices in one epoch over all ranks (before drop_last)."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples = int(num_samples)
        self.epoch_length = int(epoch_length)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0
        self.offset = 0  # items of `offset_epoch`'s sequence taken under an earlier layout (elastic resume)
        self.offset_epoch = -1
        if self.drop_last and epoch_length < self.world_size:
            raise ValueError(f"{epoch_length} samples per epoch cannot be shared by {world_size} ranks with drop_last")
        if self.drop_last and self._per_rank(epoch_length) < self.batch_size:
            raise ValueError(f"{self._per_rank(epoch_length)} samples per rank make no full batch of {batch_size}")

    def _epoch_sequence(self, epoch: int) -> list[int]:
        """All ranks' indices for `epoch`, before padding and sharding (a subclass defines it)."""
        raise NotImplementedError

    def _per_rank(self, length: int) -> int:
        """Items each rank takes from a sequence of `length` (drop_last trims, else the last ones are padded)."""
        return length // self.world_size if self.drop_last else math.ceil(length / self.world_size)

    def _offset_of(self, epoch: int) -> int:
        """Items of `epoch`'s sequence taken before this layout (0 unless an elastic resume landed in it)."""
        return self.offset if epoch == self.offset_epoch else 0

    @property
    def per_rank(self) -> int:
        """Items this rank takes in the current epoch (fewer in an epoch an elastic resume landed in)."""
        return self._per_rank(self.epoch_length - self._offset_of(self.epoch))

    def batches_per_epoch(self) -> int:
        """Batches each rank runs in the current epoch."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def full_batches_per_epoch(self) -> int:
        """Batches each rank runs in a whole epoch (the schedule's epoch)."""
        per_rank = self._per_rank(self.epoch_length)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def _samples_per_epoch(self) -> int:
        """Samples this rank yields in the current epoch."""
        return self.batches_per_epoch() * self.batch_size if self.drop_last else self.per_rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip this rank's first `start_batch` batches of it (resume)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch()}]")
        self.start_batch = int(start_batch)

    def _epoch_order(self) -> list[int]:
        """This rank's full index list for the current epoch (after what an earlier layout took of it)."""
        order = self._epoch_sequence(self.epoch)[self._offset_of(self.epoch) :]
        total = self.per_rank * self.world_size
        if total > len(order):  # pad by repeating from the start, as DistributedSampler does
            order = order * math.ceil(total / len(order))
        return order[self.rank : total : self.world_size][: self._samples_per_epoch()]

    def _key(self, item: int, epoch: int) -> tuple[int, ...]:
        """The dataset key of one item of the epoch's sequence: (index, epoch)."""
        return (item, epoch)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        """Yield dataset keys (index, epoch[, copy]) for this rank, from start_batch on."""
        order = self._epoch_order()
        epoch = self.epoch
        for item in order[self.start_batch * self.batch_size :]:
            yield self._key(item, epoch)

    def __len__(self) -> int:
        """Keys left to yield in the current epoch (after the resume skip)."""
        return max(0, self._samples_per_epoch() - self.start_batch * self.batch_size)

    def state_dict(self, batches_done: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """Plain-typed position: pass the batches the loop has consumed in `epoch` (default: the sampler's own)."""
        epoch = self.epoch if epoch is None else int(epoch)
        done = self.start_batch if batches_done is None else int(batches_done)
        position = {"epoch": epoch, "start_batch": done, "offset": self._offset_of(epoch)}
        return {**position, **{key: getattr(self, key) for key in self.STATE_KEYS}}

    def load_state_dict(self, state: Mapping[str, Any], elastic: bool = False) -> None:
        """Resume from state_dict(); ValueError if the data changed since, or the layout (batch size, world size,
        drop_last) without `elastic`: then the rest of the epoch's sequence is sharded over this layout."""
        changed = [key for key in self.STATE_KEYS if key in state and state[key] != getattr(self, key)]
        for key in changed:
            if not elastic or key not in self.LAYOUT_KEYS:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {getattr(self, key)!r}; cannot resume inside the epoch")
        epoch = int(state.get("epoch", 0))
        start = int(state.get("start_batch", 0))
        offset = int(state.get("offset", 0))
        if changed:  # another layout: what the old ranks took together is a prefix of the sequence
            width = int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", self.world_size))
            offset, start = min(self.epoch_length, offset + start * width), 0
        self.offset, self.offset_epoch = (offset, epoch) if offset else (0, -1)
        self.epoch = epoch
        if offset >= self.epoch_length or start >= self.batches_per_epoch():  # the stored epoch was finished
            epoch, start = epoch + 1, 0
        self.set_epoch(epoch, start)


class ResumableSampler(ShardedEpochSampler):
    """Sharded per-epoch permutation yielding (index, epoch) keys, resumable inside an epoch."""

    def __init__(
        self, num_samples: int, *, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True
    ) -> None:
        """Same arguments as DistributedSampler plus batch_size, so resume positions are batches."""
        super().__init__(
            num_samples, num_samples, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
        )

    def _epoch_sequence(self, epoch: int) -> list[int]:
        """A permutation of every sample, seeded by (seed, epoch); the identity without shuffle."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        # 63-bit seed hashed from (seed, epoch): (0, 1) and (1, 0) must not give the same order
        digest = hashlib.blake2b(f"{self.seed}:{epoch}".encode("utf-8"), digest_size=8).digest()
        g.manual_seed(int.from_bytes(digest, "big") & 0x7FFFFFFFFFFFFFFF)
        return torch.randperm(self.num_samples, generator=g).tolist()


def _worker_init(worker_id: int) -> None:
    """Keep each worker to one compute thread; many workers x many threads thrash the CPUs."""
    torch.set_num_threads(1)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image raises on these
    # decoder warnings (broken EXIF, truncated reads) were counted by the scan; a worker prints none
    warnings.filterwarnings("ignore", module=r"PIL\.")


def build_dataloader(
    dataset: Dataset,
    sampler: Sampler | Sequence[int],
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    drop_last: bool,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    multiprocessing_context: Any = None,
    timeout: float = 0,
    generator_seed: int | None = None,
) -> DataLoader:
    """A DataLoader with collate_samples and a picklable worker_init_fn.

    With `generator_seed`, the workers' base seed comes from a private generator instead of the
    global torch RNG, so starting an epoch does not consume global random state (exact resume).
    """
    extra: dict[str, Any] = {}
    if generator_seed is not None:
        extra["generator"] = torch.Generator().manual_seed(int(generator_seed))
    if num_workers > 0:
        extra |= {
            "prefetch_factor": prefetch_factor,
            "persistent_workers": persistent_workers,
            "multiprocessing_context": multiprocessing_context,
            "timeout": timeout,
        }
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=_worker_init,
        **extra,
    )


class ImagePreFetcher:
    """Moves batches to the device one ahead on a side CUDA stream and normalises them there."""

    def __init__(self, loader: Iterable[dict[str, Any]], device: torch.device | str, params: PreprocessParams, num_tags: int) -> None:
        """Wrap `loader`; on CPU devices batches are converted synchronously."""
        self.loader = loader
        self.device = torch.device(device)
        self.params = params
        self.num_tags = int(num_tags)

    def __len__(self) -> int:
        """Length of the wrapped loader."""
        return len(self.loader)  # type: ignore[arg-type]

    def _images(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The batch's uint8 images on the device, (B, 3, H, W): JPEG bytes (a jpeg cache with
        decode_on_device) are decoded there, flipped where the worker decided a flip, and merged
        with the pixels the workers decoded (samples the cache did not hold)."""
        pixels = batch["images"].to(self.device, non_blocking=True)  # (P, 3, H, W) uint8
        encoded = batch.get("encoded")
        if not encoded:
            return pixels
        try:
            decoded = PreparedCache.decode_batch(encoded, self.device)  # (K, 3, H, W) uint8
        except RuntimeError as exc:
            indices = batch["indices"][batch["encoded_rows"]].tolist()
            raise RuntimeError(f"decoding the prepared cache's JPEGs of dataset samples {indices[:8]} on {self.device} failed: {exc}") from exc
        rows = batch["encoded_rows"]  # (K,) on the host
        flips = batch["flip"][rows] == 1  # (K,) the worker flipped the tags and box, not the pixels
        if bool(flips.any()):
            mirrored = flips.nonzero().flatten().to(self.device, non_blocking=True)  # (F,) rows to mirror
            decoded[mirrored] = decoded[mirrored].flip(-1)  # (F, 3, H, W) mirrored along the width
        if pixels.shape[0] == 0:
            return decoded
        images = torch.empty((len(rows) + pixels.shape[0], *decoded.shape[1:]), dtype=torch.uint8, device=self.device)  # (B, 3, H, W)
        images[rows.to(self.device, non_blocking=True)] = decoded
        images[batch["image_rows"].to(self.device, non_blocking=True)] = pixels
        return images

    def _convert(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Copy tensors to the device (non-blocking) and build normalised images and targets."""
        images = self._images(batch)  # (B, 3, H, W) uint8
        tag_indices = batch["tag_indices"].to(self.device, non_blocking=True)  # (B, L)
        ratings = batch["ratings"].to(self.device, non_blocking=True)  # (B,)
        jitter = batch.get("jitter")  # (B, 3) on the host: checking it costs no device sync
        if jitter is not None and bool((jitter != 1.0).any()):
            images = apply_color_jitter(
                images.float(), jitter.to(self.device, non_blocking=True), batch["box"].to(self.device, non_blocking=True)
            )  # (B, 3, H, W) float
        return {
            "images": normalize_images(images, self.params.mean, self.params.std),
            "tag_targets": targets_from_indices(tag_indices, self.num_tags),  # (B, T)
            "ratings": ratings,
            "failures": batch.get("failures", []),
            "skipped": batch.get("skipped", []),
            "flip": batch.get("flip"),
            "indices": batch.get("indices"),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield device batches; with CUDA the next batch is copied while this one trains."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            for batch in self.loader:
                yield self._convert(batch)
            return
        stream = torch.cuda.Stream(device=self.device)
        iterator = iter(self.loader)

        def preload() -> dict[str, Any] | None:
            """Start the copy and conversion of the next batch on the side stream."""
            try:
                batch = next(iterator)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self._convert(batch)

        upcoming = preload()
        while upcoming is not None:
            current_stream = torch.cuda.current_stream(self.device)
            current_stream.wait_stream(stream)  # the copy/normalise must finish before use
            for key in ("images", "tag_targets", "ratings"):
                # memory made on the side stream is now used on the main one: tell the allocator
                upcoming[key].record_stream(current_stream)
            ready = upcoming
            upcoming = preload()
            yield ready
