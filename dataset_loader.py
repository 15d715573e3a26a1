"""The data pipeline's established entry point: its public names, and the `prepare` command.

The pipeline itself lives in one module per concern; this module owns none of it and re-exports
the names that existing code and instructions use from ``dataset_loader``:

* ``dataset_scan``: discovery and checking of image folders with sidecars or manifests
  (``SampleRecord``, ``DatasetScan``, ``scan_dataset``, ``load_manifest``, the reports), with
  ``DatasetLoader`` kept here as the established name of ``dataset_scan.DatasetScanner``;
* ``dataset_split``: the deterministic train/validation split;
* ``image_preprocess``: ``PreprocessParams``, ``load_image``, ``normalize_images``;
* ``augmentation``: ``AugmentParams``, ``apply_color_jitter``;
* ``prepared_cache``: ``prepare_cache``, ``PreparedCache``;
* ``batching``: ``SidecarJsonDataset``, ``collate_samples``, ``targets_from_indices``,
  ``FailureTracker``, ``ResumableSampler``, ``build_dataloader`` (also under the seed's name
  ``DataLoader``), ``ImagePreFetcher``;
* ``data_setup``: ``DataBundle``, ``prepare_data``, ``prepare_eval_data``, ``build_eval_loader``
  and the other run-level wiring.

New code imports from those modules directly. ``python dataset_loader.py prepare --data DIR
--image-size 448 --out CACHE`` runs ``prepared_cache``'s command (also
``python prepared_cache.py prepare ...``); with ``--format litdata`` it runs ``shard_prepare``'s
(a sharded dataset: litdata chunks + tag index, in a folder or under ``s3://``). This module sits
above every data module, and no data module imports it.
"""

from __future__ import annotations

import sys
from typing import Sequence

import prepared_cache
import shard_prepare
from augmentation import AugmentParams, apply_color_jitter
from batching import FailureTracker, ImagePreFetcher, ResumableSampler, SidecarJsonDataset, build_dataloader, collate_samples, targets_from_indices
from data_setup import (
    DataBundle,
    build_eval_loader,
    ensure_dataset,
    flip_audit,
    prepare_data,
    prepare_eval_data,
    preprocess_from_config,
    scan_from_config,
)
from dataset_scan import (
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    TAG_CATEGORIES,
    DataQualityError,
    DatasetScan,
    DatasetScanner,
    SampleRecord,
    check_scan_quality,
    filter_known_tags,
    format_scan_summary,
    load_manifest,
    parse_rating,
    parse_sidecar,
    scan_dataset,
    split_tag_string,
    write_data_report,
)
from dataset_split import SplitResult, load_split, save_split, split_records
from image_preprocess import PreprocessParams, load_image, normalize_images
from prepared_cache import CACHE_FORMAT_VERSION, PreparedCache, prepare_cache

# The established public names: code and instructions written before the split use them.
DatasetLoader = DatasetScanner
# The seed's loader wrapper: build_dataloader handles the worker edge cases (spawned workers, a
# picklable worker_init_fn, the private worker-seed generator, no prefetch settings without workers).
DataLoader = build_dataloader

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "TAG_CATEGORIES",
    "SampleRecord",
    "DatasetScan",
    "DataQualityError",
    "parse_rating",
    "split_tag_string",
    "parse_sidecar",
    "scan_dataset",
    "load_manifest",
    "DatasetLoader",
    "filter_known_tags",
    "check_scan_quality",
    "write_data_report",
    "format_scan_summary",
    "SplitResult",
    "split_records",
    "save_split",
    "load_split",
    "PreprocessParams",
    "load_image",
    "AugmentParams",
    "apply_color_jitter",
    "SidecarJsonDataset",
    "collate_samples",
    "targets_from_indices",
    "normalize_images",
    "FailureTracker",
    "ResumableSampler",
    "build_dataloader",
    "DataLoader",
    "ImagePreFetcher",
    "prepare_cache",
    "PreparedCache",
    "CACHE_FORMAT_VERSION",
    "DataBundle",
    "preprocess_from_config",
    "ensure_dataset",
    "scan_from_config",
    "flip_audit",
    "prepare_data",
    "prepare_eval_data",
    "build_eval_loader",
]


def main(argv: Sequence[str] | None = None) -> int:
    """`prepare`: the prepared cache (``--format raw|jpeg``), or a sharded dataset with ``--format litdata``."""
    args = list(sys.argv[1:] if argv is None else argv)
    litdata = any(a == "--format=litdata" for a in args) or any(a == "--format" and b == "litdata" for a, b in zip(args, args[1:]))
    return shard_prepare.main(args) if litdata else prepared_cache.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
