"""Helpers shared by the tag_app tests: the true labels of a demo image, from the generator's own description."""

from __future__ import annotations

from pathlib import Path

from demo_dataset import describe_sample

# tests/conftest.py's demo_data fixture: generate_demo_dataset(..., num_images=600, seed=1, image_size=32)
DEMO_SEED = 1
DEMO_SIZE = 32


def demo_labels(path: str | Path) -> set[str]:
    """The tags drawn into a demo image (demo_<index>.<ext>), as the generator decided them before drawing."""
    index = int(Path(path).name.split(".")[0].split("_")[1])
    return set(describe_sample(index, seed=DEMO_SEED, image_size=DEMO_SIZE).tags)
