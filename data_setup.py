"""Run-level data wiring: config -> records -> split -> vocabulary -> datasets and loaders.

This module owns the steps a training or evaluation run takes to get its data from the config:
``ensure_dataset`` (generating the demo dataset when configured and absent),
``scan_from_config``, ``flip_audit``, ``prepare_data`` (scan, quality check, split, vocabulary,
the run folder's split.json / vocabulary.json / data_report.json, the prepared cache, datasets),
``prepare_eval_data`` and ``build_eval_loader``, with the ``DataBundle`` they return,
``preprocess_from_config``, ``limits_from_config`` and ``check_output_locations`` (no run or
cache folder inside the dataset). One decode truth: a sample that fails to decode anywhere (the
start-up check, the cache build, a training worker) is recorded by id and reason, ends in
data_report.json, and is left out of validation and of later runs; validation never substitutes. It is the top of the data modules and imports them all
(``dataset_scan``, ``dataset_split``, ``image_preprocess``, ``augmentation``,
``prepared_cache``, ``batching``) plus ``Configuration_System`` (the config), ``file_io``
(shipped resources), ``vocabulary``, ``orientation_handler``, ``demo_dataset``, ``tagger_init``
(a timm run takes its init source's preprocessing) and ``wd_release`` (the extend vocabulary mode
reads a release's selected_tags.csv). A ``data.root`` (or ``--data``) naming a sharded dataset (a
chunk folder or an ``s3://`` URL, ``shard_format``) is read through its tag index instead of a scan,
and its images through ``ShardImages``; everything after the scan is the folder's path.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from augmentation import AugmentParams
from batching import FailureTracker, ResumableSampler, ShardedEpochSampler, SidecarJsonDataset, build_dataloader
from Configuration_System import ConfigError, RootConfig
from dataset_scan import (
    DataQualityError,
    DatasetScan,
    SampleRecord,
    check_scan_quality,
    filter_known_tags,
    format_scan_summary,
    read_json,
    scan_dataset,
    scan_source,
    write_data_report,
)
from dataset_split import load_split, save_split, split_records
from demo_dataset import generate_demo_dataset
from file_io import display_path, resolve_resource
from image_preprocess import PreprocessParams
from orientation_handler import FlipStats, OrientationHandler
from prepared_cache import PreparedCache, prepare_cache
from repeat_factor import RepeatFactorSampler, repeat_factors
from sample_table import SampleTable, as_table
from scan_index import scan_with_index
from scan_limits import ScanLimits, printable
from shard_format import ShardImages, is_remote, is_shard_dataset, load_tag_index
from skip_list import SKIP_LIST_FILE, SkipRow, failure_rows, record_rows, scan_rows, update_skip_list, write_skip_list
from tagger_init import apply_init_preprocessing, extend_vocabulary
from vocabulary import TagVocabulary, build_vocabulary, load_ignore_list
from wd_release import read_release_labels, release_layout, release_problem

__all__ = [
    "DataBundle",
    "preprocess_from_config",
    "limits_from_config",
    "check_output_locations",
    "absolute_data_paths",
    "is_inside",
    "exclude_failed",
    "earlier_failures",
    "ensure_dataset",
    "scan_from_config",
    "flip_audit",
    "prepare_data",
    "prepare_eval_data",
    "build_eval_loader",
]


@dataclass
class DataBundle:
    """The data side of a run: records, split, vocabulary, preprocessing and datasets."""

    train_records: Sequence[SampleRecord]  # SampleTables keyed to the vocabulary
    val_records: Sequence[SampleRecord]
    vocab: TagVocabulary
    vocab_path: Path
    preprocess: PreprocessParams
    train_dataset: SidecarJsonDataset | None
    val_dataset: SidecarJsonDataset
    report: dict[str, Any]
    report_path: Path | None = None
    skip_list_path: Path | None = None  # the run's complete list of skipped samples (main process)
    earlier_failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (reason, where) from earlier attempts
    skipped_rows: list[SkipRow] = field(default_factory=list)  # evaluation data: what its scan and split left out

    @functools.cached_property
    def train_fingerprint(self) -> str:
        """A hash of the training samples' ids in order: a checkpoint resumes exactly only on the same
        ones (computed once: every checkpoint stores it)."""
        table = as_table(self.train_records)
        digest = hashlib.sha256(table.id_offsets.tobytes())
        digest.update(table.id_blob.tobytes())
        return digest.hexdigest()[:32]

    def failure_tracker(self, max_bad_fraction: float) -> FailureTracker:
        """A FailureTracker that writes worker failures into this run's data_report.json and its
        complete skip list (write_report(), at each epoch end) and remembers them across resumes."""
        skip_list = None
        if self.skip_list_path is not None:
            skip_list = functools.partial(_update_skip_list, self.skip_list_path, self.earlier_failed, (self.train_records, self.val_records))
        return FailureTracker(max_bad_fraction, report=self.report, report_path=self.report_path, skip_list=skip_list)


def _update_skip_list(
    path: Path, earlier: Mapping[str, tuple[str, str]], tables: Sequence[Sequence[SampleRecord]], failed: Mapping[str, tuple[str, str]]
) -> None:
    """The skip list after training found `failed`: the earlier attempts' failures and this one's."""
    update_skip_list(path, {**earlier, **failed}, tables)


def preprocess_from_config(cfg: RootConfig) -> PreprocessParams:
    """Preprocessing parameters from the data section (stored in every checkpoint)."""
    d = cfg.data
    return PreprocessParams(
        image_size=d.image_size,
        pad_color=tuple(int(v) for v in d.pad_color),
        mean=tuple(float(v) for v in d.mean),
        std=tuple(float(v) for v in d.std),
        resample=d.resample,
        layout=d.image_layout,
    )


def limits_from_config(cfg: RootConfig) -> ScanLimits:
    """The per-sample limits and link policy of the data section."""
    d = cfg.data
    return ScanLimits(
        max_tags_per_sample=d.max_tags_per_sample, max_tag_chars=d.max_tag_chars, max_sidecar_bytes=d.max_sidecar_bytes, symlinks=d.symlinks
    )


def _dataset_folder(cfg: RootConfig) -> Path | None:
    """The folder the data lives in: data.root, else the manifest's folder; None if neither is set
    or the data is in object storage."""
    if cfg.data.root and is_remote(cfg.data.root):
        return None
    if cfg.data.root:
        return Path(cfg.data.root)
    if cfg.data.manifest:
        return Path(cfg.data.manifest).parent
    return None


def is_inside(child: str | Path, parent: str | Path) -> bool:
    """Whether `child` is `parent` or below it once links and `..` are resolved (neither must exist)."""
    child_r, parent_r = os.path.realpath(child), os.path.realpath(parent)
    return child_r == parent_r or child_r.startswith(parent_r.rstrip(os.sep) + os.sep)


def check_output_locations(cfg: RootConfig) -> None:
    """ConfigError naming the key when the run folder (output_root) or data.cache_dir lies inside
    the dataset: nothing is ever written into it, and a later scan would read the run's files."""
    data = _dataset_folder(cfg)
    if data is None:
        return
    if is_inside(cfg.run_dir, data):
        raise ConfigError(
            f"output_root: the run folder {cfg.run_dir} is inside the dataset folder {data} (data.root); choose an output_root outside it"
        )
    if cfg.data.cache_dir and is_inside(cfg.data.cache_dir, data):
        raise ConfigError(f"data.cache_dir: {cfg.data.cache_dir} is inside the dataset folder {data} (data.root); choose a folder outside it")
    if cfg.data.scan_index and is_inside(scan_index_dir(cfg), data):
        raise ConfigError(
            f"data.scan_index_dir: the scan index folder {scan_index_dir(cfg)} is inside the dataset folder {data} (data.root); choose a folder outside it"
        )


