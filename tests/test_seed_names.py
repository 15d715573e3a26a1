"""The seed's map: every name OppaiOracle's documented layout imports resolves from the module it names,
to the one object that does that job (no second implementation)."""

from __future__ import annotations

import importlib

import pytest

# module the seed imports from -> name -> (module that owns the object, its name there)
SEED_NAMES: dict[str, dict[str, tuple[str, str]]] = {
    "dataset_loader": {
        "DatasetLoader": ("dataset_scan", "DatasetScanner"),
        "SidecarJsonDataset": ("batching", "SidecarJsonDataset"),
        "ImagePreFetcher": ("batching", "ImagePreFetcher"),
        "DataLoader": ("batching", "build_dataloader"),
    },
    "vocabulary": {
        "TagVocabulary": ("vocabulary", "TagVocabulary"),
        "create_vocabulary_from_datasets": ("vocabulary", "create_vocabulary_from_datasets"),
    },
    "model_architecture": {
        "SimplifiedTagger": ("model_architecture", "SimplifiedTagger"),
        "VisionTransformerConfig": ("model_architecture", "VisionTransformerConfig"),
        "TransformerBlock": ("model_architecture", "TransformerBlock"),
    },
    "loss_functions": {"AsymmetricFocalLoss": ("loss_functions", "AsymmetricFocalLoss"), "MultiTaskLoss": ("loss_functions", "MultiTaskLoss")},
    "training_utils": {
        "CheckpointManager": ("checkpoint_store", "CheckpointManager"),
        "AsyncCheckpointWriter": ("checkpoint_store", "AsyncCheckpointWriter"),
        "MixedPrecisionTrainer": ("training_utils", "GuardedOptimizerStep"),
        "CosineAnnealingWarmupRestarts": ("schedulers", "CosineAnnealingWarmupRestarts"),
        "EarlyStopping": ("training_utils", "EarlyStopping"),
    },
    "schedulers": {"LinearWarmupCosineLR": ("schedulers", "LinearWarmupCosineLR")},
    "Monitor_log": {"TrainingMonitor": ("Monitor_log", "TrainingMonitor"), "ThreadSafeMetricsTracker": ("Monitor_log", "ThreadSafeMetricsTracker")},
    "evaluation_metrics": {"MetricComputer": ("evaluation_metrics", "MetricComputer")},
}

CASES = [(module, name, owner) for module, names in SEED_NAMES.items() for name, owner in names.items()]
# Imported at collection, as the other test files import their modules (torch's first import runs a process).
MODULES = {m: importlib.import_module(m) for m in sorted({c[0] for c in CASES} | {c[2][0] for c in CASES})}


@pytest.mark.parametrize("module, name, owner", CASES, ids=[f"{m}.{n}" for m, n, _ in CASES])
def test_seed_name_resolves_to_its_owner(module: str, name: str, owner: tuple[str, str]) -> None:
    obj = getattr(MODULES[module], name)
    owner_module, owner_name = owner
    assert obj is getattr(MODULES[owner_module], owner_name)
    assert callable(obj) and (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"


def test_every_seed_name_is_documented_in_architecture() -> None:
    from conftest import ROOT

    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [f"{m}.{n}" for m, n, _ in CASES if f"`{m}.{n}`" not in text]
    assert not missing, missing
