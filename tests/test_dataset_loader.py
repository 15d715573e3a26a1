"""Tests for dataset_loader: every name code imported from it before the split still leads to the object
of the module that owns it now, and DatasetLoader is the scanner.

The behaviour behind those names is tested in the owners' test files (test_dataset_scan,
test_dataset_split, test_image_preprocess, test_augmentation, test_prepared_cache, test_batching);
`python dataset_loader.py prepare` is tested with prepared_cache's command in test_prepared_cache.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

import augmentation
import batching
import broken_corpus as bc
import data_setup
import dataset_loader as dl
import dataset_scan
import dataset_split
import image_preprocess
import prepared_cache

# The public names of dataset_loader before it was split, by the module that owns each one now.
ESTABLISHED_NAMES: dict[ModuleType, tuple[str, ...]] = {
    dataset_scan: (
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
        "filter_known_tags",
        "check_scan_quality",
        "write_data_report",
        "format_scan_summary",
    ),
    dataset_split: ("SplitResult", "split_records", "save_split", "load_split"),
    image_preprocess: ("PreprocessParams", "load_image", "normalize_images"),
    augmentation: ("AugmentParams", "apply_color_jitter"),
    prepared_cache: ("CACHE_FORMAT_VERSION", "prepare_cache", "PreparedCache"),
    batching: (
        "SidecarJsonDataset",
        "collate_samples",
        "targets_from_indices",
        "FailureTracker",
        "ResumableSampler",
        "build_dataloader",
        "ImagePreFetcher",
    ),
    data_setup: (
        "DataBundle",
        "preprocess_from_config",
        "ensure_dataset",
        "scan_from_config",
        "flip_audit",
        "prepare_data",
        "prepare_eval_data",
        "build_eval_loader",
    ),
}


@pytest.mark.parametrize("owner", list(ESTABLISHED_NAMES), ids=lambda m: m.__name__)
def test_established_names_are_the_owners_objects(owner: ModuleType) -> None:
    """dataset_loader.X is owner.X (the same object, not a copy), and the owner exports it."""
    for name in ESTABLISHED_NAMES[owner]:
        assert getattr(dl, name) is getattr(owner, name), name
        assert name in owner.__all__, name


def test_all_lists_every_established_name() -> None:
    """dataset_loader.__all__ is exactly the established names plus the seed's DatasetLoader and DataLoader."""
    expected = {name for names in ESTABLISHED_NAMES.values() for name in names} | {"DatasetLoader", "DataLoader"}
    assert sorted(dl.__all__) == sorted(expected)


def test_dataset_loader_is_the_scanner(tmp_path: Path) -> None:
    """DatasetLoader, the scanner's established name, is dataset_scan.DatasetScanner and scans."""
    assert dl.DatasetLoader is dataset_scan.DatasetScanner
    bc.write_image(tmp_path / "a.png")
    bc.write_json(tmp_path / "a.png.json", {"tags": "x y", "rating": "g"})
    scan = dl.DatasetLoader(tmp_path, verify="decode").scan()
    assert [(r.sample_id, r.tags, r.rating) for r in scan.records] == [("a.png", ("x", "y"), 0)]