def ensure_dataset(cfg: RootConfig, *, is_main: bool, log: Callable[[str], None] | None) -> Path:
    """The dataset root; the demo is generated there first when configured and absent."""
    root = Path(cfg.data.root)
    if cfg.data.manifest:
        manifest = Path(cfg.data.manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"data.manifest: manifest file not found: {manifest}")
        root = root if cfg.data.root else manifest.parent
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.root: dataset folder not found: {root} (the manifest's 'file' paths are "
                "relative to it; set data.root='' to use the manifest's folder)"
            )
        return root
    if not root.exists() and cfg.data.demo_images > 0 and is_main:
        started = time.perf_counter()
        generate_demo_dataset(root, num_images=cfg.data.demo_images, seed=0, image_size=cfg.data.image_size)
        if log:
            log(f"demo: generated {cfg.data.demo_images} images in {display_path(root)} ({time.perf_counter() - started:.1f}s)")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}")
    return root


def scan_index_dir(cfg: RootConfig) -> Path:
    """Where the scan index lives: data.scan_index_dir, else output_root/scan_index."""
    return Path(cfg.data.scan_index_dir) if cfg.data.scan_index_dir else Path(cfg.output_root) / "scan_index"


def scan_from_config(
    cfg: RootConfig, root: Path, verify: str | None = None, *, write_index: bool = True, log: Callable[[str], None] | None = None
) -> DatasetScan:
    """Scan the dataset folder, or read the manifest, as the config says (through the scan index
    when data.scan_index is on; `write_index`: this process may rewrite it)."""
    verify = verify or cfg.data.verify
    if is_shard_dataset(root):
        return load_shard_scan(root, log)
    if cfg.data.scan_index:
        return scan_with_index(
            root,
            manifest=cfg.data.manifest or None,
            verify=verify,
            limits=limits_from_config(cfg),
            index_dir=scan_index_dir(cfg),
            rescan=cfg.data.rescan,
            write=write_index,
            log=log,
        )
    return scan_source(root, manifest=cfg.data.manifest or None, verify=verify, limits=limits_from_config(cfg))


