"""Run-level data wiring: config -> records -> split -> vocabulary -> datasets and loaders.

This module owns the steps a training or evaluation run takes to get its data from the config:
``ensure_dataset`` (generating the demo dataset when configured and absent),
``scan_from_config``, ``flip_audit``, ``prepare_data`` (scan, quality check, split, vocabulary,
the run folder's split.json / vocabulary.json / data_report.json, the prepared cache, datasets),
``prepare_eval_data`` and ``build_eval_loader``, with the ``DataBundle`` they return and
``preprocess_from_config``. It is the top of the data modules and imports them all
(``dataset_scan``, ``dataset_split``, ``image_preprocess``, ``augmentation``,
``prepared_cache``, ``batching``) plus ``Configuration_System`` (the config), ``file_io``
(shipped resources), ``vocabulary``, ``orientation_handler`` and ``demo_dataset``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader

from Configuration_System import RootConfig
from augmentation import AugmentParams
from batching import SidecarJsonDataset, build_dataloader
from dataset_scan import (
    DataQualityError, DatasetScan, SampleRecord, check_scan_quality, filter_known_tags, format_scan_summary,
    load_manifest, scan_dataset, write_data_report,
)
from dataset_split import load_split, save_split, split_records
from demo_dataset import generate_demo_dataset
from file_io import resolve_resource
from image_preprocess import PreprocessParams
from orientation_handler import FlipStats, OrientationHandler
from prepared_cache import PreparedCache, prepare_cache
from vocabulary import TagVocabulary, create_vocabulary_from_datasets, load_ignore_list

__all__ = [
    "DataBundle",
    "preprocess_from_config",
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

    train_records: list[SampleRecord]
    val_records: list[SampleRecord]
    vocab: TagVocabulary
    vocab_path: Path
    preprocess: PreprocessParams
    train_dataset: SidecarJsonDataset | None
    val_dataset: SidecarJsonDataset
    report: dict[str, Any]


def preprocess_from_config(cfg: RootConfig) -> PreprocessParams:
    """Preprocessing parameters from the data section (stored in every checkpoint)."""
    d = cfg.data
    return PreprocessParams(image_size=d.image_size, pad_color=tuple(int(v) for v in d.pad_color),
                            mean=tuple(float(v) for v in d.mean), std=tuple(float(v) for v in d.std))


def ensure_dataset(cfg: RootConfig, *, is_main: bool, log: Callable[[str], None] | None) -> Path:
    """The dataset root; the demo is generated there first when configured and absent."""
    root = Path(cfg.data.root)
    if cfg.data.manifest:
        manifest = Path(cfg.data.manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"data.manifest: manifest file not found: {manifest}")
        root = root if cfg.data.root else manifest.parent
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: dataset folder not found: {root} (the manifest's 'file' paths are "
                                    "relative to it; set data.root='' to use the manifest's folder)")
        return root
    if not root.exists() and cfg.data.demo_images > 0 and is_main:
        started = time.perf_counter()
        generate_demo_dataset(root, num_images=cfg.data.demo_images, seed=0, image_size=cfg.data.image_size)
        if log:
            log(f"demo: generated {cfg.data.demo_images} images in {root} ({time.perf_counter() - started:.1f}s)")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}")
    return root


def scan_from_config(cfg: RootConfig, root: Path, verify: str | None = None) -> DatasetScan:
    """Scan the dataset folder, or read the manifest, as the config says."""
    verify = verify or cfg.data.verify
    if cfg.data.manifest:
        return load_manifest(cfg.data.manifest, root, verify=verify)
    return scan_dataset(root, verify=verify)


def _wait_for_rank0(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def flip_audit(records: Sequence[SampleRecord], vocab: TagVocabulary, handler: OrientationHandler) -> FlipStats:
    """Which training samples a flip would be allowed for, and the tags that veto the others
    (decided on vocabulary tags, as the dataset does)."""
    stats = FlipStats()
    for record in records:
        stats.record(handler.decide([t for t in record.tags if t in vocab.tag_to_index]))
    return stats


def _datasets(cfg: RootConfig, train: list[SampleRecord] | None, val: list[SampleRecord], vocab: TagVocabulary,
              preprocess: PreprocessParams, cache: PreparedCache | None = None,
              ) -> tuple[SidecarJsonDataset | None, SidecarJsonDataset]:
    train_ds = None
    if train is not None:
        a = cfg.augment
        orientation = (OrientationHandler.from_file(resolve_resource(a.orientation_map), a.orientation_safety)
                       if a.flip_prob > 0 else None)
        train_ds = SidecarJsonDataset(train, vocab.tag_to_index, preprocess,
                                      augment=AugmentParams(flip_prob=a.flip_prob, brightness=a.brightness,
                                                            contrast=a.contrast, saturation=a.saturation),
                                      orientation=orientation, seed=cfg.training.seed, cache=cache)
    val_ds = SidecarJsonDataset(val, vocab.tag_to_index, preprocess, augment=None, orientation=None,
                                seed=cfg.training.seed, cache=cache)
    return train_ds, val_ds


def prepare_data(cfg: RootConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1, resume: bool = False,
                 log: Callable[[str], None] | None = print) -> DataBundle:
    """Scan, audit, split and build the vocabulary for a training run; write the run's data files.

    On resume the split and vocabulary saved in the run folder are reused, so a resumed run sees
    exactly the samples and tag columns it started with.
    """
    is_main = rank == 0
    run_dir = Path(run_dir)
    if is_main:
        root = ensure_dataset(cfg, is_main=True, log=log)  # may generate the demo
    _wait_for_rank0(world_size)
    if not is_main:
        root = ensure_dataset(cfg, is_main=False, log=None)
    scan = scan_from_config(cfg, root)
    if log:
        log(format_scan_summary(scan))
    check_scan_quality(scan, cfg.data.max_bad_fraction)

    split_path, vocab_path = run_dir / "split.json", run_dir / "vocabulary.json"
    if resume and split_path.is_file():
        split = load_split(split_path, scan.records)
    else:
        split = split_records(scan.records, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed,
                              max_val=cfg.data.max_val_samples)
    if resume and vocab_path.is_file():
        vocab = TagVocabulary.load(vocab_path)
    elif cfg.data.vocabulary:
        vocab = TagVocabulary.load(cfg.data.vocabulary)
    else:
        ignore = load_ignore_list(resolve_resource(cfg.data.ignore_tags_file)) if cfg.data.ignore_tags_file else ()
        vocab = create_vocabulary_from_datasets(split.train, min_frequency=cfg.data.min_tag_frequency,
                                                top_k=cfg.data.top_k_tags, ignore_tags=ignore)
    if len(vocab) == 0:
        raise DataQualityError(f"no tag reaches data.min_tag_frequency={cfg.data.min_tag_frequency} in the training split of {root}")
    train, dropped_train = filter_known_tags(split.train, vocab)
    val, dropped_val = filter_known_tags(split.val, vocab)
    if not train or not val:
        raise DataQualityError(f"{root}: {len(train)} training and {len(val)} validation samples after the split; "
                               "need at least one of each (add data or change data.val_fraction)")
    report = scan.to_report()
    report["split"] = split.to_report()
    report["no_known_tags"] = {"train": dropped_train, "val": dropped_val}
    report["used"] = {"train": len(train), "val": len(val), "tags": len(vocab)}
    if cfg.augment.flip_prob > 0:
        handler = OrientationHandler.from_file(resolve_resource(cfg.augment.orientation_map), cfg.augment.orientation_safety)
        report["flip_audit"] = flip_audit(train, vocab, handler).to_dict()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and split_path.is_file()):
            save_split(split_path, split)
        if not (resume and vocab_path.is_file()):
            vocab.save(vocab_path)
        write_data_report(run_dir / "data_report.json", report)
        if log:
            excluded = f", {len(split.excluded)} excluded by the validation cap" if split.excluded else ""
            log(f"split: {len(train)} train / {len(val)} val{excluded}; vocabulary: {len(vocab)} tags"
                + (f"; {dropped_train + dropped_val} samples without a known tag dropped" if dropped_train + dropped_val else ""))
            if "flip_audit" in report:
                audit = report["flip_audit"]
                causes = {**audit["vetoed_by_forbid_tag"], **audit["vetoed_by_unmapped_tag"]}
                top = ", ".join(f"{t}: {n}" for t, n in sorted(causes.items(), key=lambda kv: -kv[1])[:5])
                log(f"flips: {audit['vetoed']} of {audit['considered']} training samples never flip" + (f" ({top})" if top else ""))
    preprocess = preprocess_from_config(cfg)
    if cfg.data.cache_dir and is_main:
        started = time.perf_counter()
        cache_report = prepare_cache(train + val, cfg.data.cache_dir, preprocess, num_workers=cfg.data.num_workers,
                                     data_root=root)
        if log:
            log(f"cache: {cfg.data.cache_dir} ready in {time.perf_counter() - started:.1f}s "
                f"({cache_report.get('decoded', 0)} images decoded, {cache_report.get('reused', 0)} reused)")
    _wait_for_rank0(world_size)
    cache = PreparedCache(cfg.data.cache_dir, preprocess) if cfg.data.cache_dir else None
    train_ds, val_ds = _datasets(cfg, train, val, vocab, preprocess, cache)
    return DataBundle(train, val, vocab, vocab_path, preprocess, train_ds, val_ds, report)


def prepare_eval_data(cfg: RootConfig, vocab: TagVocabulary, preprocess: PreprocessParams, *,
                      data_root: str | Path | None = None, log: Callable[[str], None] | None = print) -> DataBundle:
    """Validation data for a checkpoint: the run's validation split, or every sample of data_root."""
    if data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data: dataset folder not found: {root}")
        scan = scan_dataset(root, verify=cfg.data.verify)
        records = scan.records
    else:
        root = ensure_dataset(cfg, is_main=False, log=None)
        scan = scan_from_config(cfg, root)
        records = split_records(scan.records, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed,
                                max_val=cfg.data.max_val_samples).val
    if log:
        log(format_scan_summary(scan))
    val, dropped = filter_known_tags(records, vocab)
    if not val:
        raise DataQualityError(f"{root}: no sample carries a tag of the checkpoint's vocabulary")
    report = scan.to_report()
    report["no_known_tags"] = {"val": dropped}
    _, val_ds = _datasets(cfg, None, val, vocab, preprocess)
    return DataBundle([], val, vocab, Path(), preprocess, None, val_ds, report)


def build_eval_loader(cfg: RootConfig, data: DataBundle, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Validation batches in file order, this rank's share only (no sample on two ranks)."""
    batch_size = cfg.validation.batch_size or cfg.data.batch_size
    shard = list(range(rank, len(data.val_dataset), world_size))
    return build_dataloader(data.val_dataset, shard, batch_size=batch_size, num_workers=cfg.data.num_workers,
                            pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), drop_last=False,
                            prefetch_factor=cfg.data.prefetch_factor, persistent_workers=cfg.data.persistent_workers,
                            multiprocessing_context=cfg.data.worker_start_method or None,
                            generator_seed=cfg.training.seed)