def absolute_data_paths(cfg: RootConfig) -> None:
    """data.root, data.manifest and data.cache_dir made absolute in place (an s3:// data.root stays as written)."""
    for key in ("root", "manifest", "cache_dir"):
        value = getattr(cfg.data, key)
        if value and not (key == "root" and is_remote(value)):
            setattr(cfg.data, key, str(Path(value).absolute()))


def dataset_root(cfg: RootConfig, *, is_main: bool, log: Callable[[str], None] | None) -> str | Path:
    """data.root as a sharded dataset (kept as written: an s3:// URL is no path) or the folder ensure_dataset gives."""
    if not cfg.data.manifest and is_shard_dataset(cfg.data.root):
        if cfg.data.cache_dir:
            raise ConfigError(f"data.cache_dir: a sharded dataset ({cfg.data.root}) is read from its chunks; leave data.cache_dir empty")
        return cfg.data.root if is_remote(cfg.data.root) else Path(cfg.data.root)
    return ensure_dataset(cfg, is_main=is_main, log=log)


def load_shard_scan(root: str | Path, log: Callable[[str], None] | None = None) -> DatasetScan:
    """The scan stored in a sharded dataset's tag index (no image read)."""
    started = time.perf_counter()
    scan, extra = load_tag_index(root)
    if log:
        log(
            f"shards: {len(scan.records)} samples in {extra.get('chunks', '?')} chunks at {root}, tag index read in {time.perf_counter() - started:.1f}s"
        )
    return scan


def shard_images(cfg: RootConfig, root: str | Path, scan: DatasetScan) -> ShardImages | None:
    """The reader of a sharded dataset's images (None for a folder); a remote one caches litdata's index under output_root."""
    if not is_shard_dataset(root):
        return None
    return ShardImages(root, as_table(scan.records), Path(cfg.output_root) / "shard_cache" if is_remote(root) else None)


def exclude_failed(scan: DatasetScan, failed: dict[str, str], source: str) -> None:
    """Drop the scan's records whose sample id is in `failed` (id -> reason), counting each under
    its reason; `source` says where the failure was seen (for the examples)."""
    if not failed:
        return
    table = as_table(scan.records)
    keep = np.ones(len(table), dtype=bool)
    for row, sid in enumerate(table.sample_ids()):
        reason = failed.get(sid)
        if reason is not None:
            keep[row] = False
            scan.add_skipped(reason, 1, [printable(f"{sid}: failed to decode ({source})")])
    scan.records = table.select(keep)


def earlier_failures(run_dir: Path) -> dict[str, tuple[str, str]]:
    """Samples the run's earlier attempts found undecodable in workers or validation (from its
    data_report.json): sample id -> (reason, "training" or "validation")."""
    path = run_dir / "data_report.json"
    if not path.is_file():
        return {}
    try:
        report = read_json(str(path))
    except ValueError as exc:
        raise DataQualityError(f"{path}: unreadable data report ({exc}); move it away to start over") from exc
    # FailureTracker.write_report() keeps them under "replaced_during_training" (each epoch end and at the end)
    section = report.get("replaced_during_training") if isinstance(report, dict) else None
    samples = section.get("samples") if isinstance(section, dict) else None
    in_validation = section.get("validation_samples") if isinstance(section, dict) else None
    validation = {str(k) for k in in_validation} if isinstance(in_validation, list) else set()
    if not isinstance(samples, dict):
        return {}
    return {str(k): (str(v), "validation" if str(k) in validation else "training") for k, v in samples.items()}


def _rows_without_known_tags(records: Sequence[SampleRecord], known: Mapping[str, int]) -> np.ndarray:
    """Row numbers of the records none of whose tags is in `known` (what filter_known_tags drops)."""
    if isinstance(records, SampleTable):
        return np.flatnonzero(np.diff(records.rekeyed(known).tag_offsets) == 0)
    return np.asarray([i for i, r in enumerate(records) if not any(t in known for t in r.tags)], dtype=np.int64)


def _write_run_skip_list(
    path: Path,
    scan: DatasetScan,
    cache_rows: list[Any],
    split: Any,
    val_candidates: Sequence[SampleRecord],
    vocab: TagVocabulary,
    earlier: Mapping[str, tuple[str, str]],
) -> int:
    """The run's complete list at start-up: the scan's skips, the cache's, the split's (no known tag,
    the validation cap) and what earlier attempts of this run found in training and validation."""
    known = vocab.tag_to_index
    rows = itertools.chain(
        scan_rows(scan),
        cache_rows,
        record_rows(split.train, _rows_without_known_tags(split.train, known), "no_known_tags", "split"),
        record_rows(val_candidates, _rows_without_known_tags(val_candidates, known), "no_known_tags", "split"),
        record_rows(split.excluded, np.arange(len(split.excluded)), "validation_cap", "split", "data.max_val_samples"),
        failure_rows(earlier, (split.train, split.val)),
    )
    return write_skip_list(path, rows)


def _wait_for_rank0(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def flip_audit(records: Sequence[SampleRecord], vocab: TagVocabulary, handler: OrientationHandler) -> FlipStats:
    """Which training samples a flip would be allowed for, and the tags that veto the others
    (decided on vocabulary tags, as the dataset does)."""
    if isinstance(records, SampleTable):
        return _flip_audit_table(records, vocab, handler)
    stats = FlipStats()
    for record in records:
        stats.record(handler.decide([t for t in record.tags if t in vocab.tag_to_index]))
    return stats


def _flip_audit_table(table: SampleTable, vocab: TagVocabulary, handler: OrientationHandler) -> FlipStats:
    """flip_audit over a table's arrays: a sample is vetoed when one of its vocabulary tags vetoes
    alone (OrientationHandler.veto_kind), which is what decide() does tag by tag."""
    known = np.asarray([vocab.tag_to_index.get(name, -1) >= 0 for name in table.tag_names] + [False])
    kinds = [handler.veto_kind(name) if known[i] else None for i, name in enumerate(table.tag_names)]
    forbid = np.asarray([k == "forbid" for k in kinds] + [False])
    unmapped = np.asarray([k == "unmapped" for k in kinds] + [False])
    vetoing = forbid[table.tag_ids] | unmapped[table.tag_ids]  # (tag occurrences,)
    row_of = np.repeat(np.arange(len(table)), np.diff(table.tag_offsets))
    vetoed = int(np.count_nonzero(np.bincount(row_of[vetoing], minlength=len(table))))
    stats = FlipStats(flipped=len(table) - vetoed, vetoed=vetoed)
    for mask, counter in ((forbid, stats.forbid_counts), (unmapped, stats.unmapped_counts)):
        hits = table.tag_ids[mask[table.tag_ids]]
        counts = np.bincount(hits, minlength=len(table.tag_names))
        counter.update({table.tag_names[t]: int(counts[t]) for t in np.flatnonzero(counts).tolist()})
    return stats


def build_train_sampler(
    cfg: RootConfig, data: DataBundle, *, rank: int, world_size: int, log: Callable[[str], None] | None = None
) -> ShardedEpochSampler:
    """The training sampler: shuffled epochs, or repeat-factor epochs when data.repeat_factor_threshold > 0
    (their length logged); ValueError when the batch does not fit the data."""
    common = dict(batch_size=cfg.data.batch_size, shuffle=True, seed=cfg.training.seed, rank=rank, world_size=world_size, drop_last=True)
    threshold = cfg.data.repeat_factor_threshold
    if threshold <= 0:
        return ResumableSampler(len(data.train_dataset), **common)
    dataset = data.train_dataset
    factors = repeat_factors([dataset.tag_indices(i) for i in range(len(dataset))], len(data.vocab), threshold)  # (N,)
    sampler = RepeatFactorSampler(factors, **common)
    if log:
        log(
            f"repeat-factor sampling: {sampler.effective_epoch_length} samples an epoch from {len(factors)} images "
            f"(threshold {threshold}; {int((factors > 1).sum())} images repeated, at most {factors.max():.2f}x)"
        )
    return sampler


def _datasets(
    cfg: RootConfig,
    train: Sequence[SampleRecord] | None,
    val: Sequence[SampleRecord],
    vocab: TagVocabulary,
    preprocess: PreprocessParams,
    cache: PreparedCache | None = None,
    known_bad: dict[str, str] | None = None,
    images: ShardImages | None = None,
) -> tuple[SidecarJsonDataset | None, SidecarJsonDataset]:
    """Training dataset (augmented; a failing sample is replaced) and validation dataset (a
    failing sample is skipped and reported, never replaced)."""
    train_ds = None
    if train is not None:
        a = cfg.augment
        orientation = OrientationHandler.from_file(resolve_resource(a.orientation_map), a.orientation_safety) if a.flip_prob > 0 else None
        train_ds = SidecarJsonDataset(
            train,
            vocab.tag_to_index,
            preprocess,
            augment=AugmentParams(flip_prob=a.flip_prob, brightness=a.brightness, contrast=a.contrast, saturation=a.saturation),
            orientation=orientation,
            seed=cfg.training.seed,
            cache=cache,
            known_bad=known_bad,
            images=images,
        )
    val_ds = SidecarJsonDataset(
        val, vocab.tag_to_index, preprocess, augment=None, orientation=None, seed=cfg.training.seed, cache=cache, substitute=False, images=images
    )
    return train_ds, val_ds


def _build_cache(cfg: RootConfig, records: list[SampleRecord], root: Path, preprocess: PreprocessParams, log: Callable[[str], None] | None) -> None:
    """Build or refresh the prepared cache over every scanned record (main process only)."""
    started = time.perf_counter()
    d = cfg.data
    cache_report = prepare_cache(
        records, d.cache_dir, preprocess, num_workers=max(0, d.num_workers), data_root=root, cache_format=d.cache_format, quality=d.cache_quality
    )
    if log:
        failed = sum(cache_report.get("failed", {}).values())
        old = cache_report.get("rebuilt_from")
        codec = f"jpeg q{d.cache_quality}" if d.cache_format == "jpeg" else "raw"
        log(
            f"cache: {d.cache_dir} ({codec}, {cache_report.get('bytes_per_image', 0) / 1024:.0f} KB an image) ready in {time.perf_counter() - started:.1f}s "
            f"({cache_report.get('decoded', 0)} images decoded, {cache_report.get('reused', 0)} reused"
            + (f", {failed} failed to decode: left out" if failed else "")
            + (f"; rebuilt, it held {old['format']}" + (f" q{old['quality']}" if "quality" in old else "") if old else "")
            + ")"
        )


def _vocabulary(cfg: RootConfig, train: list[SampleRecord], root: Path) -> tuple[TagVocabulary, dict[str, Any]]:
    """The vocabulary built from the training split under min_tag_frequency, top_k_tags and the
    max_vocabulary_tags cap (extended from a released tagger's tags in extend mode), with its build report."""
    d = cfg.data
    ignore = load_ignore_list(resolve_resource(d.ignore_tags_file)) if d.ignore_tags_file else ()
    top_k = min(d.top_k_tags, d.max_vocabulary_tags) if d.top_k_tags else d.max_vocabulary_tags
    vocab, build = build_vocabulary(train, min_frequency=d.min_tag_frequency, top_k=top_k, ignore_tags=ignore)
    if d.vocabulary_mode == "extend":
        if release_layout(cfg.model.init_from) != "wd_v3":
            raise ConfigError(
                f"data.vocabulary_mode=extend: model.init_from={cfg.model.init_from!r} is not a released "
                "tagger folder (selected_tags.csv + config.json + model.safetensors)"
                + (f": {release_problem(cfg.model.init_from)}" if release_problem(cfg.model.init_from) else "")
            )
        vocab = extend_vocabulary(read_release_labels(cfg.model.init_from), vocab)
    if len(vocab) == 0:
        raise DataQualityError(f"no tag reaches data.min_tag_frequency={d.min_tag_frequency} in the training split of {root}")
    return vocab, build.to_dict()


def _log_split(log: Callable[[str], None], split: Any, report: dict[str, Any], vocab: TagVocabulary, dropped: int) -> None:
    """The console lines after the split: sizes, vocabulary, flip audit."""
    used = report["used"]
    excluded = f", {len(split.excluded)} excluded by the validation cap" if split.excluded else ""
    log(
        f"split: {used['train']} train / {used['val']} val{excluded}; vocabulary: {len(vocab)} tags"
        + (f"; {dropped} samples without a known tag dropped" if dropped else "")
    )
    if "flip_audit" in report:
        audit = report["flip_audit"]
        causes = {**audit["vetoed_by_forbid_tag"], **audit["vetoed_by_unmapped_tag"]}
        top = ", ".join(f"{t}: {n}" for t, n in sorted(causes.items(), key=lambda kv: -kv[1])[:5])
        log(f"flips: {audit['vetoed']} of {audit['considered']} training samples never flip" + (f" ({top})" if top else ""))


def prepare_data(
    cfg: RootConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1, resume: bool = False, log: Callable[[str], None] | None = print
) -> DataBundle:
    """Scan, audit, split and build the vocabulary for a training run; write the run's data files.

    On resume the split and vocabulary saved in the run folder are reused, so a resumed run sees
    exactly the samples and tag columns it started with. A refused output location raises
    ConfigError before anything is written; too much bad data raises DataQualityError after
    data_report.json is written.
    """
    check_output_locations(cfg)
    is_main = rank == 0
    run_dir = Path(run_dir)
    apply_init_preprocessing(cfg, log if is_main else None)  # a timm run from a release: its size, mean/std, white pad
    if is_main:
        root = dataset_root(cfg, is_main=True, log=log)  # may generate the demo
        scan = scan_from_config(cfg, root, log=log)  # first, so that the other ranks find its scan index
    _wait_for_rank0(world_size)
    if not is_main:
        root = dataset_root(cfg, is_main=False, log=None)
        scan = scan_from_config(cfg, root, write_index=False)
    images = shard_images(cfg, root, scan)  # before any record is dropped: its rows are the chunks' items
    preprocess = preprocess_from_config(cfg)
    if cfg.data.cache_dir and is_main:
        _build_cache(cfg, scan.records, root, preprocess, log)
    _wait_for_rank0(world_size)
    cache = PreparedCache(cfg.data.cache_dir, preprocess, decode_on_device=cfg.data.decode_on_device) if cfg.data.cache_dir else None
    cache_rows: list[Any] = []
    if cache is not None:
        if cache.failures and is_main:  # located while the scan still holds them
            cache_rows = list(failure_rows({sid: (reason, "cache") for sid, reason in cache.failures.items()}, [scan.records]))
        exclude_failed(scan, cache.failures, "cache build")
    # samples found undecodable in workers by an earlier attempt of this run stay in the training
    # dataset (the sampler's size must not change on resume) but are never decoded again
    earlier = earlier_failures(run_dir) if resume else {}
    known_bad = {sid: reason for sid, (reason, _) in earlier.items()}
    if log:
        log(format_scan_summary(scan))
    report_path = run_dir / "data_report.json"
    try:
        check_scan_quality(scan, cfg.data.max_bad_fraction)
    except DataQualityError as exc:
        if is_main:
            write_data_report(report_path, scan.to_report())
            listed = write_skip_list(run_dir / SKIP_LIST_FILE, itertools.chain(scan_rows(scan), cache_rows))
            raise DataQualityError(
                f"{exc}; every one of the {listed} samples left out is listed in {display_path(run_dir / SKIP_LIST_FILE)}"
            ) from exc
        raise

    split_path, vocab_path = run_dir / "split.json", run_dir / "vocabulary.json"
    if resume and split_path.is_file():
        split = load_split(split_path, scan.records)
    else:
        split = split_records(scan.records, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed, max_val=cfg.data.max_val_samples)
    build_report: dict[str, Any] | None = None
    if resume and vocab_path.is_file():
        vocab = TagVocabulary.load(vocab_path)
    elif cfg.data.vocabulary:
        vocab = TagVocabulary.load(cfg.data.vocabulary)
    else:
        vocab, build_report = _vocabulary(cfg, split.train, root)
    train, dropped_train = filter_known_tags(split.train, vocab)
    val_candidates = [r for r in split.val if r.sample_id not in known_bad] if known_bad else split.val
    val, dropped_val = filter_known_tags(val_candidates, vocab)
    if not train or not val:
        raise DataQualityError(
            f"{root}: {len(train)} training and {len(val)} validation samples after the split; "
            "need at least one of each (add data or change data.val_fraction)"
        )
    report = scan.to_report()
    report["split"] = split.to_report()
    report["no_known_tags"] = {"train": dropped_train, "val": dropped_val}
    report["used"] = {"train": len(train), "val": len(val), "tags": len(vocab)}
    if build_report is not None:
        report["vocabulary"] = build_report
    if known_bad:
        report["replaced_during_training"] = {"samples": dict(sorted(known_bad.items()))}
    if cfg.augment.flip_prob > 0:
        handler = OrientationHandler.from_file(resolve_resource(cfg.augment.orientation_map), cfg.augment.orientation_safety)
        report["flip_audit"] = flip_audit(train, vocab, handler).to_dict()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and split_path.is_file()):
            save_split(split_path, split)
        if not (resume and vocab_path.is_file()):
            vocab.save(vocab_path)
        skip_path = run_dir / SKIP_LIST_FILE
        listed = _write_run_skip_list(skip_path, scan, cache_rows, split, val_candidates, vocab, earlier)
        report["skipped_list"] = {"file": SKIP_LIST_FILE, "samples": listed}
        write_data_report(report_path, report)
        if log:
            _log_split(log, split, report, vocab, dropped_train + dropped_val)
            if listed:
                log(f"skipped: every one of the {listed} samples left out, with its reason, is listed in {display_path(skip_path)}")
    train_ds, val_ds = _datasets(cfg, train, val, vocab, preprocess, cache, known_bad, images)
    return DataBundle(
        train,
        val,
        vocab,
        vocab_path,
        preprocess,
        train_ds,
        val_ds,
        report,
        report_path if is_main else None,
        skip_list_path=run_dir / SKIP_LIST_FILE if is_main else None,
        earlier_failed=earlier,
    )


def prepare_eval_data(
    cfg: RootConfig,
    vocab: TagVocabulary,
    preprocess: PreprocessParams,
    *,
    data_root: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> DataBundle:
    """Validation data for a checkpoint: the run's validation split, or every sample of data_root."""
    if data_root is not None and is_shard_dataset(data_root):
        root: str | Path = str(data_root)
        scan = load_shard_scan(root)
        records = scan.records
    elif data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data: dataset folder not found: {root}")
        scan = scan_dataset(root, verify=cfg.data.verify, limits=limits_from_config(cfg))
        records = scan.records
    else:
        root = dataset_root(cfg, is_main=False, log=None)
        # reads a training run's scan index but never writes one: evaluation leaves no files behind
        scan = scan_from_config(cfg, root, write_index=False)
        records = split_records(scan.records, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed, max_val=cfg.data.max_val_samples).val
    if log:
        log(format_scan_summary(scan))
    val, dropped = filter_known_tags(records, vocab)
    if not val:
        raise DataQualityError(f"{root}: no sample carries a tag of the checkpoint's vocabulary")
    report = scan.to_report()
    report["no_known_tags"] = {"val": dropped}
    skipped = list(
        itertools.chain(scan_rows(scan), record_rows(records, _rows_without_known_tags(records, vocab.tag_to_index), "no_known_tags", "split"))
    )
    _, val_ds = _datasets(cfg, None, val, vocab, preprocess, images=shard_images(cfg, root, scan))
    return DataBundle([], val, vocab, Path(), preprocess, None, val_ds, report, skipped_rows=skipped)


def build_eval_loader(cfg: RootConfig, data: DataBundle, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Validation batches in file order, this rank's share only (no sample on two ranks)."""
    batch_size = cfg.validation.batch_size or cfg.data.batch_size
    shard = list(range(rank, len(data.val_dataset), world_size))
    workers = cfg.data.num_workers
    if workers < 0:  # "auto" left unresolved (a config not from a training run): a safe small number
        workers = min(2, max(0, (os.cpu_count() or 1) - 1))
    return build_dataloader(
        data.val_dataset,
        shard,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        drop_last=False,
        prefetch_factor=cfg.data.prefetch_factor,
        persistent_workers=cfg.data.persistent_workers,
        multiprocessing_context=cfg.data.worker_start_method or None,
        generator_seed=cfg.training.seed,
    )
